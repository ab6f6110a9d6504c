"""PaliGemma (openpi's SigLIP + Gemma) in nnx: shapes, masks, the KV cache, LoRA, the full-size
tree and the openpi-layout loader, on tiny float32 models (openpi's own outputs are compared
in test_paligemma_golden.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openpi_rl.models.paligemma import (
    PaliGemmaConfig,
    frozen_filter,
    is_lora_param,
    load_openpi_params,
    make_attn_mask,
    openpi_to_ours,
    ours_to_openpi,
    param_count,
    param_shapes,
    sample_tokens,
)

CFG = PaliGemmaConfig("dummy", "dummy", dtype="float32")
B, P, A = 2, 6, 5  # batch, prompt tokens, action tokens


@pytest.fixture(scope="module")
def model():
    return CFG.create(jax.random.key(0))


@jax.jit
def _forward(graphdef, state, x, mask):
    return nnx.merge(graphdef, state).forward(x, mask)[0]


def forward(model, x, mask):
    # The hot-path form: split once, a pure jitted function of (graphdef, state, ...).
    return _forward(*nnx.split(model), x, mask)


def _prefix_and_actions(model, seed=0):
    rng = np.random.default_rng(seed)
    images = [jnp.asarray(rng.uniform(-1, 1, (B, 56, 56, 3)), jnp.float32)]
    tokens = jnp.asarray(rng.integers(2, 500, (B, P + A)), jnp.int32)
    ar = jnp.asarray([0] * P + [1] * A, jnp.int32)[None].repeat(B, 0)
    x, input_mask, ar_mask = model.embed_prefix(
        images, [jnp.ones(B, bool)], tokens, jnp.ones((B, P + A), bool), ar
    )
    return x, input_mask, ar_mask, tokens


def test_shapes(model):
    x, input_mask, ar_mask, _ = _prefix_and_actions(model)
    n_img = CFG.siglip.num_tokens
    assert n_img == 16
    assert x.shape == (B, n_img + P + A, CFG.gemma.width)
    assert input_mask.shape == ar_mask.shape == (B, n_img + P + A)
    logits = forward(model, x, make_attn_mask(input_mask, ar_mask))
    assert logits.shape == (B, n_img + P + A, CFG.gemma.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_image_mask_hides_a_camera():
    m = CFG.create(jax.random.key(0))
    # openpi zero-initialises the head; give it weights so images matter.
    m.img.head.kernel[...] = jax.random.normal(jax.random.key(1), m.img.head.kernel.shape)
    _x, _input_mask, ar_mask, tokens = _prefix_and_actions(m)
    img2 = jnp.ones((B, 56, 56, 3))
    on = jnp.ones(B, bool)
    off = jnp.array([True, False])
    xs, ms, ars = m.embed_prefix(
        [img2, img2], [on, off], tokens, jnp.ones_like(tokens, bool), ar_mask[:, 16:]
    )
    changed = m.embed_prefix(
        [img2, -img2], [on, off], tokens, jnp.ones_like(tokens, bool), ar_mask[:, 16:]
    )
    out = forward(m, xs, make_attn_mask(ms, ars))
    out2 = forward(m, changed[0], make_attn_mask(changed[1], changed[2]))
    # Row 1 masks the second camera out: changing that image changes nothing in row 1's tokens.
    np.testing.assert_allclose(out[1, 32:], out2[1, 32:], atol=1e-5)
    assert not np.allclose(out[0, 32:], out2[0, 32:], atol=1e-3)


def test_prefix_is_bidirectional_and_actions_causal(model):
    x, input_mask, ar_mask, _ = _prefix_and_actions(model)
    mask = make_attn_mask(input_mask, ar_mask)
    s = x.shape[1]
    n_pre = s - A
    base = forward(model, x, mask)
    bump = jnp.zeros_like(x)
    # Changing the last prefix token changes the first prefix position (bidirectional).
    out = forward(model, x + bump.at[:, n_pre - 1].set(1.0), mask)
    assert not np.allclose(base[:, 0], out[:, 0], atol=1e-4)
    # Changing an action token changes nothing before it (causal) ...
    out = forward(model, x + bump.at[:, n_pre + 2].set(1.0), mask)
    np.testing.assert_allclose(base[:, : n_pre + 2], out[:, : n_pre + 2], atol=1e-5)
    assert not np.allclose(base[:, n_pre + 2 :], out[:, n_pre + 2 :], atol=1e-4)
    # ... and with ar_mask all zero it would.
    full = make_attn_mask(input_mask, jnp.zeros_like(ar_mask))
    base_bi = forward(model, x, full)
    out_bi = forward(model, x + bump.at[:, n_pre + 2].set(1.0), full)
    assert not np.allclose(base_bi[:, 0], out_bi[:, 0], atol=1e-4)


def test_make_attn_mask_drops_padding():
    input_mask = jnp.array([[True, True, True, False]])
    ar_mask = jnp.array([[0, 0, 1, 0]])
    m = np.asarray(make_attn_mask(input_mask, ar_mask))[0]
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(m, expected)


def test_kv_cache_decoding_equals_full_forward(model):
    x, input_mask, ar_mask, _ = _prefix_and_actions(model)
    mask = make_attn_mask(input_mask, ar_mask)
    s = x.shape[1]
    n_pre = s - A
    full = forward(model, x, mask)

    @jax.jit
    def cached(graphdef, state, x, mask):
        m = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(s), (B, s))
        logits, cache = m.prefill(x[:, :n_pre], mask[:, :n_pre, :n_pre], positions[:, :n_pre], s)
        outs = [logits]
        for i in range(n_pre, s):
            lg, cache = m.decode_step(
                x[:, i : i + 1], positions[:, i : i + 1], mask[:, i : i + 1], cache
            )
            outs.append(lg)
        return jnp.concatenate(outs, 1), cache.length

    out, length = cached(*nnx.split(model), x, mask)
    assert int(length) == s
    # The prefill gives the logits of its last position only (where decoding starts).
    np.testing.assert_allclose(out, full[:, n_pre - 1 :], atol=1e-4, rtol=1e-4)


def test_greedy_decoding_matches_teacher_forcing(model):
    x, input_mask, _ar_mask, _ = _prefix_and_actions(model)
    n_pre = x.shape[1] - A
    # Row 1's prompt is one token shorter (right-padded): decoding right-aligns it.
    pmask = input_mask[:, :n_pre].at[1, -1].set(False)
    steps = 4

    @jax.jit
    def greedy(graphdef, state, x, pmask):
        m = nnx.merge(graphdef, state)
        zeros = jnp.zeros(pmask.shape, jnp.int32)
        return sample_tokens(m, jax.random.key(0), x, pmask, zeros, steps)

    tokens = np.asarray(greedy(*nnx.split(model), x[:, :n_pre], pmask)).astype(np.int32)
    assert tokens.shape == (B, steps)
    for b in range(B):
        p = int(pmask[b].sum())
        seq = jnp.concatenate(
            [x[b : b + 1, :p], model.embed_tokens(jnp.asarray(tokens[b : b + 1]))], 1
        )
        ar = jnp.asarray([[0] * p + [1] * steps])
        # openpi places decoded token i at position prefill_len + 1 + i (it skips one).
        pos = jnp.asarray([[*range(p), *range(p + 1, p + 1 + steps)]])
        hidden, _ = model.llm.transformer(seq, make_attn_mask(jnp.ones_like(ar, bool), ar), pos)
        expected = np.argmax(np.asarray(model.llm.logits(hidden))[0, p - 1 : p - 1 + steps], -1)
        stop = int(np.argmax(tokens[b] == 1)) + 1 if (tokens[b] == 1).any() else steps
        np.testing.assert_array_equal(tokens[b, :stop], expected[:stop])


def test_lora_starts_as_the_base_model_and_is_filtered():
    lora_cfg = PaliGemmaConfig("dummy_lora", "dummy", dtype="float32")
    m_lora = lora_cfg.create(jax.random.key(3))
    m_base = CFG.create(jax.random.key(4))
    nnx.update(m_base, nnx.state(m_lora, nnx.All(nnx.Param, nnx.Not(is_lora_param))))
    x, input_mask, ar_mask, _ = _prefix_and_actions(m_base)
    mask = make_attn_mask(input_mask, ar_mask)
    np.testing.assert_allclose(forward(m_lora, x, mask), forward(m_base, x, mask), atol=1e-6)

    lora = nnx.to_flat_state(nnx.state(m_lora, is_lora_param))
    names = {"/".join(map(str, p)) for p, _ in lora}
    assert names and all("lora" in n for n in names)
    n_lora = sum(v[...].size for _, v in lora)
    assert n_lora == sum(int(np.prod(s)) for n, s in param_shapes(lora_cfg).items() if "lora" in n)
    # Attention and FFN both get adapters (openpi's gemma_2b_lora).
    assert any("attn/q_einsum/lora_b" in n for n in names)
    assert any("mlp/linear_lora_b" in n for n in names)
    # A non-zero b changes the output.
    m_lora.llm.layers.attn.q_einsum.lora_b[...] = jnp.ones_like(
        m_lora.llm.layers.attn.q_einsum.lora_b[...]
    )
    assert not np.allclose(forward(m_lora, x, mask), forward(m_base, x, mask), atol=1e-4)


def test_full_size_tree_without_allocating():
    shapes = param_shapes(PaliGemmaConfig())  # gemma_2b + So400m/14, jax.eval_shape only
    assert shapes["PaliGemma/llm/embedder/input_embedding"] == (257_152, 2048)
    assert shapes["PaliGemma/llm/layers/attn/q_einsum/w"] == (18, 8, 2048, 256)
    assert shapes["PaliGemma/llm/layers/attn/kv_einsum/w"] == (18, 2, 1, 2048, 256)
    assert shapes["PaliGemma/llm/layers/mlp/gating_einsum"] == (18, 2, 2048, 16_384)
    assert shapes["PaliGemma/img/embedding/kernel"] == (14, 14, 3, 1152)
    assert shapes["PaliGemma/img/pos_embedding"] == (1, 256, 1152)
    key = "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"
    assert shapes[key] == (27, 1152, 16, 72)
    assert shapes["PaliGemma/img/head/kernel"] == (1152, 2048)
    n = param_count(PaliGemmaConfig())
    assert 2.85e9 < n < 2.95e9  # openpi's pi0_fast_base: ~2.9B
    n_lora = param_count(PaliGemmaConfig("gemma_2b_lora"))
    assert 0 < n_lora - n < 0.02 * n


def test_loader_round_trip_and_errors(model):
    x, input_mask, ar_mask, _ = _prefix_and_actions(model)
    mask = make_attn_mask(input_mask, ar_mask)
    params = ours_to_openpi(model)
    # Leaves wrapped as {"value": ...}, as openpi's trainer writes nnx state dicts.
    wrapped = {"params": jax.tree.map(lambda a: {"value": a}, params)}
    loaded = load_openpi_params(wrapped, CFG)
    np.testing.assert_array_equal(forward(loaded, x, mask), forward(model, x, mask))
    bf16 = openpi_to_ours(
        params["PaliGemma"], PaliGemmaConfig("dummy", "dummy", param_dtype="bfloat16")
    )
    assert {v[...].dtype for _, v in nnx.to_flat_state(bf16)} == {jnp.dtype("bfloat16")}

    broken = jax.tree.map(lambda a: a, params)
    llm = broken["PaliGemma"]["llm"]
    del llm["final_norm"]
    llm["extra"] = {"w": np.zeros(3)}
    llm["embedder"]["input_embedding"] = np.zeros((7, 64), np.float32)
    with pytest.raises(ValueError) as e:
        openpi_to_ours(broken, CFG)
    msg = str(e.value)
    assert "missing (1): llm/final_norm/scale" in msg
    assert "unexpected (1): llm/extra/w" in msg
    assert "llm/embedder/input_embedding: expected [512, 64], got [7, 64]" in msg


def test_bf16_compute_over_fp32_weights(model):
    cfg16 = PaliGemmaConfig("dummy", "dummy", dtype="bfloat16")
    m16 = load_openpi_params(ours_to_openpi(model), cfg16)
    x, input_mask, ar_mask, _ = _prefix_and_actions(model)
    mask = make_attn_mask(input_mask, ar_mask)
    x16, *_ = _prefix_and_actions(m16)
    assert x16.dtype == jnp.bfloat16
    hidden16 = jax.eval_shape(lambda x: m16.llm.transformer(x, mask)[0], x16)
    assert hidden16.dtype == jnp.bfloat16
    out16 = np.asarray(forward(m16, x16, mask), np.float32)
    out32 = np.asarray(forward(model, x, mask))
    assert np.abs(out16 - out32).max() < 0.1 * np.abs(out32).max()


@functools.partial(jax.jit, static_argnums=0)
def _action_nll_grad(graphdef, trainable, frozen, x, mask, tokens):
    def loss(trainable):
        logits = nnx.merge(graphdef, frozen, trainable).forward(x, mask)[0]
        logp = jax.nn.log_softmax(logits[:, -A - 1 : -1])
        return -jnp.take_along_axis(logp, tokens[:, -A:, None], -1).mean()

    return jax.grad(loss)(trainable)


def test_lora_gradients_flow_through_the_scanned_layers_with_and_without_remat():
    grads = {}
    for remat in (False, True):
        cfg = PaliGemmaConfig("dummy_lora", "dummy", dtype="float32", remat=remat)
        m = cfg.create(jax.random.key(5))
        x, input_mask, ar_mask, tokens = _prefix_and_actions(m)
        mask = make_attn_mask(input_mask, ar_mask)
        # openpi's LoRA training: the decoder's base weights frozen, LoRA and SigLIP trained.
        graphdef, frozen, trainable = nnx.split(m, frozen_filter(cfg), nnx.Param)

        grads[remat] = _action_nll_grad(graphdef, trainable, frozen, x, mask, tokens)
        names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
        assert all("lora" in n or n.startswith("img/") for n in names)
        assert any(n.startswith("img/") for n in names)
    flat = dict(nnx.to_flat_state(grads[False]))
    # b starts at zero, so only b gets a gradient at the first step.
    assert float(jnp.abs(flat[("llm", "layers", "mlp", "linear_lora_b")][...]).max()) > 0
    for path, g in nnx.to_flat_state(grads[True]):
        np.testing.assert_allclose(g[...], flat[path][...], atol=1e-6)


def test_full_size_prefill_and_decode_trace_without_allocating():
    cfg = PaliGemmaConfig("gemma_2b_lora")  # bf16 compute over fp32 weights, openpi's default
    graphdef, state = nnx.split(cfg.abstract())
    b, n_img, p, steps = 1, 3 * 256, 48, 8
    s = n_img + p

    def run(state, images, tokens):
        m = nnx.merge(graphdef, state)
        ones = jnp.ones((b, p), bool)
        x, input_mask, ar_mask = m.embed_prefix(
            [images] * 3, [jnp.ones(b, bool)] * 3, tokens, ones, jnp.zeros((b, p), jnp.int32)
        )
        positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        logits, cache = m.prefill(x, make_attn_mask(input_mask, ar_mask), positions, s + steps)
        step_logits, cache = m.decode_step(
            m.embed_tokens(tokens[:, :1]),
            positions[:, :1] + s,
            jnp.ones((b, 1, s + steps), bool),
            cache,
        )
        return logits, step_logits, cache

    images = jax.ShapeDtypeStruct((b, 224, 224, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((b, p), jnp.int32)
    logits, step_logits, cache = jax.eval_shape(run, state, images, tokens)
    assert logits.shape == (b, 1, 257_152) and logits.dtype == jnp.float32
    assert step_logits.shape == (b, 1, 257_152)
    assert cache.k.shape == (18, b, s + steps, 1, 256) and cache.k.dtype == jnp.bfloat16


def test_base_checkpoint_into_a_lora_variant(model):
    x, input_mask, ar_mask, _ = _prefix_and_actions(model)
    mask = make_attn_mask(input_mask, ar_mask)
    lora_cfg = PaliGemmaConfig("dummy_lora", "dummy", dtype="float32")
    with pytest.raises(ValueError, match=r"missing \(10\): llm/layers/attn/attn_vec_einsum/lora_a"):
        load_openpi_params(ours_to_openpi(model), lora_cfg)
    m = load_openpi_params(ours_to_openpi(model), lora_cfg, init_missing_lora=jax.random.key(7))
    lora = dict(nnx.to_flat_state(nnx.state(m, is_lora_param)))
    assert float(jnp.abs(lora[("llm", "layers", "mlp", "linear_lora_a")][...]).max()) > 0
    np.testing.assert_allclose(forward(m, x, mask), forward(model, x, mask), atol=1e-6)
