"""openpi's parameter layout for PaliGemma, and loading its params into our module.

Owns: the mapping between an openpi Pi0-FAST params tree (`PaliGemma/llm/...`,
`PaliGemma/img/...`, leaves possibly wrapped as `{"value": array}` by nnx's state dicts) and
our `PaliGemma`'s nnx State. Our modules are named as openpi's, so the mapping is the identity
on paths; what this adds is the checks (every missing, unexpected or mis-shaped key named in
one error) and the cast to the config's weight dtype; and reading openpi's orbax directories
(`load_openpi_checkpoint`: a trainer step's `params/`, or a released checkpoint's).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openpi_rl.models.paligemma.gemma import is_lora_param
from openpi_rl.models.paligemma.paligemma import PaliGemma, PaliGemmaConfig

ROOT = "PaliGemma"


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _openpi_paths(flat: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
    """Drop nnx's trailing `value`, the checkpoint item's `params` and the leading `PaliGemma`."""
    out = {}
    for path, value in flat.items():
        if path and path[-1] == "value":
            path = path[:-1]
        if path and path[0] == "params":
            path = path[1:]
        if path and path[0] == ROOT:
            path = path[1:]
        out[path] = value
    return out


def param_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Our tree's parameters in openpi's naming, `PaliGemma/llm/layers/attn/q_einsum/w` ->
    shape, from `jax.eval_shape` (nothing allocated)."""
    state = nnx.state(config.abstract(), nnx.Param)
    flat = _flatten(nnx.to_pure_dict(state))
    return {"/".join((ROOT, *path)): tuple(leaf.shape) for path, leaf in sorted(flat.items())}


def param_count(config: PaliGemmaConfig) -> int:
    return sum(int(np.prod(s)) for s in param_shapes(config).values())


def _fresh_lora(config: PaliGemmaConfig, rng: jax.Array) -> dict[tuple[str, ...], Any]:
    # Jitted so that only the LoRA leaves are computed (XLA drops the rest of the init).
    def init(rng):
        return nnx.to_pure_dict(nnx.state(PaliGemma(config, rngs=nnx.Rngs(rng)), is_lora_param))

    return _flatten(jax.jit(init)(rng))


def _check_fit(
    given: Mapping[tuple[str, ...], Any], expected: Mapping[tuple[str, ...], Any]
) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped key (leaves: anything
    with a `.shape`, or arrays)."""
    name = "/".join
    missing = sorted(name(p) for p in expected.keys() - given.keys())
    unexpected = sorted(name(p) for p in given.keys() - expected.keys())
    misshaped = sorted(
        f"{name(p)}: expected {list(expected[p].shape)}, got {list(np.shape(given[p]))}"
        for p in expected.keys() & given.keys()
        if tuple(np.shape(given[p])) != tuple(expected[p].shape)
    )
    if missing or unexpected or misshaped:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("mis-shaped", misshaped),
            )
            if keys
        ]
        raise ValueError("openpi params do not fit PaliGemma: " + "; ".join(parts))


def openpi_to_ours(
    params: Mapping[str, Any],
    config: PaliGemmaConfig,
    *,
    init_missing_lora: jax.Array | None = None,
) -> nnx.State:
    """openpi's params (a nested dict as its checkpoint's `params` item holds them, rooted at
    `params`, `PaliGemma` or its children) -> our module's Param state, cast to
    `config.param_dtype`. Raises ValueError naming every missing, unexpected or mis-shaped
    key. With `init_missing_lora` (an rng), LoRA parameters the checkpoint lacks (a base
    checkpoint into a `_lora` variant) are initialised fresh instead, as openpi's weight loader
    keeps them (`missing_regex=".*lora.*"`); `b` starts at zero, so the model is the
    checkpoint's. Merge with `nnx.merge(nnx.graphdef(config.abstract()), state)`, or use
    `load_openpi_params`."""
    given = _openpi_paths(_flatten(params))
    state = nnx.state(config.abstract(), nnx.Param)
    expected = _flatten(nnx.to_pure_dict(state))
    if init_missing_lora is not None and any(
        is_lora_param(p) for p in expected.keys() - given.keys()
    ):
        fresh = _fresh_lora(config, init_missing_lora)
        given = {**{p: v for p, v in fresh.items() if p not in given}, **given}
    _check_fit(given, expected)
    pure: dict = {}
    for path in expected:
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(given[path], config.param_dtype)
    nnx.replace_by_pure_dict(state, pure)
    return state


def load_openpi_params(
    params: Mapping[str, Any],
    config: PaliGemmaConfig,
    *,
    init_missing_lora: jax.Array | None = None,
) -> PaliGemma:
    """A `PaliGemma` holding openpi's params (see `openpi_to_ours`)."""
    graphdef, _ = nnx.split(config.abstract())
    state = openpi_to_ours(params, config, init_missing_lora=init_missing_lora)
    return nnx.merge(graphdef, state)


def ours_to_openpi(model: PaliGemma) -> dict:
    """Our module's params as openpi's nested dict, rooted at `PaliGemma`."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {ROOT: jax.tree.map(np.asarray, pure)}


def save_openpi_checkpoint(model: PaliGemma, directory: str | os.PathLike) -> Path:
    """Write `model`'s params as openpi's trainer writes a step's: an orbax PyTree under
    `<directory>/params` holding the item `params` (`ours_to_openpi`), which openpi's
    `restore_params` and our `load_openpi_checkpoint` read. `directory` must not hold one yet.
    Returns the params directory."""
    import orbax.checkpoint as ocp

    path = Path(directory).absolute() / "params"
    if path.exists():
        raise FileExistsError(f"{path}: already exists; choose a new directory")
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path, {"params": ours_to_openpi(model)})
    return path


# Files orbax writes at the top of a PyTree checkpoint directory (`_METADATA`: the tree; older
# and non-OCDBT checkpoints have `_CHECKPOINT_METADATA` or `checkpoint`).
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "checkpoint")


def openpi_params_dir(checkpoint_dir: str | os.PathLike) -> Path:
    """The orbax directory holding openpi's params: `checkpoint_dir` itself when it is one (a
    released checkpoint's `params/`, or a trainer step's), else its `params/` (openpi's
    trainer writes `<ckpt>/<step>/params/`; released checkpoints hold `params/` too).
    Raises FileNotFoundError naming what was expected."""
    path = Path(checkpoint_dir)

    def is_orbax(p: Path) -> bool:
        return p.is_dir() and any((p / m).exists() for m in _ORBAX_MARKERS)

    if is_orbax(path):
        return path
    if is_orbax(path / "params"):
        return path / "params"
    if not path.exists():
        raise FileNotFoundError(f"openpi checkpoint {path}: does not exist")
    raise FileNotFoundError(
        f"openpi checkpoint {path}: expected an orbax checkpoint directory (holding "
        f"{' or '.join(_ORBAX_MARKERS)}) or a directory holding one as params/ (openpi's "
        f"<ckpt>/<step>/ or a released checkpoint); found "
        f"{sorted(p.name for p in path.iterdir())[:20] if path.is_dir() else 'a file'}"
    )


def restore_openpi_params(checkpoint_dir: str | os.PathLike) -> dict:
    """openpi's params as stored (numpy arrays in the stored dtype: float32 or bfloat16), the
    nested dict under the checkpoint's `params` item; leaves may be wrapped in `value` (the
    trainer's nnx state) or not (released checkpoints). `checkpoint_dir`: see
    `openpi_params_dir`."""
    import orbax.checkpoint as ocp

    path = openpi_params_dir(checkpoint_dir).absolute()
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(path)
            # orbax >= 0.12 returns a StepMetadata (the tree is its item_metadata.tree);
            # openpi's pinned 0.11 returns the tree itself.
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            restored = ckptr.restore(path, restore_args=restore_args)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"openpi checkpoint {path}: orbax cannot restore it: {e}") from e
    if not isinstance(restored, Mapping) or "params" not in restored:
        keys = sorted(restored) if isinstance(restored, Mapping) else type(restored).__name__
        raise ValueError(
            f"openpi checkpoint {path}: expected the item `params` (openpi's layout), got {keys}"
        )
    return restored["params"]


def load_openpi_checkpoint(
    checkpoint_dir: str | os.PathLike,
    model_or_config: PaliGemma | PaliGemmaConfig,
    *,
    init_missing_lora: jax.Array | None = None,
) -> PaliGemma:
    """An openpi checkpoint directory (see `openpi_params_dir`) restored with orbax as stored
    (float32 or bfloat16 leaves) and cast to the config's `param_dtype`. Given a `PaliGemma`,
    its params are replaced in place and it is returned; given a config, a new module is
    built (without initialising weights first). Raises ValueError naming the directory and
    every missing, unexpected or mis-shaped key at once (see `openpi_to_ours`, also for
    `init_missing_lora`)."""
    params = restore_openpi_params(checkpoint_dir)
    is_model = isinstance(model_or_config, PaliGemma)
    config = model_or_config.config if is_model else model_or_config
    try:
        state = openpi_to_ours(params, config, init_missing_lora=init_missing_lora)
    except ValueError as e:
        raise ValueError(f"openpi checkpoint {openpi_params_dir(checkpoint_dir)}: {e}") from e
    if is_model:
        nnx.update(model_or_config, state)
        return model_or_config
    return nnx.merge(nnx.graphdef(config.abstract()), state)


def check_openpi_checkpoint(checkpoint_dir: str | os.PathLike, config: PaliGemmaConfig) -> None:
    """The checkpoint's stored tree fits `config` (keys and shapes; LoRA adapters a base
    checkpoint lacks are fine), read from orbax's metadata only: a 2B checkpoint is checked
    without reading its 5.6 GB. Raises FileNotFoundError / ValueError naming what is wrong."""
    import orbax.checkpoint as ocp

    path = openpi_params_dir(checkpoint_dir).absolute()
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"openpi checkpoint {path}: orbax cannot read its metadata: {e}") from e
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    if not isinstance(tree, Mapping) or "params" not in tree:
        raise ValueError(f"openpi checkpoint {path}: expected the item `params` (openpi's layout)")
    given = _openpi_paths(_flatten(tree["params"]))
    expected = _flatten(nnx.to_pure_dict(nnx.state(config.abstract(), nnx.Param)))
    given.update({p: v for p, v in expected.items() if is_lora_param(p) and p not in given})
    try:
        _check_fit(given, expected)
    except ValueError as e:
        raise ValueError(f"openpi checkpoint {path}: {e}") from e
