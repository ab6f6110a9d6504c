"""The Gemma decoder as openpi's Pi0-FAST uses it (openpi `models/gemma_fast.py`, `lora.py`).

Owns: the decoder's config and variants, its layers (RMSNorm, RoPE, multi-query attention with
a KV cache, GeGLU feed-forward, rank-16 LoRA for `gemma_2b_lora`) and its forward passes.
Written from reading openpi's code, not copied; numerics follow it step by step:

- Embeddings are looked up in the weights' dtype, scaled by sqrt(width) in that dtype, then
  cast to the compute dtype; logits are `hidden @ table.T` (tied), promoted like openpi's.
- RMSNorm: variance in float32, eps 1e-6 (openpi ignores `norm_eps`), scale `1 + w`.
- Attention: RoPE in float32 (max wavelength 10k, halves rotated), q scaled by head_dim^-0.5,
  k and v stored in the cache in the compute dtype, logits in float32, masked with -2.38e38,
  softmax in float32 then cast to the compute dtype.
- LoRA on attention adds `(x a) b * alpha / rank`; on the FFN it adds `(x a) b` unscaled.
  openpi's attention-output LoRA sums its `b` over heads (its einsum drops the head axis);
  we do the same, so its LoRA checkpoints mean the same thing here.

The parameter tree is named as openpi's (`embedder/input_embedding`, `layers/attn/q_einsum/w`,
`layers/mlp/gating_einsum`, `final_norm/scale`, ...), with the layers stacked along a leading
axis as openpi's `nn.scan` stacks them, so a checkpoint's `PaliGemma/llm` subtree loads as is.
Initialisation differs from openpi's where openpi's would make a from-scratch model degenerate
(its embedding table starts at zero) and for LoRA's `b` (zero here, so LoRA at init leaves the
loaded model unchanged; openpi draws it from N(0, 0.01)).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# openpi's (and Gemma's) masked-logit value: finite, so a fully masked row stays finite.
BIG_NEG = -2.3819763e38
RMS_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021): W + (alpha / rank) A B, B starting at zero."""

    rank: int = 16
    alpha: float = 16.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Shapes of a Gemma decoder and the dtypes it computes in.

    dtype: compute dtype (openpi's `embed_dtype` and `cache_dtype`, its Pi0-FAST `dtype`).
    param_dtype: the weights' dtype (openpi stores float32; bf16 checkpoints exist).
    remat: recompute each layer in the backward pass (openpi's "nothing_saveable").
    scan: run the layers as one `lax.scan` (openpi's `nn.scan`: one layer compiled); False
    unrolls them (the same stacked weights: a small model's backward pass is about twice as
    fast on a CPU).
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    lora_attn: LoRAConfig | None = None
    lora_ffn: LoRAConfig | None = None
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: bool = False
    scan: bool = True

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads: expected a multiple of num_kv_heads={self.num_kv_heads}, "
                f"got {self.num_heads}"
            )

    def create(self, rng: Array) -> Gemma:
        return Gemma(self, rngs=nnx.Rngs(rng))


GemmaVariant = Literal[
    "gemma_2b", "gemma_2b_lora", "dummy", "dummy_lora", "tiny", "tiny_lora", "mid", "mid_lora"
]

_PALIGEMMA_VOCAB = 257_152
_LORA = LoRAConfig(rank=16, alpha=16.0)

# openpi's two variants, and small ones of the same architecture (multi-query attention,
# GeGLU, tied embeddings) for CPU tests; their vocabulary is small so logits stay cheap.
_SHAPES: dict[str, dict] = {
    "gemma_2b": dict(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256, vocab_size=_PALIGEMMA_VOCAB),
    "dummy": dict(width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=32, vocab_size=512),
    "tiny": dict(width=128, depth=2, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=32, vocab_size=1024),
    "mid": dict(width=512, depth=6, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64, vocab_size=_PALIGEMMA_VOCAB),
}  # fmt: skip


def gemma_config(variant: str, **overrides) -> GemmaConfig:
    """openpi's `gemma_2b` / `gemma_2b_lora`, or a small variant (`dummy`, `tiny`, `mid`, and
    their `_lora` forms); `overrides` replace fields (e.g. `dtype="float32"`, `vocab_size`)."""
    base, lora = (variant[: -len("_lora")], True) if variant.endswith("_lora") else (variant, False)
    if base not in _SHAPES:
        names = sorted([*_SHAPES, *(f"{s}_lora" for s in _SHAPES)])
        raise ValueError(f"variant: expected one of {names}, got {variant!r}")
    kw = dict(_SHAPES[base])
    if lora:
        kw.update(lora_attn=_LORA, lora_ffn=_LORA)
    kw.update(overrides)
    return GemmaConfig(**kw)


class KVCache(NamedTuple):
    """Keys and values of every layer: k, v [depth, B, S, K, H] in the compute dtype; `length`:
    int32 scalar, how many positions are filled (the next write index). S is fixed at prefill
    (prefix length + decoding steps), so decoding never changes a shape."""

    k: Array
    v: Array
    length: Array


def apply_rope(x: Array, positions: Array, max_wavelength: float = 10_000.0) -> Array:
    """Rotary position embedding (Su et al. 2021) as Gemma applies it: the first half of the
    head dims rotates against the second half. x [B, T, N, H], positions [B, T] -> float32."""
    half = x.shape[-1] // 2
    freq_exponents = (2.0 / x.shape[-1]) * jnp.arange(half, dtype=jnp.float32)
    timescale = max_wavelength**freq_exponents
    radians = (positions[..., None] / timescale)[..., None, :]  # [B, T, 1, H/2]
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _lora_equations(eqn: str) -> tuple[str, str]:
    """Split `x,w->y` into `x,a->z` and `z,b->y`, `a` replacing w's last axis and `b` its
    second-to-last by a rank axis L (openpi `lora.Einsum._make_lora_eqns`)."""
    m = re.fullmatch(r"(.*),(.*)->(.*)", eqn)
    if m is None or "L" in eqn:
        raise ValueError(f"eqn: expected 'x,w->y' without the label L, got {eqn!r}")
    lhs, rhs, out = m.groups()
    a_label, b_label = rhs[-2], rhs[-1]
    a_out = out.replace(b_label, "L")
    return (
        f"{lhs},{rhs.replace(b_label, 'L')}->{a_out}",
        f"{a_out},{rhs.replace(a_label, 'L')}->{out}",
    )


class Einsum(nnx.Module):
    """A weight `w` used through an einsum, with optional LoRA `lora_a`, `lora_b`."""

    def __init__(
        self,
        shape: tuple[int, ...],
        batch_axis: tuple[int, ...],
        lora: LoRAConfig | None,
        param_dtype: str,
        *,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=batch_axis)
        self.w = nnx.Param(init(rngs.params(), shape, param_dtype))
        self.lora = lora
        if lora is not None:
            shape_a = (*shape[:-1], lora.rank)
            shape_b = (*shape[:-2], lora.rank, shape[-1])
            a = 0.01 * jax.random.normal(rngs.params(), shape_a)
            self.lora_a = nnx.Param(a.astype(param_dtype))
            self.lora_b = nnx.Param(jnp.zeros(shape_b, param_dtype))

    def __call__(self, eqn: str, x: Array) -> Array:
        y = jnp.einsum(eqn, x, self.w[...].astype(x.dtype))
        if self.lora is not None:
            eqn_a, eqn_b = _lora_equations(eqn)
            z = jnp.einsum(eqn_a, x, self.lora_a[...].astype(x.dtype))
            y = y + jnp.einsum(eqn_b, z, self.lora_b[...].astype(x.dtype)) * self.lora.scaling
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, param_dtype: str):
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: Array) -> Array:
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        normed = x * jnp.reciprocal(jnp.sqrt(var + RMS_EPS))
        return (normed * (1 + self.scale[...])).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-query (or grouped / multi-head) attention writing into a KV cache."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        if c.num_kv_heads == c.num_heads:
            shape = (3, c.num_heads, c.width, c.head_dim)
            self.qkv_einsum = Einsum(shape, (0, 1), c.lora_attn, c.param_dtype, rngs=rngs)
        else:
            q_shape = (c.num_heads, c.width, c.head_dim)
            self.q_einsum = Einsum(q_shape, (0,), c.lora_attn, c.param_dtype, rngs=rngs)
            kv_shape = (2, c.num_kv_heads, c.width, c.head_dim)
            self.kv_einsum = Einsum(kv_shape, (0, 1), c.lora_attn, c.param_dtype, rngs=rngs)
        out_shape = (c.num_heads, c.head_dim, c.width)
        self.attn_vec_einsum = Einsum(out_shape, (0,), c.lora_attn, c.param_dtype, rngs=rngs)

    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Array,
        cache: tuple[Array, Array] | None,
        length: Array | None,
    ) -> tuple[Array, tuple[Array, Array]]:
        """x [B, T, D], positions [B, T], mask [B, T, S] (True: may attend). Without a cache,
        k and v are padded to S and become the cache; with one (k, v [B, S, K, H]) they are
        written at `length`. Returns (y [B, T, D], (k, v))."""
        dtype = x.dtype
        if self.num_kv_heads == self.num_heads:
            q, k, v = self.qkv_einsum("BSD,3KDH->3BSKH", x)
        else:
            q = self.q_einsum("BTD,NDH->BTNH", x)
            k, v = self.kv_einsum("BSD,2KDH->2BSKH", x)
        q = apply_rope(q, positions) * self.head_dim**-0.5
        k = apply_rope(k, positions).astype(dtype)
        v = v.astype(dtype)
        if cache is None:
            pad = ((0, 0), (0, mask.shape[-1] - k.shape[1]), (0, 0), (0, 0))
            k, v = jnp.pad(k, pad), jnp.pad(v, pad)
        else:
            start = (0, length, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k, start)
            v = jax.lax.dynamic_update_slice(cache[1], v, start)
        b, t = q.shape[:2]
        if mask.shape != (b, t, k.shape[1]):
            raise ValueError(
                f"mask: expected [B, T, S] = {[b, t, k.shape[1]]}, got {list(mask.shape)}"
            )
        q = q.reshape(b, t, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(mask[:, None, None], logits, BIG_NEG)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        enc = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, self.num_heads, self.head_dim)
        return self.attn_vec_einsum("BTNH,NHD->BTD", enc), (k, v)


class FeedForward(nnx.Module):
    """GeGLU (Shazeer 2020): linear(gelu(x W0) * (x W1)), tanh-approximate gelu."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        c = config
        init_g = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        init_l = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1)
        self.gating_einsum = nnx.Param(
            init_g(rngs.params(), (2, c.width, c.mlp_dim), c.param_dtype)
        )
        self.linear = nnx.Param(init_l(rngs.params(), (c.mlp_dim, c.width), c.param_dtype))
        self.lora = c.lora_ffn
        if c.lora_ffn is not None:
            r, dt = c.lora_ffn.rank, c.param_dtype

            def small(shape):
                return (0.01 * jax.random.normal(rngs.params(), shape)).astype(dt)

            self.gating_einsum_lora_a = nnx.Param(small((2, c.width, r)))
            self.gating_einsum_lora_b = nnx.Param(jnp.zeros((2, r, c.mlp_dim), dt))
            self.linear_lora_a = nnx.Param(small((c.mlp_dim, r)))
            self.linear_lora_b = nnx.Param(jnp.zeros((r, c.width), dt))

    def _dot(self, x: Array, w: Array, lora: tuple[Array, Array] | None) -> Array:
        y = jnp.dot(x, w.astype(x.dtype))
        if lora is not None:
            y = y + jnp.dot(jnp.dot(x, lora[0].astype(x.dtype)), lora[1].astype(x.dtype))
        return y

    def __call__(self, x: Array) -> Array:
        g = self.gating_einsum[...]
        if self.lora is not None:
            ga, gb = self.gating_einsum_lora_a[...], self.gating_einsum_lora_b[...]
            lora_0, lora_1 = (ga[0], gb[0]), (ga[1], gb[1])
            lora_out = (self.linear_lora_a[...], self.linear_lora_b[...])
        else:
            lora_0 = lora_1 = lora_out = None
        gate = jax.nn.gelu(self._dot(x, g[0], lora_0), approximate=True)
        return self._dot(gate * self._dot(x, g[1], lora_1), self.linear[...], lora_out)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(.))."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        self.pre_attention_norm = RMSNorm(config.width, config.param_dtype)
        self.attn = Attention(config, rngs=rngs)
        self.pre_ffw_norm = RMSNorm(config.width, config.param_dtype)
        self.mlp = FeedForward(config, rngs=rngs)

    def __call__(self, x, positions, mask, cache, length):
        y, kv = self.attn(self.pre_attention_norm(x), positions, mask, cache, length)
        x = x + y
        return x + self.mlp(self.pre_ffw_norm(x)), kv


class Embedder(nnx.Module):
    def __init__(self, vocab_size: int, width: int, param_dtype: str, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=width**-0.5)
        self.input_embedding = nnx.Param(init(rngs.params(), (vocab_size, width), param_dtype))

    def encode(self, tokens: Array) -> Array:
        x = self.input_embedding[...][tokens]
        return x * jnp.sqrt(self.input_embedding[...].shape[-1]).astype(x.dtype)

    def decode(self, x: Array) -> Array:
        return jnp.dot(x, self.input_embedding[...].T)


class Gemma(nnx.Module):
    """The decoder: `embed` tokens, run `transformer` over embeddings (with or without a
    cache), `logits` from its output. openpi's `gemma_fast.Module` in three calls."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embedder = Embedder(config.vocab_size, config.width, config.param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=config.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return Block(config, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(config.width, config.param_dtype)

    def embed(self, tokens: Array) -> Array:
        """tokens int [B, T] -> [B, T, width] in the compute dtype (openpi's `embed_only`)."""
        return self.embedder.encode(tokens).astype(self.config.dtype)

    def logits(self, hidden: Array) -> Array:
        """hidden [B, T, width] (after the final norm) -> logits [B, T, vocab]."""
        return self.embedder.decode(hidden)

    def transformer(
        self,
        x: Array,
        mask: Array,
        positions: Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Array, KVCache]:
        """x [B, T, width] embeddings, mask [B, T, S] bool, positions int [B, T] (default
        0..T-1). Without `cache`, S >= T sets the cache size and the result's cache holds these
        T positions; with one, the T new positions are written after `cache.length`.
        Returns (hidden [B, T, width] after the final norm, cache)."""
        x = x.astype(self.config.dtype)
        b, t, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        length = None if cache is None else cache.length
        graphdef, state = nnx.split(self.layers)

        def body(x, xs):
            layer_state, kv = xs
            layer = nnx.merge(graphdef, layer_state)
            return layer(x, positions, mask, kv, length)

        if self.config.remat:
            body = jax.checkpoint(
                body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable
            )
        kv_in = None if cache is None else (cache.k, cache.v)
        x, (k, v) = jax.lax.scan(body, x, (state, kv_in), unroll=not self.config.scan)
        new_length = jnp.asarray(t, jnp.int32) if cache is None else cache.length + t
        return self.final_norm(x), KVCache(k, v, new_length)

    def __call__(self, x, mask, positions=None, cache=None) -> tuple[Array, KVCache]:
        """Logits [B, T, vocab] and the cache; see `transformer`."""
        hidden, cache = self.transformer(x, mask, positions, cache)
        return self.logits(hidden), cache


def is_lora_param(path: tuple, _value=None) -> bool:
    """True for a LoRA parameter's path (openpi trains only these in `gemma_2b_lora`)."""
    return any("lora" in str(p) for p in path)
