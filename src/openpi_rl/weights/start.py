"""The weights every role starts from (version 0): the model config's `checkpoint`, of either
kind. An openpi checkpoint the model loads itself (`create`); one of our versions
(`<checkpoint_dir>/<N>/`, published with its manifest) is restored over a freshly built
actor-critic, its value head included, a LoRA version over its base. Every role builds its
actor-critic here, so the server's version 0 and the learner's are the same weights."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from flax import nnx

from openpi_rl.models.choice import ModelConfigError, build_actor_critic
from openpi_rl.rl.actor_critic import ActorCritic
from openpi_rl.weights.versions import MANIFEST, CorruptVersion, restore_version, verify_version


def is_version_dir(path: str | pathlib.Path) -> bool:
    """A version an openpi-rl learner published (it has our manifest), not an openpi checkpoint."""
    return (pathlib.Path(path) / MANIFEST).is_file()


def build_start(model_config: Any, value_hidden: tuple[int, ...], seed: int) -> ActorCritic:
    """`build_actor_critic`, started from `model_config.checkpoint` when it is one of our
    versions (verified against its manifest first). Raises ModelConfigError naming the
    checkpoint when it does not verify or does not fit the model."""
    checkpoint = getattr(model_config, "checkpoint", None)
    if checkpoint is None or not is_version_dir(checkpoint):
        return build_actor_critic(model_config, value_hidden, seed)
    path = pathlib.Path(checkpoint)
    ac = build_actor_critic(dataclasses.replace(model_config, checkpoint=None), value_hidden, seed)
    try:
        verify_version(path, int(path.name))
        nnx.update(ac, restore_version(path, ac))
    except (CorruptVersion, ValueError, KeyError, OSError) as e:
        raise ModelConfigError(
            f"model.checkpoint {path}: an openpi-rl version that does not restore into this "
            f"model: {e}"
        ) from e
    return ac
