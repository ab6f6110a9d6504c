"""Our PaliGemma against openpi's own Pi0-FAST code: the golden fixtures in
tests/fixtures/openpi_pi0_fast/ (made by its make_golden.py, see its README.md) hold tiny
random weights in openpi's checkpoint layout, inputs, and openpi's outputs on them; and the
full-size parameter tree openpi's code builds. Float32 throughout."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openpi_rl.models.paligemma import (
    LoRAConfig,
    PaliGemmaConfig,
    make_attn_mask,
    param_shapes,
    sample_tokens,
)
from openpi_rl.models.paligemma.checkpoint import load_openpi_checkpoint

_DEFAULT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "openpi_pi0_fast"
# Another fixture directory (a fresh make_golden.py run) may be tested in place of the committed one.
FIXTURES = pathlib.Path(os.environ.get("OPENPI_RL_GOLDEN_DIR", _DEFAULT))
TINY = FIXTURES / "tiny"
TOL = dict(atol=1e-4, rtol=1e-4)

pytestmark = pytest.mark.skipif(
    not (TINY / "outputs.npz").exists(), reason="openpi golden fixtures not present"
)


def _tiny_config(lora: bool = False) -> PaliGemmaConfig:
    meta = json.loads((TINY / "config.json").read_text())
    g, s = meta["gemma"], meta["siglip"]
    gemma = {k: g[k] for k in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size")}  # fmt: skip
    if lora:
        rank, alpha = meta["gemma_lora"]["rank"], meta["gemma_lora"]["alpha"]
        gemma.update(lora_attn=LoRAConfig(rank, alpha), lora_ffn=LoRAConfig(rank, alpha))
    siglip = {k: s[k] for k in ("width", "depth", "mlp_dim", "num_heads")}
    siglip.update(patch_size=s["patch_size"][0], image_size=meta["image_resolution"][0])
    return PaliGemmaConfig(
        "dummy",
        "dummy",
        dtype="float32",
        gemma_overrides=tuple(gemma.items()),
        siglip_overrides=tuple(siglip.items()),
    )


@pytest.fixture(scope="module")
def golden():
    meta = json.loads((TINY / "config.json").read_text())
    inputs = dict(np.load(TINY / "inputs.npz"))
    outputs = dict(np.load(TINY / "outputs.npz"))
    return meta, inputs, outputs


@pytest.fixture(scope="module")
def model():
    # tiny/params/: as openpi's trainer writes them (leaves end in `value`).
    return load_openpi_checkpoint(TINY / "params", _tiny_config())


def test_released_layout_loads_the_same_weights(model):
    # tiny/params_pure/: as openpi's released checkpoints hold them (no `value`).
    pure = load_openpi_checkpoint(TINY / "params_pure", _tiny_config())
    ours = nnx.to_flat_state(nnx.state(model, nnx.Param))
    theirs = dict(nnx.to_flat_state(nnx.state(pure, nnx.Param)))
    assert len(ours) == len(theirs) == 32
    for path, value in ours:
        np.testing.assert_array_equal(value[...], theirs[path][...])


def _prefix(model, meta, inputs, which):
    cams = meta["cameras"]
    return model.embed_prefix(
        [jnp.asarray(inputs[f"image/{c}"]) for c in cams],
        [jnp.asarray(inputs[f"{which}_image_mask/{c}"]) for c in cams],
        jnp.asarray(inputs[f"{which}_tokenized_prompt"]),
        jnp.asarray(inputs[f"{which}_tokenized_prompt_mask"]),
        jnp.asarray(inputs[f"{which}_token_ar_mask"]),
    )


@jax.jit
def _forward(graphdef, state, x, mask):
    return nnx.merge(graphdef, state).forward(x, mask)[0]


def test_train_sequence_embeddings_masks_and_logits(model, golden):
    meta, inputs, out = golden
    emb, input_mask, ar_mask = _prefix(model, meta, inputs, "train")
    np.testing.assert_array_equal(input_mask, out["train_input_mask"])
    np.testing.assert_array_equal(ar_mask, out["train_ar_mask"])
    attn = make_attn_mask(input_mask, ar_mask)
    np.testing.assert_array_equal(attn, out["train_attn_mask"])
    np.testing.assert_allclose(emb, out["train_embeddings"], **TOL)
    logits = _forward(*nnx.split(model), emb, attn)
    np.testing.assert_allclose(logits, out["train_full_logits"], **TOL)


def test_per_token_logprobs_as_compute_loss(model, golden):
    meta, inputs, out = golden
    emb, input_mask, ar_mask = _prefix(model, meta, inputs, "train")
    attn = make_attn_mask(input_mask, ar_mask)
    targets = jnp.asarray(inputs["train_tokenized_prompt"])[:, 1:]
    # compute_loss: every input predicts the next one, so the last input is dropped.
    logits = _forward(*nnx.split(model), emb[:, :-1], attn[:, :-1, :-1])[:, -targets.shape[1] :]
    np.testing.assert_allclose(logits, out["train_target_logits"], **TOL)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(token_logp, out["train_token_logp"], **TOL)
    loss_mask = jnp.asarray(inputs["train_token_loss_mask"])[:, 1:]
    loss = -jnp.sum(token_logp * loss_mask, -1) / jnp.clip(jnp.sum(loss_mask, -1), 1)
    np.testing.assert_allclose(loss, out["train_loss"], **TOL)


def test_prefix_logits_and_prefill(model, golden):
    meta, inputs, out = golden
    emb, input_mask, ar_mask = _prefix(model, meta, inputs, "infer")
    attn = make_attn_mask(input_mask, ar_mask)
    np.testing.assert_array_equal(input_mask, out["prefix_input_mask"])
    np.testing.assert_array_equal(attn, out["prefix_attn_mask"])
    np.testing.assert_allclose(_forward(*nnx.split(model), emb, attn), out["prefix_logits"], **TOL)
    # sample_actions' prefill: right-aligned, positions cumsum(mask) - 1, a cache sized for decoding.
    from openpi_rl.models.paligemma.paligemma import left_to_right_align

    r_emb, r_mask, r_attn = left_to_right_align(emb, input_mask, attn)
    np.testing.assert_array_equal(r_mask, out["prefill_aligned_input_mask"])
    positions = jnp.cumsum(r_mask, axis=-1) - 1
    np.testing.assert_array_equal(positions, out["prefill_positions"])
    steps = meta["max_decoding_steps"]
    logits, _ = model.prefill(r_emb, r_attn, positions, r_emb.shape[1] + steps)
    np.testing.assert_allclose(logits[:, -1], out["prefill_last_logits"], **TOL)


@pytest.mark.parametrize("masks", ["infer", "train"])
def test_greedy_tokens_identical(model, golden, masks):
    meta, inputs, out = golden
    inputs = dict(inputs)
    if masks == "train":  # a camera masked out in the middle of the prefix, decoded as openpi does
        for c in meta["cameras"]:
            inputs[f"infer_image_mask/{c}"] = inputs[f"train_image_mask/{c}"]
    emb, input_mask, ar_mask = _prefix(model, meta, inputs, "infer")
    steps = meta["max_decoding_steps"]

    @jax.jit
    def greedy(graphdef, state, emb, input_mask, ar_mask):
        m = nnx.merge(graphdef, state)
        return sample_tokens(m, jax.random.key(2), emb, input_mask, ar_mask, steps)

    tokens = np.asarray(greedy(*nnx.split(model), emb, input_mask, ar_mask)).astype(np.int32)
    expected = out["greedy_tokens" if masks == "infer" else "greedy_tokens_masked_camera"]
    np.testing.assert_array_equal(tokens, expected)


def test_tiny_lora_tree_matches_openpi(golden):
    meta, _, _ = golden
    ours = param_shapes(_tiny_config(lora=True))
    theirs = {r["path"]: tuple(r["shape"]) for r in meta["lora_leaves"]}
    theirs = {k.removesuffix("/value"): v for k, v in theirs.items()}
    assert ours == theirs


@pytest.mark.parametrize("variant", ["gemma_2b", "gemma_2b_lora"])
def test_full_size_tree_matches_openpi_key_by_key(variant):
    full = json.loads((FIXTURES / "full_tree.json").read_text())[variant]
    theirs = {r["path"].removesuffix("/value"): tuple(r["shape"]) for r in full["leaves"]}
    ours = param_shapes(PaliGemmaConfig(variant))
    missing = sorted(theirs.keys() - ours.keys())
    extra = sorted(ours.keys() - theirs.keys())
    assert not missing and not extra, (
        f"openpi has, we lack: {missing}; we have, openpi lacks: {extra}"
    )
    for key, shape in theirs.items():
        assert ours[key] == shape, key
    assert sum(int(np.prod(s)) for s in ours.values()) == full["total_params"]


def test_teacher_forced_greedy_logits(model, golden):
    """openpi's non-cached forward over [valid prefix, greedy tokens] at sample_actions'
    positions (decoded token i at prefill_len + 1 + i)."""
    meta, inputs, out = golden
    emb, input_mask, _ = _prefix(model, meta, inputs, "infer")
    tokens = out["greedy_tokens"]
    n = tokens.shape[1]
    for b in range(tokens.shape[0]):
        valid = np.asarray(input_mask[b])
        p = int(valid.sum())
        seq = jnp.concatenate([emb[b : b + 1][:, valid], model.embed_tokens(tokens[b : b + 1])], 1)
        ar = jnp.asarray([[0] * p + [1] * n])
        pos = jnp.asarray([[*range(p), *range(p + 1, p + 1 + n)]])
        mask = make_attn_mask(jnp.ones(ar.shape, bool), ar)
        logits = model.llm.logits(model.llm.transformer(seq, mask, pos)[0])[0, p - 1 : p - 1 + n]
        np.testing.assert_allclose(logits, out["greedy_teacher_forced_logits"][b], **TOL)
