"""Which model a role runs: the tyro/TOML choice between the models, and building the
actor-critic every role starts from (its config errors named, not a traceback)."""

from __future__ import annotations

from typing import Annotated, Any

import jax
import tyro
from flax import nnx

from openpi_rl.models.gaussian_mlp import GaussianMLPConfig
from openpi_rl.models.pi0_fast import Pi0FASTConfig
from openpi_rl.models.pi0_fast_openpi import Pi0FASTOpenPIConfig
from openpi_rl.rl.actor_critic import ActorCritic

# One tyro subcommand per model (`--model.gaussian_mlp`, `--model.pi0_fast`,
# `--model.pi0_fast_openpi`): pi0_fast is the embedded demo's tiny look-alike, pi0_fast_openpi
# openpi's Pi0-FAST (PaliGemma, its tokenizers and checkpoints).
ModelChoice = (
    Annotated[GaussianMLPConfig, tyro.conf.subcommand("gaussian_mlp")]
    | Annotated[Pi0FASTConfig, tyro.conf.subcommand("pi0_fast")]
    | Annotated[Pi0FASTOpenPIConfig, tyro.conf.subcommand("pi0_fast_openpi")]
)
MODEL_NAMES = ("gaussian_mlp", "pi0_fast", "pi0_fast_openpi")


class ModelConfigError(ValueError):
    """The model config does not build: a file it names is missing or unreadable (openpi's
    tokenizers, norm stats), or a value is refused (a variant, a size). The role's configuration
    is wrong, so `openpi-rl serve` and `openpi-rl learn` exit EX_CONFIG (78), which neither the
    daemon nor systemd restarts, instead of crashing again at every restart."""


_CONFIG_ERRORS = (
    ValueError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def build_actor_critic(model_config: Any, value_hidden: tuple[int, ...], seed: int) -> ActorCritic:
    """The ActorCritic `openpi-rl serve` builds (same keys, same layout): the learner starts from
    the weights the server serves at version 0, and either can restore the other's state.
    Raises ModelConfigError (naming the model kind) when the model config does not build."""
    key = jax.random.key(seed)
    try:
        model = model_config.create(jax.random.fold_in(key, 0))
        value_in_dim = model_config.value_in_dim
    except _CONFIG_ERRORS as e:
        kind = getattr(model_config, "KIND", type(model_config).__name__)
        raise ModelConfigError(f"model ({kind}) does not build: {e}") from e
    return ActorCritic(
        model,
        value_in_dim=value_in_dim,
        value_hidden=value_hidden,
        rngs=nnx.Rngs(jax.random.fold_in(key, 1)),
    )
