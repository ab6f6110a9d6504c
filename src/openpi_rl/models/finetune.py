"""What a learner trains of an ActorCritic: everything ("full"), or the LoRA adapters plus the
value head ("lora", openpi's way to fine-tune `gemma_2b_lora` on one GPU; the base weights stay
frozen). The learners (daemon/, train/) split the model with `trainable(...)` into what is
differentiated and updated (and has optimizer state) and what rides along frozen:

    graphdef, params, rest = nnx.split(ac, trainable(mode), ...)

`CRITIC` is the value head alone: a critic warm-up (value-only updates before the policy
moves, as piRL does) trains just that.
"""

from __future__ import annotations

from typing import Literal

import jax
from flax import nnx

from openpi_rl.models.choice import ModelConfigError
from openpi_rl.models.paligemma.gemma import is_lora_param
from openpi_rl.rl.actor_critic import ActorCritic

Finetune = Literal["auto", "full", "lora"]

CRITIC = nnx.All(nnx.Param, nnx.PathContains("value_head"))
"""The value head's parameters (ActorCritic.value_head)."""
LORA = nnx.All(nnx.Param, nnx.Any(is_lora_param, nnx.PathContains("value_head")))
"""LoRA adapters (every `lora_*` parameter) and the value head."""


def has_lora(ac: ActorCritic) -> bool:
    """True when the actor has LoRA parameters (a `*_lora` gemma variant)."""
    return bool(jax.tree.leaves(nnx.state(ac, nnx.All(nnx.Param, is_lora_param))))


def resolve_finetune(ac: ActorCritic, finetune: Finetune) -> Literal["full", "lora"]:
    """Resolve "auto": "lora" when the model has LoRA parameters, else "full". Raises
    ModelConfigError for "lora" on a model without LoRA parameters (or an unknown mode)."""
    if finetune not in ("auto", "full", "lora"):
        raise ModelConfigError(f"finetune: expected 'auto', 'full' or 'lora', got {finetune!r}")
    lora = has_lora(ac)
    if finetune == "lora" and not lora:
        raise ModelConfigError(
            f"finetune: 'lora' needs a model with LoRA parameters (a *_lora gemma_variant of "
            f"pi0_fast_openpi); {type(ac.model).__name__} has none (use 'full' or 'auto')"
        )
    if finetune == "auto":
        return "lora" if lora else "full"
    return finetune


def trainable(mode: Literal["full", "lora"]) -> nnx.filterlib.Filter:
    """The nnx filter of what trains: every `nnx.Param` ("full"), or LoRA + value head ("lora")."""
    if mode == "full":
        return nnx.Param
    if mode == "lora":
        return LORA
    raise ValueError(f"mode: expected 'full' or 'lora' (resolve 'auto' first), got {mode!r}")


__all__ = ["CRITIC", "LORA", "Finetune", "has_lora", "resolve_finetune", "trainable"]
