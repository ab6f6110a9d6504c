import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft

from openpi_rl.models.action_tokenizer import (
    ActionTokenizer,
    BinningTokenizer,
    FASTTokenizer,
    dct_basis,
    make_tokenizer,
)

SHAPES = [(10, 7), (50, 14), (1, 1)]
KINDS = ["fast", "binning"]


def smooth_chunks(rng: np.random.Generator, batch: int, horizon: int, dim: int) -> np.ndarray:
    """[B, H, D] sums of a few low-frequency sines, scaled into [-1, 1]."""
    t = np.linspace(0.0, 1.0, horizon)[None, :, None, None]
    freq = rng.uniform(0.1, 1.5, (batch, 1, dim, 3))
    phase = rng.uniform(0, 2 * np.pi, (batch, 1, dim, 3))
    amp = rng.uniform(-1, 1, (batch, 1, dim, 3))
    x = (amp * np.sin(2 * np.pi * freq * t + phase)).sum(-1)
    return (x / np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-6)).astype(np.float32)


def walk_chunks(rng: np.random.Generator, batch: int, horizon: int, dim: int) -> np.ndarray:
    """[B, H, D] cumulative sums of small noise (a slow random walk), scaled into [-1, 1]."""
    x = np.cumsum(rng.normal(0, 0.1, (batch, horizon, dim)), axis=1)
    return (x / np.maximum(np.abs(x).max(), 1.0)).astype(np.float32)


def rough_chunks(rng: np.random.Generator, batch: int, horizon: int, dim: int) -> np.ndarray:
    """[B, H, D] uniform noise in [-1, 1], including the endpoints."""
    x = rng.uniform(-1, 1, (batch, horizon, dim))
    x[0, 0, 0], x[-1, -1, -1] = -1.0, 1.0
    return x.astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 50])
def test_dct_basis_is_scipy_orthonormal_dct_ii(n):
    x = np.random.default_rng(0).normal(size=(3, n, 4))
    basis = dct_basis(n)
    np.testing.assert_allclose(
        np.einsum("kt,btd->bkd", basis, x),
        scipy.fft.dct(x, type=2, norm="ortho", axis=1),
        atol=1e-12,
    )
    np.testing.assert_allclose(basis @ basis.T, np.eye(n), atol=1e-12)
    # The tokenizer's float32 copy is the same matrix.
    np.testing.assert_allclose(FASTTokenizer(n, 1).basis, basis, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_make_tokenizer_builds_the_interface(kind):
    tok = make_tokenizer(kind, 10, 7)
    assert isinstance(tok, ActionTokenizer)
    assert tok.num_tokens == 70 and tok.action_horizon == 10 and tok.action_dim == 7
    with pytest.raises(ValueError, match="kind"):
        make_tokenizer("bpe", 10, 7)  # type: ignore[arg-type]


def test_default_parameters_and_error_bounds():
    binning = BinningTokenizer(10, 7)
    assert binning.vocab_size == 256 and binning.max_abs_error == pytest.approx(1 / 256)
    fast = FASTTokenizer(10, 7)
    assert fast.max_coeff == math.ceil(10 * math.sqrt(10)) == 32
    assert fast.vocab_size == 65 and fast.zero_token == 32
    # The tight (l1) bound lies below the Cauchy–Schwarz form 0.5 * sqrt(H) / scale.
    for h in [1, 10, 50]:
        tok = FASTTokenizer(h, 1, scale=10.0)
        assert tok.max_abs_error <= 0.5 * math.sqrt(h) / 10.0 + 1e-9
    assert FASTTokenizer(1, 1).max_abs_error == pytest.approx(0.05)


def mixed_chunks(seed: int, horizon: int, dim: int) -> np.ndarray:
    """[48, H, D]: 16 smooth, 16 random-walk and 16 rough chunks (one batch, one compile)."""
    rng = np.random.default_rng(seed)
    makers = (smooth_chunks, walk_chunks, rough_chunks)
    return np.concatenate([make(rng, 16, horizon, dim) for make in makers])


@pytest.mark.parametrize(("horizon", "dim"), SHAPES)
def test_binning_round_trip_error_is_at_most_half_a_bin(horizon, dim):
    tok = BinningTokenizer(horizon, dim)
    actions = mixed_chunks(1, horizon, dim)
    tokens = tok.encode(actions)
    assert tokens.shape == (48, horizon * dim) and tokens.dtype == jnp.int32
    assert int(tokens.min()) >= 0 and int(tokens.max()) < tok.vocab_size
    err = np.abs(np.asarray(tok.decode(tokens)) - actions)
    assert err.max() <= tok.bin_width / 2 + 1e-6


@pytest.mark.parametrize(("horizon", "dim"), SHAPES)
def test_fast_round_trip_error_is_within_the_documented_bound(horizon, dim):
    tok = FASTTokenizer(horizon, dim)
    actions = mixed_chunks(2, horizon, dim)
    tokens = tok.encode(actions)
    assert tokens.shape == (48, horizon * dim) and tokens.dtype == jnp.int32
    # The default max_coeff leaves every coefficient unclipped for actions in [-1, 1].
    coeffs = scipy.fft.dct(actions.astype(np.float64), type=2, norm="ortho", axis=1)
    assert np.abs(np.round(coeffs * tok.scale)).max() <= tok.max_coeff
    decoded = np.asarray(tok.decode(tokens))
    err = np.abs(decoded - actions)
    assert err.max() <= tok.max_abs_error + 1e-5
    assert err.max() <= 0.5 * math.sqrt(horizon) / tok.scale + 1e-5
    # Parseval: the RMS error over a chunk, per dim, is at most 0.5 / scale.
    assert np.sqrt((err**2).mean(axis=1)).max() <= 0.5 / tok.scale + 1e-5


def test_fast_error_bound_is_reached_by_worst_case_rounding():
    # Coefficients half a step off the grid, signed like the inverse-basis column, attain the
    # l1 bound at that step: the documented bound is tight, not just valid.
    horizon, scale = 10, 10.0
    tok = FASTTokenizer(horizon, 1, scale=scale, low=-10.0, high=10.0)
    basis = dct_basis(horizon)
    t = int(np.abs(basis).sum(axis=0).argmax())
    coeffs = (0.499 / scale) * np.sign(basis[:, t])
    actions = (basis.T @ coeffs)[None, :, None].astype(np.float32)
    decoded = np.asarray(tok.decode(tok.encode(actions)))
    assert abs(decoded[0, t, 0] - actions[0, t, 0]) == pytest.approx(
        tok.max_abs_error * 0.998, rel=1e-3
    )


def test_fast_compresses_smooth_chunks_to_zero_high_frequency_tokens():
    horizon, dim = 50, 14
    tok = FASTTokenizer(horizon, dim)
    actions = smooth_chunks(np.random.default_rng(3), 64, horizon, dim)
    tokens = np.asarray(tok.encode(actions)).reshape(64, horizon, dim)  # [B, freq, D]
    high = tokens[:, horizon // 5 :]
    assert (high == tok.zero_token).mean() >= 0.95
    # Rough chunks do not compress, so the test above measures smoothness, not a bug.
    rough = np.asarray(tok.encode(rough_chunks(np.random.default_rng(3), 64, horizon, dim)))
    assert (rough.reshape(64, horizon, dim)[:, horizon // 5 :] == tok.zero_token).mean() < 0.5


def test_token_orders_binning_time_major_and_fast_frequency_major():
    horizon, dim = 4, 3
    actions = np.zeros((1, horizon, dim), np.float32)
    actions[0, 2, 1] = 0.9
    binning = BinningTokenizer(horizon, dim)
    tokens = np.asarray(binning.encode(actions))[0]
    assert tokens[2 * dim + 1] == binning.encode(np.full((1, horizon, dim), 0.9))[0, 0]
    assert np.sum(tokens != tokens[0]) == 1
    fast = FASTTokenizer(horizon, dim)
    const = np.tile(np.array([0.5, -0.5, 0.0], np.float32), (1, horizon, 1))
    tokens = np.asarray(fast.encode(const))[0]
    # A constant chunk has only DC terms: the first D tokens, one per dim.
    np.testing.assert_array_equal(tokens[dim:], fast.zero_token)
    np.testing.assert_array_equal(tokens[:dim] - fast.zero_token, [10, -10, 0])


def test_fast_prefix_decodes_to_a_smoothed_chunk():
    horizon, dim = 10, 7
    tok = FASTTokenizer(horizon, dim)
    actions = smooth_chunks(np.random.default_rng(4), 8, horizon, dim)
    tokens = tok.encode(actions)
    # Only the DC terms: each dim decodes to (about) its mean over the chunk.
    dc_only = np.asarray(tok.decode(tokens, num_valid=jnp.full((8,), dim)))
    np.testing.assert_allclose(dc_only, dc_only[:, :1].repeat(horizon, 1), atol=1e-6)
    np.testing.assert_allclose(dc_only[:, 0], actions.mean(1), atol=0.5 / tok.scale + 1e-5)
    # Longer prefixes approach the chunk.
    errs = [
        np.abs(np.asarray(tok.decode(tokens, jnp.full((8,), n * dim))) - actions).mean()
        for n in (1, 3, horizon)
    ]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("kind", KINDS)
def test_decode_of_malformed_tokens_is_finite_in_range_and_never_raises(kind):
    horizon, dim, batch = 10, 7, 6
    tok = make_tokenizer(kind, horizon, dim)
    rng = np.random.default_rng(5)
    cases = [
        rng.integers(-1000, 1000, (batch, tok.num_tokens)),
        np.zeros((batch, tok.num_tokens), np.int32),
        np.full((batch, tok.num_tokens), tok.vocab_size - 1, np.int32),
        np.full((batch, tok.num_tokens), np.iinfo(np.int32).min, np.int32),
        np.full((batch, tok.num_tokens), np.iinfo(np.int32).max, np.int32),
    ]
    num_valids = [
        None,
        np.zeros(batch, np.int32),
        rng.integers(0, tok.num_tokens + 1, batch).astype(np.int32),
        np.array([-5, 0, 1, 35, 70, 10_000], np.int32),
    ]
    jitted = jax.jit(tok.decode)
    for tokens in cases:
        for num_valid in num_valids:
            for fn in (tok.decode, jitted):
                out = fn(jnp.asarray(tokens, jnp.int32), num_valid)
                assert out.shape == (batch, horizon, dim) and out.dtype == jnp.float32
                out = np.asarray(out)
                assert np.isfinite(out).all()
                assert out.min() >= -1.0 and out.max() <= 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_padding_decodes_to_the_zero_action(kind):
    horizon, dim = 10, 7
    tok = make_tokenizer(kind, horizon, dim)
    tokens = np.random.default_rng(6).integers(0, tok.vocab_size, (3, tok.num_tokens))
    out = np.asarray(jax.jit(tok.decode)(tokens, jnp.zeros(3, jnp.int32)))
    np.testing.assert_array_equal(out, 0.0)
    # Partial: padding positions read as "no information", valid ones are kept.
    num_valid = np.array([0, 20, tok.num_tokens])
    partial = np.asarray(tok.decode(tokens, num_valid))
    pad = np.arange(tok.num_tokens)[None, :] >= num_valid[:, None]
    if kind == "binning":
        expected = np.where(pad, 0.0, np.asarray(tok.decode(tokens)).reshape(3, -1))
        np.testing.assert_array_equal(partial, expected.reshape(partial.shape))
    else:
        zeroed = np.where(pad, tok.zero_token, tokens)
        np.testing.assert_array_equal(partial, tok.decode(zeroed))


@pytest.mark.parametrize("kind", KINDS)
def test_encode_and_decode_jit_with_right_shapes_and_dtypes(kind):
    horizon, dim = 10, 7
    tok = make_tokenizer(kind, horizon, dim)
    actions = smooth_chunks(np.random.default_rng(7), 4, horizon, dim)
    tokens = jax.jit(tok.encode)(jnp.asarray(actions, jnp.bfloat16))
    assert tokens.shape == (4, horizon * dim) and tokens.dtype == jnp.int32
    decoded = jax.jit(tok.decode)(tokens)
    assert decoded.shape == (4, horizon, dim) and decoded.dtype == jnp.float32
    # bfloat16 input is rounded to ~3 significant digits before tokenizing.
    assert np.abs(np.asarray(decoded) - actions).max() <= tok.max_abs_error + 1e-2
    # Inside one jitted function, as the model will use it.
    round_trip = jax.jit(lambda a: tok.decode(tok.encode(a)))(actions)
    np.testing.assert_allclose(round_trip, tok.decode(tok.encode(actions)), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_out_of_range_actions_are_clipped_before_encoding(kind):
    tok = make_tokenizer(kind, 10, 7)
    actions = np.random.default_rng(8).uniform(-5, 5, (4, 10, 7)).astype(np.float32)
    np.testing.assert_array_equal(tok.encode(actions), tok.encode(np.clip(actions, -1, 1)))


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_shapes_raise_naming_the_expected_shape(kind):
    tok = make_tokenizer(kind, 10, 7)
    with pytest.raises(ValueError, match=r"actions: expected float \[B, 10, 7\]"):
        tok.encode(np.zeros((4, 7, 10), np.float32))
    with pytest.raises(ValueError, match=r"tokens: expected int32 \[B, 70\]"):
        tok.decode(np.zeros((4, 69), np.int32))


def test_bad_parameters_raise_naming_the_field():
    with pytest.raises(ValueError, match="action_horizon"):
        FASTTokenizer(0, 7)
    with pytest.raises(ValueError, match="scale"):
        FASTTokenizer(10, 7, scale=0.0)
    with pytest.raises(ValueError, match="num_bins"):
        BinningTokenizer(10, 7, num_bins=0)
    with pytest.raises(ValueError, match="low, high"):
        BinningTokenizer(10, 7, low=1.0, high=-1.0)
