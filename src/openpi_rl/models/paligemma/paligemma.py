"""PaliGemma as openpi's Pi0-FAST assembles it (openpi `models/pi0_fast.py`): a SigLIP tower
`img` whose patch tokens join the prompt's token embeddings in the prefix of a Gemma decoder
`llm`.

Owns: `PaliGemmaConfig` (variants of both halves), the module holding `llm` and `img`, the
prefix (`embed_prefix`: each camera's image tokens with its image mask, then the prompt), the
attention mask from the autoregressive mask (`make_attn_mask`: prefix bidirectional, tokens
with ar_mask 1 causal), prefill and cached decoding, teacher-forced forward passes, and
openpi's decoding loop (`sample_tokens`, its `sample_actions` without the action tokenizer).
Checkpoint layout (`openpi_to_ours`, `param_shapes`) lives in `checkpoint.py`. The RL API and
the tokenizers sit on top of this, elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from openpi_rl.models.paligemma.gemma import (
    Gemma,
    GemmaConfig,
    KVCache,
    gemma_config,
    is_lora_param,
)
from openpi_rl.models.paligemma.siglip import SigLIP, SigLIPConfig, siglip_config

Array = jax.Array
PALIGEMMA_EOS_TOKEN = 1


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
    """gemma_variant / siglip_variant name the halves (see `gemma_config`, `siglip_config`);
    dtype is the compute dtype of both, param_dtype the weights'. `gemma_overrides` and
    `siglip_overrides` replace single fields (a tiny vocabulary, another image size); remat
    and scan apply to both (see `GemmaConfig`)."""

    gemma_variant: str = "gemma_2b"
    siglip_variant: str = "So400m/14"
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: bool = False
    scan: bool = True
    gemma_overrides: tuple[tuple[str, object], ...] = ()
    siglip_overrides: tuple[tuple[str, object], ...] = ()

    @property
    def _common(self) -> dict:
        return dict(
            dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, scan=self.scan
        )

    @property
    def gemma(self) -> GemmaConfig:
        return gemma_config(self.gemma_variant, **{**self._common, **dict(self.gemma_overrides)})

    @property
    def siglip(self) -> SigLIPConfig:
        overrides = {**self._common, **dict(self.siglip_overrides)}
        return siglip_config(self.siglip_variant, out_width=self.gemma.width, **overrides)

    def create(self, rng: Array) -> PaliGemma:
        return PaliGemma(self, rngs=nnx.Rngs(rng))

    def abstract(self) -> PaliGemma:
        """The module with `jax.ShapeDtypeStruct` leaves: nothing allocated (for 2.9B)."""
        return nnx.eval_shape(lambda: PaliGemma(self, rngs=nnx.Rngs(0)))


class PaliGemma(nnx.Module):
    """`img` (SigLIP) and `llm` (Gemma), named as in openpi's `PaliGemma` dict."""

    def __init__(self, config: PaliGemmaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.llm = Gemma(config.gemma, rngs=rngs)
        self.img = SigLIP(config.siglip, rngs=rngs)

    def embed_image(self, image: Array) -> Array:
        """image [B, H, W, 3] in [-1, 1] -> tokens [B, N, width]."""
        return self.img(image)

    def embed_tokens(self, tokens: Array) -> Array:
        """tokens int [B, T] -> [B, T, width]."""
        return self.llm.embed(tokens)

    def embed_prefix(
        self,
        images: Sequence[Array],
        image_masks: Sequence[Array],
        tokens: Array,
        token_mask: Array,
        token_ar_mask: Array,
    ) -> tuple[Array, Array, Array]:
        """openpi's `embed_inputs`: each image's tokens (valid where its mask [B] is, ar 0),
        then the tokens' embeddings with their masks. Returns (embeddings [B, S, width],
        input_mask bool [B, S], ar_mask int [B, S])."""
        embs, masks, ars = [], [], []
        for image, image_mask in zip(images, image_masks, strict=True):
            emb = self.embed_image(image)
            embs.append(emb)
            masks.append(jnp.broadcast_to(image_mask[:, None], emb.shape[:2]))
            ars.append(jnp.zeros(emb.shape[:2], jnp.int32))
        embs.append(self.embed_tokens(tokens))
        masks.append(token_mask.astype(bool))
        ars.append(token_ar_mask.astype(jnp.int32))
        return jnp.concatenate(embs, 1), jnp.concatenate(masks, 1), jnp.concatenate(ars, 1)

    def forward(
        self, x: Array, attn_mask: Array, positions: Array | None = None
    ) -> tuple[Array, Array]:
        """Teacher forcing over whole sequences: x [B, T, width], attn_mask bool [B, T, T],
        positions [B, T] (default 0..T-1, as openpi's `compute_loss`). Returns (logits
        [B, T, vocab], hidden [B, T, width] after the final norm)."""
        hidden, _ = self.llm.transformer(x, attn_mask, positions)
        return self.llm.logits(hidden), hidden

    def prefill(
        self, x: Array, attn_mask: Array, positions: Array, cache_size: int
    ) -> tuple[Array, KVCache]:
        """Run the prefix x [B, T, width] with attn_mask [B, T, T] at positions [B, T] and keep
        a cache of `cache_size` >= T positions. Returns (logits [B, 1, vocab] of the last
        position, the one decoding starts from, and the cache). openpi computes them at every
        prefix position and keeps the last: with PaliGemma's 257,152-token vocabulary that was
        most of a CPU call and 0.5 GiB per batch row on a GPU."""
        _b, t, _ = x.shape
        mask = jnp.pad(attn_mask, ((0, 0), (0, 0), (0, cache_size - t)))
        hidden, cache = self.llm.transformer(x, mask, positions)
        return self.llm.logits(hidden[:, -1:]), cache

    def decode_step(
        self, x: Array, positions: Array, mask: Array, cache: KVCache
    ) -> tuple[Array, KVCache]:
        """x [B, T, width] (usually T = 1) written after the cache's filled length; mask
        [B, T, S] over the whole cache. Returns (logits [B, T, vocab], cache)."""
        return self.llm(x, mask, positions, cache)


def _in_llm(path: tuple, _value=None) -> bool:
    return "llm" in (str(p) for p in path)


def frozen_filter(config: PaliGemmaConfig):
    """The nnx filter of parameters openpi's trainer freezes (`Pi0FASTConfig.get_freeze_filter`):
    with LoRA, the decoder's non-LoRA weights (SigLIP and the adapters train); without, none."""
    if config.gemma.lora_attn is None and config.gemma.lora_ffn is None:
        return nnx.Nothing
    return nnx.All(nnx.Param, _in_llm, nnx.Not(is_lora_param))


def make_attn_mask(input_mask: Array, ar_mask: Array) -> Array:
    """bool [B, N, N]: token i attends token j when both are valid and j's cumulative ar_mask
    is <= i's (big_vision's prefix-LM mask). ar_mask [B or 1, N]: 1 starts a new causal block,
    0 joins the previous one; all zeros is fully bidirectional, all ones is causal."""
    cumsum = jnp.cumsum(jnp.broadcast_to(ar_mask, input_mask.shape), axis=1)
    causal = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = input_mask[:, None, :] & input_mask[:, :, None]
    return causal & valid


def left_to_right_align(x: Array, input_mask: Array, attn_mask: Array):
    """Roll each row so its last valid token sits at the end (openpi pads prompts on the
    right; decoding appends after the prefix, so every row's prefix must end at the same
    index). x [B, S, ...], input_mask [B, S], attn_mask [B, S, S]."""

    def one(x, m, a):
        last = jnp.max(m * jnp.arange(m.shape[0])) + 1
        return jnp.roll(x, -last, 0), jnp.roll(m, -last, 0), jnp.roll(a, -last, (0, 1))

    return jax.vmap(one)(x, input_mask, attn_mask)


def sample_tokens(
    model: PaliGemma,
    rng: Array,
    prefix: Array,
    input_mask: Array,
    ar_mask: Array,
    max_decoding_steps: int,
    temperature: float = 0.0,
) -> Array:
    """openpi's Pi0-FAST decoding: prefill the aligned prefix, then sample (argmax when
    temperature is 0) one token at a time with the KV cache until every row has emitted EOS
    (token 1) or `max_decoding_steps` is reached. prefix [B, S, width], input_mask [B, S],
    ar_mask [B, S]. Returns tokens [B, max_decoding_steps] (float32 as openpi's, zeros after
    the stop).

    openpi's quirks, kept so its checkpoints decode as openpi decodes them: decoded token i
    sits at RoPE position prefill_len + 1 + i (one position skipped); the decode window starts
    at S - sum(input_mask), so a camera masked out in the middle of the prefix is attended by
    the decode steps (and as many leading valid slots are not), while the prefill itself uses
    the exact mask. `temperature` is a Python float (openpi's may be traced)."""
    attn_mask = make_attn_mask(input_mask, ar_mask)
    prefix, input_mask, attn_mask = left_to_right_align(prefix, input_mask, attn_mask)
    b, s, _ = prefix.shape
    prefill_len = jnp.sum(input_mask, axis=-1)
    prefix_start = s - prefill_len
    positions = jnp.cumsum(input_mask, axis=-1) - 1
    logits, cache = model.prefill(prefix, attn_mask, positions, s + max_decoding_steps)
    cache_pos = jnp.arange(s + max_decoding_steps)

    def step(carry):
        rng, last_logit, out, cache, _, i = carry
        rng, key = jax.random.split(rng)
        if temperature > 0.0:
            token = jax.random.categorical(key, last_logit / temperature, axis=-1)
        else:
            token = jnp.argmax(last_logit, axis=-1)
        out = out.at[:, i].set(token[:, 0].astype(out.dtype))
        all_eos = jnp.all(jnp.any(token == PALIGEMMA_EOS_TOKEN, axis=-1))
        mask = (cache_pos[None, None, :] >= prefix_start[:, None, None]) & (
            cache_pos[None, None, :] < s + i + 1
        )
        last_logit, cache = model.decode_step(
            model.embed_tokens(token), prefill_len[:, None] + i + 1, mask, cache
        )
        return rng, last_logit, out, cache, all_eos, i + 1

    def cond(carry):
        *_, all_eos, i = carry
        return (~all_eos) & (i < max_decoding_steps)

    out = jnp.zeros((b, max_decoding_steps), jnp.float32)
    init = (rng, logits[:, -1:], out, cache, jnp.array(False), jnp.array(0, jnp.int32))
    return jax.lax.while_loop(cond, step, init)[2]
