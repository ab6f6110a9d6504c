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
operator's pinned version and rollback target (operator_state.py).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
import structlog
from flax import nnx

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


def write_manifest(path: str | pathlib.Path, version: int) -> str:
    """Hash the (complete) version at `path` and write its manifest atomically; returns the hash."""
    digest, files = content_hash(path)
    manifest = {"version": int(version), "sha256": digest, "files": files}
    atomic_write(pathlib.Path(path) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return digest


def verify_version(path: str | pathlib.Path, version: int) -> str:
    """Raise CorruptVersion unless the files at `path` are the ones `version` was published
    with; returns the hash."""
    path = pathlib.Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        want, files = manifest["sha256"], manifest["files"]
        recorded = manifest["version"]
    except FileNotFoundError as e:
        raise CorruptVersion(
            f"{path}: no {MANIFEST} (not published by an openpi-rl learner)"
        ) from e
    except (OSError, ValueError, KeyError, TypeError) as e:
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


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_version(path: str | pathlib.Path, ac_like: ActorCritic) -> nnx.State:
    """The weights of the version at `path` (a published notice's path), as the `nnx.State` of
    an ActorCritic shaped like `ac_like`; apply with `nnx.update(ac, state)`. Raises if the
    structure, shapes or dtypes differ (a server built from another model config)."""
    return restore_weights(path, _abstract(nnx.state(ac_like)))


def restore_weights(path: str | pathlib.Path, target: Any) -> Any:
    """The `weights` item of the version at `path`, restored into `target`'s tree: leaves of
    `jax.ShapeDtypeStruct` restore as jax arrays, numpy arrays as numpy arrays (what the
    server's restore worker asks for: nothing to copy off a device)."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(pathlib.Path(path) / WEIGHTS, target)


class VersionCheckpoints:
    """`CheckpointManager` over versions: `save` blocks until the version and its manifest are
    on disk. Keeps the newest `max_to_keep` versions and the operator's protected ones (None:
    all)."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int | None = 10):
        self.directory = pathlib.Path(directory).absolute()
        self.max_to_keep = max_to_keep
        # Retention is ours (`_prune`): orbax's own would delete a pinned version.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True),
        )

    def latest_version(self) -> int | None:
        return self.manager.latest_step()

    def versions(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def path(self, version: int) -> pathlib.Path:
        return self.directory / str(version)

    def save(
        self, version: int, weights: nnx.State, opt_state: Any, meta: dict[str, Any]
    ) -> pathlib.Path:
        """Write the version and wait until it is complete; returns its directory."""
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
        write_manifest(self.path(version), version)  # after orbax's rename: the files are final
        self._prune()
        return self.path(version)

    def _prune(self) -> None:
        """Delete versions past the newest `max_to_keep`, except the pinned version and the
        rollback target (read from the operator's state file now: a pin may be seconds old)."""
        if self.max_to_keep is None:
            return
        versions = self.versions()
        keep = set(versions[-self.max_to_keep :]) | load_state(self.directory).protected()
        for version in versions:
            if version not in keep:
                self.manager.delete(version)
                log.debug("checkpoints.deleted", version=version)

    def verify(self, version: int) -> str:
        """Raise CorruptVersion unless `version`'s files are the ones it was saved with."""
        return verify_version(self.path(version), version)

    def restore(
        self, version: int, weights_like: nnx.State, opt_state_like: Any
    ) -> tuple[nnx.State, Any, dict[str, Any]]:
        """Raises CorruptVersion when the files are not the ones saved, or orbax's error."""
        self.verify(version)
        out = self.manager.restore(
            version,
            args=ocp.args.Composite(
                **{
                    WEIGHTS: ocp.args.StandardRestore(_abstract(weights_like)),
                    OPT_STATE: ocp.args.StandardRestore(_abstract(opt_state_like)),
                    META: ocp.args.JsonRestore(),
                }
            ),
        )
        return out[WEIGHTS], out[OPT_STATE], out[META]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
