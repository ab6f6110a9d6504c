"""Small network pieces shared by the critic and the baseline policy."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openpi_rl.rl.rl_api import Array


def orthogonal(scale: float) -> Callable[..., Array]:
    """Orthogonal kernel init (Saxe et al. 2014), the PPO default of SB3 and CleanRL.

    With a concrete key it runs in NumPy: jax's version compiles a QR decomposition per
    kernel shape, about 0.3 s each on a CPU, which dominated a small model's start-up. Under
    tracing (jit, eval_shape) it is jax's own initializer.
    """
    traced_init = nnx.initializers.orthogonal(scale)

    def init(key: Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> Array:
        if isinstance(key, jax.core.Tracer) or len(shape) != 2:
            return traced_init(key, shape, dtype)
        seed = np.asarray(jax.random.key_data(key)).ravel()
        rows, cols = shape
        a = np.random.default_rng(seed).standard_normal((max(shape), min(shape)))
        q, r = np.linalg.qr(a)
        q *= np.sign(np.diag(r))  # makes the distribution uniform (Haar)
        return jnp.asarray(scale * (q if rows >= cols else q.T), dtype)

    return init


class MLP(nnx.Module):
    """sizes[0] -> ... -> sizes[-1] with tanh between layers; orthogonal init with gain sqrt(2)
    on hidden layers and `out_scale` on the last (0.01 for a policy mean, 1 for a value)."""

    def __init__(self, sizes: tuple[int, ...], out_scale: float, rngs: nnx.Rngs):
        n = len(sizes) - 1
        self.layers = nnx.List(
            [
                nnx.Linear(
                    sizes[i],
                    sizes[i + 1],
                    kernel_init=orthogonal(out_scale if i == n - 1 else math.sqrt(2.0)),
                    rngs=rngs,
                )
                for i in range(n)
            ]
        )

    def __call__(self, x: Array) -> Array:
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)
