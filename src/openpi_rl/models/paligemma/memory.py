"""How much accelerator memory a PaliGemma variant needs, for serving and for a PPO update.

Owns: `memory_estimate(variant, ...)`, from shapes only (`jax.eval_shape` of the module and of
its prefill: nothing is allocated, so `gemma_2b` is estimated in seconds on a laptop), and its
one-line summary for `openpi-rl check`.

What is counted (bytes; GiB = 2**30):
- params: every parameter of the module (`nnx.Param` leaves of `PaliGemmaConfig.abstract()`).
- serving: the weights in the serving dtype (openpi's policy loader restores them as bf16),
  the KV cache of a batch over `prefix + decode_steps` positions (the prefill's cache, from
  `jax.eval_shape` of `PaliGemma.prefill`), and the prefill's logits at the last prefix
  position (openpi's prefill computes them at every prefix position, 0.5 GiB per row with
  PaliGemma's vocabulary; decoding reads only the last).
- PPO update: the weights in `param_dtype`, one gradient and Adam's two moments (float32) for
  what trains (`frozen_filter`: with a `_lora` variant the decoder's base weights are frozen,
  LoRA adapters and all of SigLIP train; otherwise everything trains; `finetune="lora"`: the
  LoRA adapters only, `"full"`: everything; plus a value head's, if given), and an activations
  estimate for a minibatch: with per-layer remat (openpi's `nothing_saveable`), each layer's
  input of both towers is kept for the backward pass (depth x B x T x width in the compute
  dtype), plus the live working set of the one layer recomputed at a time (attention logits
  and probabilities, float32, and three MLP-hidden-sized tensors in the compute dtype), plus
  the float32 logits over the prompt and their gradient. XLA's own temporaries, the value
  head and the optimizer's update buffers are not counted: read it as a lower bound within a
  few GiB.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openpi_rl.models.paligemma.gemma import is_lora_param
from openpi_rl.models.paligemma.paligemma import PaliGemmaConfig, frozen_filter

# The SigLIP tower each Gemma variant is paired with (openpi: So400m/14 with gemma_2b; the
# small ones with the small towers of the same names; `mid` with `tiny`).
SIGLIP_FOR = {"gemma_2b": "So400m/14", "dummy": "dummy", "tiny": "tiny", "mid": "tiny"}
GIB = 2**30


def paligemma_variant_config(variant: str, **overrides) -> PaliGemmaConfig:
    """The PaliGemmaConfig of a variant name (`gemma_2b`, `gemma_2b_lora`, `dummy`, `tiny`,
    `mid`, and the small ones' `_lora` forms). ValueError for another name."""
    base = variant.removesuffix("_lora")
    if base not in SIGLIP_FOR:
        names = sorted([*SIGLIP_FOR, *(f"{b}_lora" for b in SIGLIP_FOR)])
        raise ValueError(f"paligemma variant: expected one of {names}, got {variant!r}")
    return PaliGemmaConfig(variant, SIGLIP_FOR[base], **overrides)


def _bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    variant: str
    params: int  # parameter count
    trainable: int  # what a PPO update trains (frozen_filter)
    prefix_len: int  # images x patches + prompt tokens
    serve_batch: int
    serve_positions: int  # KV cache length: prefix + decode steps
    serve_dtype: str
    serve_weights_bytes: int
    serve_kv_cache_bytes: int
    serve_logits_bytes: int
    train_batch: int
    train_param_dtype: str
    train_weights_bytes: int
    train_grads_bytes: int
    train_adam_bytes: int
    train_activations_bytes: int

    @property
    def serve_bytes(self) -> int:
        return self.serve_weights_bytes + self.serve_kv_cache_bytes + self.serve_logits_bytes

    @property
    def train_bytes(self) -> int:
        return (
            self.train_weights_bytes
            + self.train_grads_bytes
            + self.train_adam_bytes
            + self.train_activations_bytes
        )

    def summary(self) -> str:
        def g(b: int) -> str:
            return f"{b / GIB:.2f} GiB" if b >= GIB // 4 else f"{b / 2**20:.1f} MiB"

        return (
            f"paligemma {self.variant}: {self.params:,} params; "
            f"serving batch {self.serve_batch} ({self.serve_dtype} weights, "
            f"{self.serve_positions}-position KV cache): {g(self.serve_bytes)} "
            f"(weights {g(self.serve_weights_bytes)} + KV cache "
            f"{g(self.serve_kv_cache_bytes)} + prefill logits {g(self.serve_logits_bytes)}); "
            f"PPO update minibatch {self.train_batch} (trains {self.trainable:,}): "
            f"{g(self.train_bytes)} (weights {g(self.train_weights_bytes)} + grads "
            f"{g(self.train_grads_bytes)} + Adam {g(self.train_adam_bytes)} + activations "
            f"~{g(self.train_activations_bytes)})"
        )


def memory_estimate(
    variant: str | PaliGemmaConfig,
    *,
    serve_batch: int = 1,
    train_batch: int = 8,
    num_images: int = 3,
    prompt_len: int = 250,
    decode_steps: int = 256,
    dtype: str = "bfloat16",
    serve_dtype: str = "bfloat16",
    param_dtype: str = "float32",
    finetune: str | None = None,
    value_head_params: int = 0,
) -> MemoryEstimate:
    """The memory a variant needs (see the module docstring for what is counted). Defaults
    are openpi's Pi0-FAST: 3 cameras, `max_token_len` 250 prompt tokens (text, state and
    action tokens), 256 decoding steps, bf16 compute, float32 weights for training, bf16 for
    serving; `lora` is the variant's (`gemma_2b_lora`). `variant` may be a PaliGemmaConfig
    (a model's own, with its overrides): then its dtype and param_dtype are used.
    `finetune`: what a PPO update trains; None: openpi's trainer's choice (`frozen_filter`),
    "full": every parameter, "lora": the LoRA adapters only (ValueError for a variant without
    them). `value_head_params`: a critic's float32 parameters, trained too."""
    if isinstance(variant, PaliGemmaConfig):
        config = variant
        dtype, param_dtype, variant = config.dtype, config.param_dtype, config.gemma_variant
        serve_config = dataclasses.replace(config, param_dtype=serve_dtype)
    else:
        config = paligemma_variant_config(variant, dtype=dtype, param_dtype=param_dtype)
        serve_config = paligemma_variant_config(variant, dtype=dtype, param_dtype=serve_dtype)
    model = config.abstract()
    freeze = {
        None: frozen_filter(config),
        "full": nnx.Nothing,
        "lora": nnx.All(nnx.Param, nnx.Not(is_lora_param)),
    }
    if finetune not in freeze:
        raise ValueError(f"finetune: expected 'full' or 'lora', got {finetune!r}")
    frozen, trainable = nnx.state(model, freeze[finetune], nnx.Param)
    if finetune == "lora" and not _count(trainable):
        raise ValueError(f"finetune 'lora': {variant} has no LoRA adapters (a _lora variant has)")
    params = _count(frozen) + _count(trainable)
    g, s = config.gemma, config.siglip
    patches = (s.image_size // s.patch_size) ** 2
    prefix = num_images * patches + prompt_len
    positions = prefix + decode_steps

    graphdef, state = nnx.split(serve_config.abstract())
    sds = jax.ShapeDtypeStruct
    logits, cache = jax.eval_shape(
        lambda st, x, m, p: nnx.merge(graphdef, st).prefill(x, m, p, positions),
        state,
        sds((serve_batch, prefix, g.width), jnp.dtype(dtype)),
        sds((serve_batch, prefix, prefix), jnp.bool_),
        sds((serve_batch, prefix), jnp.int32),
    )

    item = np.dtype(jnp.dtype(dtype)).itemsize
    b, t = train_batch, prefix
    saved = b * t * g.width * g.depth + b * num_images * patches * s.width * s.depth
    gemma_layer = 2 * b * g.num_heads * t * t * 4 + 3 * b * t * g.mlp_dim * item
    siglip_layer = (
        2 * b * num_images * s.num_heads * patches * patches * 4
        + 3 * b * num_images * patches * s.mlp_dim * item
    )
    prompt_logits = 2 * b * prompt_len * g.vocab_size * 4
    activations = saved * item + max(gemma_layer, siglip_layer) + prompt_logits
    trains = _count(trainable) + value_head_params
    return MemoryEstimate(
        variant=variant,
        params=params,
        trainable=trains,
        prefix_len=prefix,
        serve_batch=serve_batch,
        serve_positions=positions,
        serve_dtype=serve_dtype,
        serve_weights_bytes=_bytes(nnx.state(serve_config.abstract(), nnx.Param)),
        serve_kv_cache_bytes=_bytes((cache.k, cache.v)),
        serve_logits_bytes=_bytes(logits),
        train_batch=train_batch,
        train_param_dtype=param_dtype,
        train_weights_bytes=_bytes(frozen) + _bytes(trainable) + value_head_params * 4,
        train_grads_bytes=trains * 4,
        train_adam_bytes=2 * trains * 4,
        train_activations_bytes=int(activations),
    )
