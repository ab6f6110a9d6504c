"""Action tokenizers for token policies (Pi0FAST-style): action chunks <-> fixed-length int ids.

A token policy samples ids and `decode`s them into a chunk inside its jitted function, so both
tokenizers are pure jnp with static shapes: `encode` maps float [B, H, D] to int32
[B, num_tokens], `decode` maps int32 [B, num_tokens] (plus an optional `num_valid` [B]) back to
float32 [B, H, D]. Actions are assumed normalised to about [-1, 1] per dim, as openpi
normalises them; values outside [low, high] are clipped.

- `BinningTokenizer`: one uniform bin id per action value (RT-2 / naive Pi0FAST baseline).
- `FASTTokenizer`: quantised DCT coefficients (Pertsch et al. 2025, "FAST: Efficient Action
  Tokenization for Vision-Language-Action Models"), without the BPE stage: no training data to
  fit a vocabulary, and a fixed length keeps shapes static. Coefficients are ordered
  low-frequency first, so a truncated sequence decodes to a smoothed chunk.

`decode` never raises on the serving path for ids of the right shape: ids outside
[0, vocab_size) are clipped into range, and positions at or past `num_valid` read as padding
(a zero DCT coefficient, or the 0.0 action for binning). End-of-actions is the model's job.

Each tokenizer jits its own `encode`/`decode` once: an eager call (tests, the policy server's
numpy path) compiles once per batch size instead of once per op, and inside a caller's
`jax.jit` the inner jit simply inlines.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# H is small (<= a few hundred), so a full-precision matmul costs nothing; the default GPU/TPU
# precision (TF32 / bf16 passes) would perturb coefficients near a rounding boundary.
_PRECISION = jax.lax.Precision.HIGHEST


@runtime_checkable
class ActionTokenizer(Protocol):
    """What a token policy needs from a tokenizer; ids are 0 .. vocab_size - 1."""

    vocab_size: int
    num_tokens: int
    action_horizon: int
    action_dim: int
    max_abs_error: float

    def encode(self, actions: Array) -> Array:
        """actions float [B, H, D] -> int32 tokens [B, num_tokens]."""
        ...

    def decode(self, tokens: Array, num_valid: Array | None = None) -> Array:
        """int32 tokens [B, num_tokens] (num_valid [B] or None) -> float32 actions [B, H, D]."""
        ...


def dct_basis(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix [n, n] (float64): `coeffs = basis @ x` along the time axis.

    Row k is frequency k; equals `scipy.fft.dct(x, type=2, norm="ortho")`. Orthonormal, so the
    inverse (DCT-III) is `basis.T`.
    """
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    k = np.arange(n)[:, None]
    t = np.arange(n)[None, :]
    basis = np.cos(np.pi * k * (2 * t + 1) / (2 * n)) * np.sqrt(2.0 / n)
    basis[0] *= np.sqrt(0.5)
    return basis


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def _check_range(low: float, high: float) -> None:
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"low, high: expected finite low < high, got low={low}, high={high}")


def _as_actions(actions: Any, horizon: int, dim: int) -> Array:
    """Check the static shape [B, H, D] and cast to float32."""
    actions = jnp.asarray(actions)
    if actions.ndim != 3 or actions.shape[1:] != (horizon, dim):
        raise ValueError(
            f"actions: expected float [B, {horizon}, {dim}], got {actions.dtype} "
            f"{list(actions.shape)}"
        )
    return actions.astype(jnp.float32)


def _as_tokens(tokens: Any, num_tokens: int) -> Array:
    """Check the static shape [B, num_tokens] and cast to int32 (floats are truncated)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != num_tokens:
        raise ValueError(
            f"tokens: expected int32 [B, {num_tokens}], got {tokens.dtype} {list(tokens.shape)}"
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        # A float array (e.g. from a logits argmax cast) must not raise; NaN becomes 0 here.
        tokens = jnp.nan_to_num(tokens.astype(jnp.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return tokens.astype(jnp.int32)


def _padding_mask(num_valid: Array | None, batch: int, num_tokens: int) -> Array | None:
    """[B, num_tokens] True where a position is padding (index >= num_valid[b]); None if none.

    num_valid: [B] or a scalar; any int (negative -> all padding, > num_tokens -> none).
    """
    if num_valid is None:
        return None
    num_valid = jnp.broadcast_to(jnp.asarray(num_valid).astype(jnp.int32).reshape(-1), (batch,))
    return jnp.arange(num_tokens, dtype=jnp.int32)[None, :] >= num_valid[:, None]


class BinningTokenizer:
    """One token per action value: uniform bins over [low, high], flattened time-major.

    tokens[b, t * D + d] is the bin of actions[b, t, d]; num_tokens = H * D,
    vocab_size = num_bins. `decode` returns bin centres, so for actions in [low, high] the
    round-trip error is at most `max_abs_error` = bin width / 2 = (high - low) / (2 * num_bins).
    Padding positions decode to the 0.0 action (clipped into [low, high]).
    """

    def __init__(
        self,
        action_horizon: int,
        action_dim: int,
        num_bins: int = 256,
        low: float = -1.0,
        high: float = 1.0,
    ):
        _check_positive_int("action_horizon", action_horizon)
        _check_positive_int("action_dim", action_dim)
        _check_positive_int("num_bins", num_bins)
        _check_range(low, high)
        self.action_horizon = int(action_horizon)
        self.action_dim = int(action_dim)
        self.num_bins = int(num_bins)
        self.low = float(low)
        self.high = float(high)
        self.vocab_size = self.num_bins
        self.num_tokens = self.action_horizon * self.action_dim
        self.bin_width = (self.high - self.low) / self.num_bins
        self.max_abs_error = self.bin_width / 2
        self._encode, self._decode = jax.jit(self._encode_impl), jax.jit(self._decode_impl)

    def __repr__(self) -> str:
        return (
            f"BinningTokenizer(action_horizon={self.action_horizon}, "
            f"action_dim={self.action_dim}, num_bins={self.num_bins}, low={self.low}, "
            f"high={self.high})"
        )

    def encode(self, actions: Array) -> Array:
        """actions float [B, H, D] -> int32 bin ids [B, H * D] (time-major)."""
        return self._encode(actions)

    def decode(self, tokens: Array, num_valid: Array | None = None) -> Array:
        """int32 bin ids [B, H * D] -> float32 bin centres [B, H, D]; never raises on values.

        num_valid: [B] or None; positions >= num_valid[b] decode to the 0.0 action.
        """
        return self._decode(tokens, num_valid)

    def _encode_impl(self, actions: Array) -> Array:
        actions = _as_actions(actions, self.action_horizon, self.action_dim)
        x = jnp.clip(actions, self.low, self.high)
        # `high` itself lands in bin num_bins; the clip puts it in the last bin.
        ids = jnp.floor((x - self.low) / self.bin_width).astype(jnp.int32)
        ids = jnp.clip(ids, 0, self.num_bins - 1)
        return ids.reshape(actions.shape[0], self.num_tokens)

    def _decode_impl(self, tokens: Array, num_valid: Array | None) -> Array:
        tokens = _as_tokens(tokens, self.num_tokens)
        ids = jnp.clip(tokens, 0, self.num_bins - 1)
        values = self.low + (ids.astype(jnp.float32) + 0.5) * self.bin_width
        pad = _padding_mask(num_valid, tokens.shape[0], self.num_tokens)
        if pad is not None:
            # With an even bin count 0.0 is a bin edge, not a centre, so pad after decoding.
            values = jnp.where(pad, np.float32(np.clip(0.0, self.low, self.high)), values)
        values = jnp.clip(values, self.low, self.high)
        return values.reshape(tokens.shape[0], self.action_horizon, self.action_dim)


class FASTTokenizer:
    """Quantised DCT coefficients per action dim (FAST without BPE), low frequency first.

    encode: clip to [low, high]; c = DCT-II(orthonormal) along time, per dim; ids =
    clip(round(scale * c), -max_coeff, max_coeff) + max_coeff. Tokens flatten the [H(freq), D]
    coefficient matrix frequency-major: tokens[b, k * D + d] is frequency k of dim d, so the
    first D tokens are every dim's DC term. num_tokens = H * D, vocab_size = 2 * max_coeff + 1,
    and `zero_token` = max_coeff is the id of a zero coefficient (what padding decodes as).

    decode: ids clipped into range, minus max_coeff, / scale, inverse DCT (basis.T), clipped to
    [low, high].

    Error bound (no coefficient clipped, actions in [low, high]). Rounding leaves a
    per-coefficient error e_k with |e_k| <= 0.5 / scale. The reconstruction error at step t
    is sum_k basis[k, t] e_k, so
        |error_t| <= 0.5 / scale * ||basis[:, t]||_1          (tight: e_k = +-0.5/scale)
                  <= 0.5 / scale * sqrt(H) * ||basis[:, t]||_2  (Cauchy–Schwarz)
                   = 0.5 / scale * sqrt(H)                       (orthonormal: unit columns).
    `max_abs_error` is the tight max_t ||basis[:, t]||_1 * 0.5 / scale (~0.9 of the sqrt(H)
    form for large H). By Parseval the RMS error over a chunk, per dim, is <= 0.5 / scale. The
    final clip to [low, high] only moves values toward the true action, so it keeps the bound.

    Default max_coeff: |c_k| = |<basis[k], x>| <= ||x||_2 <= sqrt(H) * max(|low|, |high|) for
    every k (equality for the DC term of a constant chunk), so
    max_coeff = ceil(scale * sqrt(H) * max(|low|, |high|)) (= ceil(scale * sqrt(H)) for
    [-1, 1]) means no coefficient ever clips. A smaller max_coeff shrinks the vocabulary at the
    cost of clipping large low-frequency terms (the bound above then no longer holds).
    """

    def __init__(
        self,
        action_horizon: int,
        action_dim: int,
        scale: float = 10.0,
        max_coeff: int | None = None,
        low: float = -1.0,
        high: float = 1.0,
    ):
        _check_positive_int("action_horizon", action_horizon)
        _check_positive_int("action_dim", action_dim)
        _check_range(low, high)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: expected a finite float > 0, got {scale!r}")
        if max_coeff is None:
            bound = math.sqrt(action_horizon) * max(abs(low), abs(high))
            max_coeff = max(1, math.ceil(scale * bound))
        _check_positive_int("max_coeff", max_coeff)
        self.action_horizon = int(action_horizon)
        self.action_dim = int(action_dim)
        self.scale = float(scale)
        self.max_coeff = int(max_coeff)
        self.low = float(low)
        self.high = float(high)
        self.vocab_size = 2 * self.max_coeff + 1
        self.num_tokens = self.action_horizon * self.action_dim
        self.zero_token = self.max_coeff
        basis = dct_basis(self.action_horizon)
        self.basis = basis.astype(np.float32)  # [H(freq), H(time)]
        self.max_abs_error = float(np.abs(basis).sum(axis=0).max() * 0.5 / self.scale)
        self._encode, self._decode = jax.jit(self._encode_impl), jax.jit(self._decode_impl)

    def __repr__(self) -> str:
        return (
            f"FASTTokenizer(action_horizon={self.action_horizon}, action_dim={self.action_dim}, "
            f"scale={self.scale}, max_coeff={self.max_coeff}, low={self.low}, high={self.high})"
        )

    def encode(self, actions: Array) -> Array:
        """actions float [B, H, D] -> int32 coefficient ids [B, H * D] (frequency-major)."""
        return self._encode(actions)

    def decode(self, tokens: Array, num_valid: Array | None = None) -> Array:
        """int32 coefficient ids [B, H * D] -> float32 actions [B, H, D]; never raises on values.

        num_valid: [B] or None; positions >= num_valid[b] are zero coefficients, so a prefix
        decodes to the chunk with its high frequencies removed.
        """
        return self._decode(tokens, num_valid)

    def _encode_impl(self, actions: Array) -> Array:
        actions = _as_actions(actions, self.action_horizon, self.action_dim)
        x = jnp.clip(actions, self.low, self.high)
        coeffs = jnp.einsum("kt,btd->bkd", self.basis, x, precision=_PRECISION)
        q = jnp.clip(jnp.round(coeffs * self.scale), -self.max_coeff, self.max_coeff)
        ids = q.astype(jnp.int32) + self.zero_token
        return ids.reshape(actions.shape[0], self.num_tokens)

    def _decode_impl(self, tokens: Array, num_valid: Array | None) -> Array:
        tokens = _as_tokens(tokens, self.num_tokens)
        ids = jnp.clip(tokens, 0, self.vocab_size - 1)
        pad = _padding_mask(num_valid, tokens.shape[0], self.num_tokens)
        if pad is not None:
            ids = jnp.where(pad, self.zero_token, ids)
        coeffs = (ids - self.zero_token).astype(jnp.float32) / self.scale
        coeffs = coeffs.reshape(tokens.shape[0], self.action_horizon, self.action_dim)
        actions = jnp.einsum("kt,bkd->btd", self.basis, coeffs, precision=_PRECISION)
        return jnp.clip(actions, self.low, self.high)


def make_tokenizer(
    kind: Literal["fast", "binning"], action_horizon: int, action_dim: int, **kwargs: Any
) -> ActionTokenizer:
    """Build a tokenizer by name; kwargs go to `FASTTokenizer` or `BinningTokenizer`."""
    if kind == "fast":
        return FASTTokenizer(action_horizon, action_dim, **kwargs)
    if kind == "binning":
        return BinningTokenizer(action_horizon, action_dim, **kwargs)
    raise ValueError(f"kind: expected 'fast' or 'binning', got {kind!r}")
