"""Versioned policy checkpoints: one orbax step per published version.

Each version directory `<checkpoint_dir>/<version>/` holds three items: `weights` (the whole
ActorCritic state, what a server loads), `opt_state` (what the learner resumes with) and `meta`
(JSON counters). orbax writes a step under a temporary name and renames it when complete, so a
`kill -9` mid-save leaves the previous version as the newest restorable one, and a published
path is always complete (the learner publishes only after the save has finished).

The server's swapper restores a notice's path with `restore_weights` in its restore worker
process (or `restore_version(path, ac_like)` in-process), into the state of an ActorCritic built
by `build_actor_critic` from the same model config as the learner's.

Each version carries a content hash: once orbax has finished, `save` writes
`<version>/openpi_rl_manifest.json` (atomically) with the SHA-256 of every file of the version.
`verify_version` recomputes it: a server refuses a version whose files changed after publishing
(or that has no manifest, or the manifest of another version number), and the learner skips
such a version when it resumes. Retention (`keep_versions`) keeps the newest versions plus the
operator's pinned version and rollback target (operator_state.py), and every base a kept
version refers to.

Delta versions (a LoRA learner's, `finetune = "lora"`): the base is a full version (the run's
version 0); every later version's `weights` item holds only the arrays that train (LoRA
adapters and the value head: the nnx state filtered, same tree paths) and names its base in its
manifest and meta: `"base": {"version": 0, "sha256": <the base manifest's hash>}`. Restoring a
delta (`restore_version`, `restore_leaves`, `VersionCheckpoints.restore`) reads the base's
weights, checks the base against the recorded hash (CorruptVersion when it is missing or
changed) and puts the delta's arrays over them. A server whose live weights already sit on
that base reads the delta alone (`restore_leaves(..., base=False)`): a swap moves megabytes.

    <checkpoint_dir>/0/   weights (every array) | opt_state | meta | openpi_rl_manifest.json
    <checkpoint_dir>/7/   weights (LoRA + value head) | opt_state | meta {base} | manifest {base}
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import structlog
from flax import nnx
from jax.experimental import multihost_utils

from openpi_rl.rl.actor_critic import ActorCritic
from openpi_rl.weights.operator_state import atomic_write, load_state

log = structlog.get_logger("openpi_rl.checkpoints")

WEIGHTS, OPT_STATE, META = "weights", "opt_state", "meta"
MANIFEST = "openpi_rl_manifest.json"
_CHUNK = 1 << 20


class CorruptVersion(Exception):
    """A version whose files do not match its manifest (altered, truncated, replaced), or
    that has no readable manifest."""


def content_hash(path: str | pathlib.Path) -> tuple[str, dict[str, str]]:
    """(SHA-256 over the version's files, {relative path: the file's SHA-256}). The manifest
    itself is left out; the total hashes the sorted (path, file hash) pairs, so a renamed,
    added or removed file changes it too."""
    root = pathlib.Path(path)
    files: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.name == MANIFEST or not p.is_file():
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        files[p.relative_to(root).as_posix()] = h.hexdigest()
    total = hashlib.sha256()
    for name, digest in files.items():
        total.update(f"{name}\0{digest}\n".encode())
    return total.hexdigest(), files


def write_manifest(
    path: str | pathlib.Path, version: int, base: tuple[int, str] | None = None
) -> str:
    """Hash the (complete) version at `path` and write its manifest atomically; returns the
    hash. base: (version, hash) of the full version a delta version applies to."""
    digest, files = content_hash(path)
    manifest: dict[str, Any] = {"version": int(version), "sha256": digest, "files": files}
    if base is not None:
        manifest["base"] = {"version": int(base[0]), "sha256": base[1]}
    atomic_write(pathlib.Path(path) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return digest


def verify_version(path: str | pathlib.Path, version: int) -> str:
    """Raise CorruptVersion unless the files at `path` are the ones `version` was published
    with; returns the hash."""
    path = pathlib.Path(path)
    manifest = read_manifest(path)
    try:
        want, files, recorded = manifest["sha256"], manifest["files"], manifest["version"]
    except (KeyError, TypeError) as e:
        raise CorruptVersion(f"{path}/{MANIFEST}: unreadable: {e!r}") from e
    if recorded != version:
        raise CorruptVersion(f"{path}: the manifest is version {recorded!r}'s, not {version}'s")
    got, got_files = content_hash(path)
    if got != want:
        changed = sorted(
            name for name in set(files) | set(got_files) if files.get(name) != got_files.get(name)
        )
        raise CorruptVersion(f"{path}: content hash mismatch (changed: {changed[:5]})")
    return got


def read_manifest(path: str | pathlib.Path) -> dict[str, Any]:
    """The manifest of the version at `path`; CorruptVersion when it is missing or unreadable."""
    path = pathlib.Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise CorruptVersion(
            f"{path}: no {MANIFEST} (not published by an openpi-rl learner)"
        ) from e
    except (OSError, ValueError) as e:
        raise CorruptVersion(f"{path}/{MANIFEST}: unreadable: {e!r}") from e
    if not isinstance(manifest, dict):
        raise CorruptVersion(f"{path}/{MANIFEST}: unreadable: not a JSON object")
    return manifest


def version_base(path: str | pathlib.Path) -> tuple[int, str] | None:
    """(version, hash) of the full version that the delta version at `path` applies to; None
    for a full version. CorruptVersion when the manifest is missing or unreadable."""
    base = read_manifest(path).get("base")
    if base is None:
        return None
    try:
        return int(base["version"]), str(base["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptVersion(f"{path}/{MANIFEST}: unreadable base {base!r}: {e!r}") from e


def verify_base(path: str | pathlib.Path) -> tuple[pathlib.Path, int, str] | None:
    """For a delta version at `path`: (base path, base version, hash) after checking that the
    base beside it is there and is the one recorded (CorruptVersion otherwise). None for a
    full version."""
    path = pathlib.Path(path)
    base = version_base(path)
    if base is None:
        return None
    number, want = base
    base_path = path.parent / str(number)
    if not base_path.is_dir():
        raise CorruptVersion(f"{path}: its base, version {number}, is missing ({base_path})")
    try:
        got = verify_version(base_path, number)
    except CorruptVersion as e:
        raise CorruptVersion(f"{path}: its base, version {number}, does not verify: {e}") from e
    if got != want:
        raise CorruptVersion(
            f"{path}: its base, version {number}, is not the one it was trained on "
            f"(hash {got[:12]}, recorded {want[:12]})"
        )
    return base_path, number, got


def _skip_raw_io_metrics() -> None:
    """orbax asks tensorstore for its kvstore byte counters before and after every array save
    and restore, only to log a throughput line, and tensorstore 0.1.86's
    `experimental_collect_matching_metrics` leaks what it returns (~4.7 KiB a call measured;
    ~40 KiB per published version: the learner's whole RSS growth in a 10-minute soak). With
    the counter read as 0, orbax skips that log line and nothing else changes."""
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils
    except ImportError:  # another orbax layout: nothing to patch
        return
    if hasattr(tensorstore_utils, "get_tensorstore_raw_bytes"):
        tensorstore_utils.get_tensorstore_raw_bytes = lambda direction=None: 0


_skip_raw_io_metrics()


def abstract_state(tree: Any) -> Any:
    """`tree` with `jax.ShapeDtypeStruct` leaves: the target orbax restores jax arrays into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_version(path: str | pathlib.Path, ac_like: ActorCritic) -> nnx.State:
    """The weights of the version at `path` (a published notice's path), as the `nnx.State` of
    an ActorCritic shaped like `ac_like` (a delta version: over its base's); apply with
    `nnx.update(ac, state)`. Raises if the structure, shapes or dtypes differ (a server built
    from another model config), CorruptVersion if a delta's base is missing or changed."""
    target = abstract_state(nnx.state(ac_like))
    leaves, treedef = jax.tree.flatten(target)
    for i, x in restore_leaves(path, target).items():
        leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


def _names(path: tuple) -> tuple[str, ...]:
    """A tree path as names: an nnx.State's `.value` attribute and orbax's `value` key agree."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def restore_leaves(path: str | pathlib.Path, target: Any, *, base: bool = True) -> dict[int, Any]:
    """The version's weights as {index in `jax.tree.leaves(target)`: array}; `target` is the
    whole model's state tree (leaves `jax.ShapeDtypeStruct`: jax arrays back; numpy arrays:
    numpy arrays back). A full version gives every index. A delta version gives the indices it
    holds, and with `base` every other index from its base (checked: CorruptVersion when the
    base is missing or changed); without `base`, only its own (for weights already on it)."""
    path = pathlib.Path(path)
    if not (path / MANIFEST).exists():  # verifying is the caller's: read what orbax wrote
        return dict(enumerate(jax.tree.leaves(restore_weights(path, target))))
    based = verify_base(path) if base else None
    flat = jax.tree_util.tree_flatten_with_path(target)[0]
    index = {_names(p): (i, x) for i, (p, x) in enumerate(flat)}
    out: dict[int, Any] = {}
    if based is not None:
        out.update(restore_leaves(based[0], target, base=False))
    if version_base(path) is None:  # full: the whole tree, as before
        leaves = jax.tree.leaves(restore_weights(path, target))
        return dict(enumerate(leaves))
    # The delta's own tree (its paths, from orbax's metadata), leaves taken from `target`.
    stored = _stored_tree(path / WEIGHTS)
    with ocp.StandardCheckpointer() as ckptr:
        missing: list[str] = []

        def like(p: tuple, _meta: Any) -> Any:
            found = index.get(_names(p))
            if found is None:
                missing.append(".".join(_names(p)))
                return None
            return found[1]

        sub = jax.tree_util.tree_map_with_path(like, stored)
        if missing:
            raise ValueError(f"{path}: arrays the served model does not have: {missing[:5]}")
        restored = ckptr.restore(path / WEIGHTS, sub)
    for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]:
        out[index[_names(p)][0]] = x
    return out


_TREES: dict[bytes, Any] = {}


def _stored_tree(weights: pathlib.Path) -> Any:
    """orbax's tree metadata of a saved `weights` item. Reading it costs ~75 ms (tensorstore
    opens every array's metadata) where restoring a LoRA delta costs ~20 ms, and every delta of
    a run has the same tree: kept by the bytes of orbax's `_METADATA` file (the newest only)."""
    try:
        key = (weights / "_METADATA").read_bytes()
    except OSError:
        return ocp.StandardCheckpointHandler().metadata(weights)
    if key not in _TREES:
        _TREES.clear()
        _TREES[key] = ocp.StandardCheckpointHandler().metadata(weights)
    return _TREES[key]


def restore_weights(path: str | pathlib.Path, target: Any) -> Any:
    """The `weights` item of the version at `path`, restored into `target`'s tree: leaves of
    `jax.ShapeDtypeStruct` restore as jax arrays, numpy arrays as numpy arrays (what the
    server's restore worker asks for: nothing to copy off a device)."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(pathlib.Path(path) / WEIGHTS, target)


class VersionCheckpoints:
    """`CheckpointManager` over versions: `save` blocks until the version and its manifest are
    on disk. Keeps the newest `max_to_keep` versions and the operator's protected ones (None:
    all). Several learner processes (`jax.distributed`) call every method alike, on one shared
    directory: each saves its shards of every (global) array, process 0 writes the manifests
    and chooses what retention deletes."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int | None = 10):
        self.directory = pathlib.Path(directory).absolute()
        self.max_to_keep = max_to_keep
        # Retention is ours (`_prune`): orbax's own would delete a pinned version.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True),
        )
        self._hashes: dict[int, str] = {}  # content hashes known to be on disk (bases)

    def latest_version(self) -> int | None:
        return self.manager.latest_step()

    def versions(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def path(self, version: int) -> pathlib.Path:
        return self.directory / str(version)

    def save(
        self,
        version: int,
        weights: nnx.State,
        opt_state: Any,
        meta: dict[str, Any],
        base: int | None = None,
    ) -> pathlib.Path:
        """Write the version and wait until it is complete; returns its directory. base: the
        full version a delta's `weights` (only the arrays that changed) apply to; its number and
        manifest hash are recorded in the delta's meta and manifest."""
        based = None
        if base is not None:
            based = (int(base), self.verified_hash(base))
            meta = {**meta, "base": {"version": based[0], "sha256": based[1]}}
        self.manager.save(
            version,
            args=ocp.args.Composite(
                **{
                    WEIGHTS: ocp.args.StandardSave(weights),
                    OPT_STATE: ocp.args.StandardSave(opt_state),
                    META: ocp.args.JsonSave(meta),
                }
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        # After orbax's rename: the files are final. Several learner processes: each saved its
        # shards, process 0 alone writes the manifest, the others wait for it.
        if jax.process_index() == 0:
            self._hashes[version] = write_manifest(self.path(version), version, based)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"openpi_rl manifest {self.path(version)}")
            self._hashes[version] = read_manifest(self.path(version))["sha256"]
        self._prune()
        return self.path(version)

    def verified_hash(self, version: int) -> str:
        """`version`'s content hash, verified once per process (a base is hashed when a delta
        first refers to it, not at every save)."""
        if version not in self._hashes:
            self._hashes[version] = self.verify(version)
        return self._hashes[version]

    def base_of(self, version: int) -> int | None:
        """The base version a delta version applies to; None for a full version."""
        base = version_base(self.path(version))
        return None if base is None else base[0]

    def _prune(self) -> None:
        """Delete versions past the newest `max_to_keep`, except the pinned version and the
        rollback target (read from the operator's state file now: a pin may be seconds old)
        and the base of every version kept."""
        if self.max_to_keep is None:
            return
        versions = self.versions()
        keep = set(versions[-self.max_to_keep :]) | load_state(self.directory).protected()
        for version in list(keep):
            try:
                base = self.base_of(version)
            except CorruptVersion:
                continue  # unreadable: it cannot restore anyway
            if base is not None:
                keep.add(base)
        doomed = [v for v in versions if v not in keep]
        if jax.process_count() > 1 and versions:
            # orbax's delete is a collective: every process deletes what process 0 chose (the
            # operator's pins are read at slightly different times).
            chosen = np.array([v in doomed for v in versions], np.int32)
            chosen = multihost_utils.broadcast_one_to_all(chosen)
            doomed = [v for v, d in zip(versions, chosen, strict=True) if d]
        for version in doomed:
            self.manager.delete(version)
            self._hashes.pop(version, None)
            log.debug("checkpoints.deleted", version=version)

    def verify(self, version: int) -> str:
        """Raise CorruptVersion unless `version`'s files are the ones it was saved with."""
        return verify_version(self.path(version), version)

    def restore(
        self, version: int, weights_like: nnx.State, opt_state_like: Any
    ) -> tuple[nnx.State, Any, dict[str, Any]]:
        """(weights, optimizer state, meta); a delta version's weights come over its base's.
        Raises CorruptVersion when the files (or a delta's base) are not the ones saved, or
        orbax's error."""
        self.verify(version)
        out = self.manager.restore(
            version,
            args=ocp.args.Composite(
                **{
                    OPT_STATE: ocp.args.StandardRestore(abstract_state(opt_state_like)),
                    META: ocp.args.JsonRestore(),
                }
            ),
        )
        target = abstract_state(weights_like)
        leaves, treedef = jax.tree.flatten(target)
        for i, x in restore_leaves(self.path(version), target).items():
            leaves[i] = x
        return jax.tree.unflatten(treedef, leaves), out[OPT_STATE], out[META]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
