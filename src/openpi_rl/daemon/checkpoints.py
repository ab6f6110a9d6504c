"""Versioned policy checkpoints: one orbax step per published version.

Each version directory `<checkpoint_dir>/<version>/` holds three items: `weights` (the whole
ActorCritic state, what a server loads), `opt_state` (what the learner resumes with) and `meta`
(JSON counters). orbax writes a step under a temporary name and renames it when complete, so a
`kill -9` mid-save leaves the previous version as the newest restorable one, and a published
path is always complete (the learner publishes only after the save has finished).

The server's swapper restores a notice's path with `restore_weights` in its restore worker
process (or `restore_version(path, ac_like)` in-process), into the state of an ActorCritic built
by `build_actor_critic` from the same model config as the learner's.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from openpi_rl.rl.actor_critic import ActorCritic

WEIGHTS, OPT_STATE, META = "weights", "opt_state", "meta"


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


def build_actor_critic(model_config: Any, value_hidden: tuple[int, ...], seed: int) -> ActorCritic:
    """The ActorCritic `openpi-rl serve` builds (same keys, same layout): the learner starts from
    the weights the server serves at version 0, and either can restore the other's state."""
    key = jax.random.key(seed)
    return ActorCritic(
        model_config.create(jax.random.fold_in(key, 0)),
        value_in_dim=model_config.value_in_dim,
        value_hidden=value_hidden,
        rngs=nnx.Rngs(jax.random.fold_in(key, 1)),
    )


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
    """`CheckpointManager` over versions: `save` blocks until the version is on disk."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 10):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
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
        return self.path(version)

    def restore(
        self, version: int, weights_like: nnx.State, opt_state_like: Any
    ) -> tuple[nnx.State, Any, dict[str, Any]]:
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
