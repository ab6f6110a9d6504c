"""openpi's PaliGemma (SigLIP So400m/14 + Gemma 2B) in flax nnx, numerically as openpi's."""

from openpi_rl.models.paligemma.checkpoint import (
    load_openpi_params,
    openpi_to_ours,
    ours_to_openpi,
    param_count,
    param_shapes,
)
from openpi_rl.models.paligemma.gemma import (
    Gemma,
    GemmaConfig,
    KVCache,
    LoRAConfig,
    gemma_config,
    is_lora_param,
)
from openpi_rl.models.paligemma.paligemma import (
    PaliGemma,
    PaliGemmaConfig,
    frozen_filter,
    make_attn_mask,
    sample_tokens,
)
from openpi_rl.models.paligemma.siglip import SigLIP, SigLIPConfig, siglip_config

__all__ = [
    "Gemma",
    "GemmaConfig",
    "KVCache",
    "LoRAConfig",
    "PaliGemma",
    "PaliGemmaConfig",
    "SigLIP",
    "SigLIPConfig",
    "frozen_filter",
    "gemma_config",
    "is_lora_param",
    "load_openpi_params",
    "make_attn_mask",
    "openpi_to_ours",
    "ours_to_openpi",
    "param_count",
    "param_shapes",
    "sample_tokens",
    "siglip_config",
]
