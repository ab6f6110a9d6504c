"""The SigLIP vision tower as openpi's Pi0-FAST uses it (openpi `models/siglip.py`, from
big_vision's ViT): So400m/14, learned position embeddings, no pooling, every patch token
projected by `head` to the decoder's width.

Owns: the tower's config and variants and its forward pass, image [B, H, W, 3] in [-1, 1] ->
tokens [B, (H/p)(W/p), out_width]. Written from reading openpi's code, not copied; numerics
follow it: patch embedding and position embedding in float32, then the compute dtype;
LayerNorm statistics in float32 (eps 1e-6, variance as E[x^2] - E[x]^2, as flax's); attention
queries scaled by head_dim^-0.5 before q.k, softmax in the compute dtype; tanh-gelu MLP.

The parameter tree is named as openpi's linen modules name theirs (`embedding/kernel`,
`pos_embedding`, `Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel`,
`Transformer/encoder_norm`, `head`), the blocks stacked along a leading axis as openpi's
`nn.scan` stacks them, so a checkpoint's `PaliGemma/img` subtree loads as is.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
    """A ViT without pooling. out_width: the decoder's width (openpi's `num_classes`); scan:
    the blocks as one `lax.scan`, or unrolled (as `GemmaConfig.scan`)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    out_width: int
    image_size: int = 224
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: bool = False
    scan: bool = True

    def __post_init__(self):
        if self.image_size % self.patch_size or self.width % self.num_heads:
            raise ValueError(
                f"image_size {self.image_size} / patch_size {self.patch_size} and width "
                f"{self.width} / num_heads {self.num_heads}: expected whole numbers"
            )

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def create(self, rng: Array) -> SigLIP:
        return SigLIP(self, rngs=nnx.Rngs(rng))


SigLIPVariant = Literal["So400m/14", "dummy", "tiny"]

# So400m/14: Table 2 of Alabdulmohsin et al. 2023 (arXiv 2305.13035), as openpi decodes it.
_SHAPES: dict[str, dict] = {
    "So400m/14": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, image_size=224),
    "dummy": dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=14, image_size=56),
    "tiny": dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=14, image_size=56),
}  # fmt: skip


def siglip_config(variant: str, out_width: int, **overrides) -> SigLIPConfig:
    """`So400m/14` (openpi's), or a small tower of the same kind (`dummy`, `tiny`: 56x56
    images, 16 tokens); `overrides` replace fields (e.g. `image_size=224`)."""
    if variant not in _SHAPES:
        raise ValueError(f"variant: expected one of {sorted(_SHAPES)}, got {variant!r}")
    return SigLIPConfig(**{**_SHAPES[variant], "out_width": out_width, **overrides})


class Dense(nnx.Module):
    """A kernel contracting the input's last `n_in` axes, and a bias (flax's DenseGeneral)."""

    def __init__(self, in_shape, out_shape, param_dtype, *, rngs, kernel_init=None, bias_init=None):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        kernel_init = kernel_init or nnx.initializers.xavier_uniform(
            in_axis=tuple(range(len(in_shape))),
            out_axis=tuple(range(len(in_shape), len(in_shape) + len(out_shape))),
        )
        bias_init = bias_init or nnx.initializers.zeros_init()
        self.kernel = nnx.Param(kernel_init(rngs.params(), in_shape + out_shape, param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), out_shape, param_dtype))
        self.n_in = len(in_shape)

    def __call__(self, x: Array, dtype) -> Array:
        kernel, bias = self.kernel[...].astype(dtype), self.bias[...].astype(dtype)
        x = x.astype(dtype)
        axes = tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))
        return jax.lax.dot_general(x, kernel, (axes, ((), ()))) + bias


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, param_dtype: str):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: Array, dtype) -> Array:
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.maximum(0.0, jnp.mean(jnp.square(xf), axis=-1, keepdims=True) - mean**2)
        y = (x - mean) * (jax.lax.rsqrt(var + LN_EPS) * self.scale[...])
        return (y + self.bias[...]).astype(dtype)


class MultiHeadDotProductAttention(nnx.Module):
    def __init__(self, c: SigLIPConfig, *, rngs: nnx.Rngs):
        head_dim = c.width // c.num_heads
        heads = (c.num_heads, head_dim)
        self.query = Dense((c.width,), heads, c.param_dtype, rngs=rngs)
        self.key = Dense((c.width,), heads, c.param_dtype, rngs=rngs)
        self.value = Dense((c.width,), heads, c.param_dtype, rngs=rngs)
        self.out = Dense(heads, (c.width,), c.param_dtype, rngs=rngs)

    def __call__(self, x: Array, dtype) -> Array:
        q, k, v = self.query(x, dtype), self.key(x, dtype), self.value(x, dtype)
        q = q / jnp.sqrt(q.shape[-1]).astype(dtype)
        probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k)).astype(dtype)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", probs, v), dtype)


class MlpBlock(nnx.Module):
    def __init__(self, c: SigLIPConfig, *, rngs: nnx.Rngs):
        bias_init = nnx.initializers.normal(stddev=1e-6)
        self.Dense_0 = Dense(
            (c.width,), (c.mlp_dim,), c.param_dtype, rngs=rngs, bias_init=bias_init
        )
        self.Dense_1 = Dense(
            (c.mlp_dim,), (c.width,), c.param_dtype, rngs=rngs, bias_init=bias_init
        )

    def __call__(self, x: Array, dtype) -> Array:
        return self.Dense_1(jax.nn.gelu(self.Dense_0(x, dtype), approximate=True), dtype)


class Encoder1DBlock(nnx.Module):
    """Pre-norm block: x + attn(ln(x)), then + mlp(ln(.))."""

    def __init__(self, c: SigLIPConfig, *, rngs: nnx.Rngs):
        self.LayerNorm_0 = LayerNorm(c.width, c.param_dtype)
        self.MultiHeadDotProductAttention_0 = MultiHeadDotProductAttention(c, rngs=rngs)
        self.LayerNorm_1 = LayerNorm(c.width, c.param_dtype)
        self.MlpBlock_0 = MlpBlock(c, rngs=rngs)

    def __call__(self, x: Array, dtype) -> Array:
        x = x + self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x, dtype), dtype)
        return x + self.MlpBlock_0(self.LayerNorm_1(x, dtype), dtype)


class Encoder(nnx.Module):
    def __init__(self, c: SigLIPConfig, *, rngs: nnx.Rngs):
        self.config = c

        @nnx.split_rngs(splits=c.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Encoder1DBlock(c, rngs=rngs)

        self.encoderblock = make_blocks(rngs)
        self.encoder_norm = LayerNorm(c.width, c.param_dtype)

    def __call__(self, x: Array) -> Array:
        dtype = self.config.dtype
        graphdef, state = nnx.split(self.encoderblock)

        def body(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, dtype), None

        if self.config.remat:
            body = jax.checkpoint(
                body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable
            )
        x, _ = jax.lax.scan(body, x, state, unroll=not self.config.scan)
        return self.encoder_norm(x, dtype)


class SigLIP(nnx.Module):
    def __init__(self, config: SigLIPConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        p = c.patch_size
        self.embedding = nnx.Conv(
            3, c.width, (p, p), (p, p), padding="VALID", dtype=jnp.float32,
            param_dtype=c.param_dtype, rngs=rngs,
        )  # fmt: skip
        init = nnx.initializers.normal(stddev=c.width**-0.5)
        self.pos_embedding = nnx.Param(
            init(rngs.params(), (1, c.num_tokens, c.width), c.param_dtype)
        )
        self.Transformer = Encoder(c, rngs=rngs)
        # openpi zero-initialises the head (`head_zeroinit`): image tokens start at zero.
        zeros = nnx.initializers.zeros_init()
        self.head = Dense((c.width,), (c.out_width,), c.param_dtype, rngs=rngs, kernel_init=zeros)

    def __call__(self, image: Array) -> Array:
        """image [B, H, W, 3] in [-1, 1] -> tokens [B, (H/p)(W/p), out_width] (compute dtype)."""
        c = self.config
        if image.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(
                f"image: expected [B, {c.image_size}, {c.image_size}, 3], got {list(image.shape)}"
            )
        x = self.embedding(jnp.asarray(image, jnp.float32))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = (x + self.pos_embedding[...].astype(jnp.float32)).astype(c.dtype)
        return self.head(self.Transformer(x), c.dtype)
