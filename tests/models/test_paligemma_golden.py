"""Our PaliGemma against openpi's own Pi0-FAST code: the golden fixtures in
tests/fixtures/openpi_pi0_fast/ (made by its make_golden.py, see its README.md) hold tiny
random weights in openpi's checkpoint layout, inputs, and openpi's outputs on them; and the
full-size parameter tree openpi's code builds. Float32 for `gemma_2b` and `gemma_2b_lora`
(within 1e-4, greedy tokens identical); bfloat16 compute on float32 and on bfloat16 weights
within bounds set by bf16's precision (see BF16_* below)."""

from __future__ import annotations

import functools
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
    is_lora_param,
    make_attn_mask,
    param_shapes,
    sample_tokens,
)
from openpi_rl.models.paligemma.checkpoint import load_openpi_checkpoint
from openpi_rl.models.paligemma.paligemma import left_to_right_align

_DEFAULT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "openpi_pi0_fast"
# Another fixture directory (a fresh make_golden.py run) may be tested in place of the committed one.
FIXTURES = pathlib.Path(os.environ.get("OPENPI_RL_GOLDEN_DIR", _DEFAULT))
TINY = FIXTURES / "tiny"
TOL = dict(atol=1e-4, rtol=1e-4)

pytestmark = pytest.mark.skipif(
    not (TINY / "outputs.npz").exists(), reason="openpi golden fixtures not present"
)


def _tiny_config(
    lora: bool = False, dtype: str = "float32", param_dtype: str = "float32"
) -> PaliGemmaConfig:
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
        dtype=dtype,
        param_dtype=param_dtype,
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


# ------------------------------------------------------------------------------------------
# gemma_2b_lora (float32) and bfloat16 compute. Each model's outputs come from one jitted
# function (`_all_outputs`: compute_loss's steps, the prefix forward, the prefill, greedy
# decoding with every camera on and with one masked, optionally the teacher-forced logits):
# one compilation per model keeps these tests to seconds on a CPU.
# ------------------------------------------------------------------------------------------


def _all_outputs(model, meta, inputs, teacher_tokens=None) -> dict[str, np.ndarray]:
    cams, steps = meta["cameras"], meta["max_decoding_steps"]
    x = {k: jnp.asarray(v) for k, v in inputs.items() if not k.startswith("image_u8/")}
    # Valid prefix slots per row for the teacher-forced pass (static: numpy, from the masks).
    n_img = model.config.siglip.num_tokens
    valid = [
        np.flatnonzero(
            np.concatenate(
                [np.repeat(inputs[f"infer_image_mask/{c}"][b], n_img) for c in cams]
                + [inputs["infer_tokenized_prompt_mask"][b]]
            )
        )
        for b in range(meta["batch"])
    ]

    def prefix(m, which, masks):
        return m.embed_prefix(
            [x[f"image/{c}"] for c in cams],
            [x[f"{masks}_image_mask/{c}"] for c in cams],
            x[f"{which}_tokenized_prompt"],
            x[f"{which}_tokenized_prompt_mask"],
            x[f"{which}_token_ar_mask"],
        )

    @functools.partial(jax.jit, static_argnums=0)
    def run(graphdef, state, teacher_tokens):
        m = nnx.merge(graphdef, state)
        out = {}
        # compute_loss's steps: each input predicts the next one, the last input is dropped.
        emb, input_mask, ar_mask = prefix(m, "train", "train")
        attn = make_attn_mask(input_mask, ar_mask)
        targets = x["train_tokenized_prompt"][:, 1:]
        logits = m.forward(emb[:, :-1], attn[:, :-1, :-1])[0][:, -targets.shape[1] :]
        logp = jax.nn.log_softmax(logits, axis=-1)
        # As compute_loss: a float32 one-hot times logp, so log-probs and loss are float32
        # even where the logits are bfloat16.
        one_hot = jax.nn.one_hot(targets, logits.shape[-1])
        token_logp = jnp.sum(one_hot * logp, axis=-1)
        loss_mask = x["train_token_loss_mask"][:, 1:]
        out["train_target_logits"], out["train_token_logp"] = logits, token_logp
        out["train_loss"] = -jnp.sum(token_logp * loss_mask, -1) / jnp.clip(
            jnp.sum(loss_mask, -1), 1
        )
        # The inference prefix: plain forward, then sample_actions' prefill and decoding.
        emb, input_mask, ar_mask = prefix(m, "infer", "infer")
        attn = make_attn_mask(input_mask, ar_mask)
        out["prefix_logits"] = m.forward(emb, attn)[0]
        r_emb, r_mask, r_attn = left_to_right_align(emb, input_mask, attn)
        positions = jnp.cumsum(r_mask, axis=-1) - 1
        prefill, _ = m.prefill(r_emb, r_attn, positions, r_emb.shape[1] + steps)
        out["prefill_last_logits"] = prefill[:, -1]
        key = jax.random.key(2)
        out["greedy_tokens"] = sample_tokens(m, key, emb, input_mask, ar_mask, steps)
        masked = prefix(m, "infer", "train")  # a camera masked in the middle of the prefix
        out["greedy_tokens_masked_camera"] = sample_tokens(m, key, *masked, steps)
        if teacher_tokens is not None:
            # openpi's non-cached forward over [valid prefix, greedy tokens] at sample_actions'
            # positions (decoded token i at prefill_len + 1 + i).
            n, rows = teacher_tokens.shape[1], []
            for b, idx in enumerate(valid):
                p = len(idx)
                seq = jnp.concatenate(
                    [emb[b : b + 1, idx], m.embed_tokens(teacher_tokens[b : b + 1])], 1
                )
                ar = jnp.asarray([[0] * p + [1] * n])
                pos = jnp.asarray([[*range(p), *range(p + 1, p + 1 + n)]])
                mask = make_attn_mask(jnp.ones(ar.shape, bool), ar)
                rows.append(m.forward(seq, mask, pos)[0][0, p - 1 : p - 1 + n])
            out["greedy_teacher_forced_logits"] = jnp.stack(rows)
        return out

    out = run(*nnx.split(model), teacher_tokens)
    out = {k: np.asarray(v) for k, v in out.items()}
    for k in ("greedy_tokens", "greedy_tokens_masked_camera"):  # float32, as openpi's
        out[k] = out[k].astype(np.int32)
    return out


# gemma_2b_lora, float32: tiny/lora/ holds the float32 fixture's weights plus random LoRA a
# and b (b nonzero), as openpi's trainer saves them, and openpi's outputs on the same inputs.
# Measured: logits 3.1e-6, log-probs 1.9e-6 from openpi's.


@pytest.fixture(scope="module")
def lora(golden):
    meta, inputs, _ = golden
    model = load_openpi_checkpoint(TINY / "lora" / "params", _tiny_config(lora=True))
    expected = dict(np.load(TINY / "lora" / "outputs.npz"))
    ours = _all_outputs(model, meta, inputs, jnp.asarray(expected["greedy_tokens"]))
    return model, ours, expected


def test_lora_checkpoint_is_the_base_weights_plus_adapters(model, lora):
    lora_model, _, _ = lora
    base = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    ours = dict(nnx.to_flat_state(nnx.state(lora_model, nnx.Param)))
    adapters = {p: v for p, v in ours.items() if is_lora_param(p)}
    assert len(ours) == 42 and len(adapters) == 10 and ours.keys() - adapters.keys() == base.keys()
    for path, value in adapters.items():  # every a and b nonzero: the adapters change the model
        assert np.all(np.asarray(value[...]) != 0), path
    for path, value in base.items():
        np.testing.assert_array_equal(ours[path][...], value[...])


def test_lora_logits_and_logprobs(lora, golden):
    _, ours, expected = lora
    _, _, base = golden
    for key in ("prefix_logits", "prefill_last_logits", "train_token_logp", "train_loss"):
        np.testing.assert_allclose(ours[key], expected[key], **TOL, err_msg=key)
    np.testing.assert_array_equal(
        expected["train_target_loss_mask"], base["train_target_loss_mask"]
    )
    # Not vacuous: the adapters move openpi's logits far beyond the tolerance (by 2.1).
    assert np.abs(expected["prefix_logits"] - base["prefix_logits"]).max() > 0.5


def test_lora_greedy_tokens_identical(lora):
    _, ours, expected = lora
    for key in ("greedy_tokens", "greedy_tokens_masked_camera"):
        np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)
    key = "greedy_teacher_forced_logits"
    np.testing.assert_allclose(ours[key], expected[key], **TOL)


# bfloat16 compute (openpi's default Pi0FASTConfig.dtype) on the float32 fixture weights:
# tiny/outputs_bf16.npz with the weights as stored (float32, as openpi trains), and
# tiny/outputs_bf16_params.npz with them restored as bfloat16 (openpi's serving path,
# `restore_params(dtype=jnp.bfloat16)`; ours: param_dtype="bfloat16").
#
# bfloat16 keeps 8 significant bits: one unit in the last place (ulp) is 2^-6 = 0.016 for
# |x| in [2, 4) (the logits here lie within +-4), 2^-5 = 0.03 in [4, 8) and 2^-4 = 0.06 in
# [8, 16) (the log-probs lie within -9.3). Measured, ours against openpi's recorded outputs
# (float32 / bfloat16 weights):
#   logits          max 0.034 / 0.023, mean 0.0054 / 0.0028 (prefill's last: max 0.028 / 0.016)
#   log-probs       max 0.016 / 0.031 (1 ulp)        loss  0.0023 / 0.013
# and openpi's own bf16 run against its float32 run: logits max 0.033 / 0.043, mean 0.0063 /
# 0.0070; loss 0.0026 / 0.012. Our bf16 is as close to openpi's bf16 as that is to float32.
# The differences are XLA's, not the model code's: openpi's linen modules (its siglip.Module
# and gemma_fast.Module from its source), run by hand under this project's jax on these
# weights, give bf16 outputs bit-identical to ours (float32 and bf16 weights, with and
# without LoRA); openpi's pinned jax 0.5.3 rounds some bf16 intermediates differently (its
# float32 patch conv alone is 1.5e-6 away, enough to flip bf16 roundings that the layers
# carry on), and the fixtures ran openpi eagerly where this jits (XLA may keep float32
# between fused ops: our log-softmax, hence the loss, is not rounded to bf16 here).
# Bounds, about 2.5x the measured maxima: logits 0.08 (5 ulps at |x| < 4), log-probs 0.1,
# loss 0.04 (a mean of log-probs each within 1 to 2 ulps), and the mean absolute logit error
# 0.015 so that every logit being off a little cannot hide under the max bound. What these
# bounds catch: wrong dtypes (checked too), a lost float32 upcast that overflows or saturates,
# any error beyond bf16 rounding (a wrong scale, mask or position); what they cannot: a bf16-sized rounding change (e.g. RMSNorm
# statistics in bf16 moves the logits by 0.041), which the same-jax comparison above ruled
# out. Greedy tokens are identical (openpi's smallest top-1/top-2 margin is 0.063), so they
# are compared exactly.
BF16_LOGITS_ATOL = 0.08
BF16_LOGITS_MEAN_ATOL = 0.015
BF16_LOGP_ATOL = 0.1
BF16_LOSS_ATOL = 0.04


@pytest.fixture(scope="module", params=[("outputs_bf16", "float32"), ("outputs_bf16_params", "bfloat16")])  # fmt: skip
def bf16(request, golden):
    meta, inputs, _ = golden
    name, param_dtype = request.param
    config = _tiny_config(dtype="bfloat16", param_dtype=param_dtype)
    model = load_openpi_checkpoint(TINY / "params", config)
    return name, _all_outputs(model, meta, inputs), dict(np.load(TINY / f"{name}.npz"))


def test_bf16_logits_logprobs_and_loss(bf16, golden):
    name, ours, expected = bf16
    meta, _, _ = golden
    # openpi's dtypes: float32 logits from float32 weights (the tied decoding promotes),
    # bfloat16 logits from bfloat16 weights.
    assert (
        str(ours["train_target_logits"].dtype)
        == (meta["bf16"][name]["openpi_dtypes"]["train_target_logits"])
    )
    for key in ("train_target_logits", "prefill_last_logits"):
        err = np.abs(ours[key].astype(np.float32) - expected[key])
        assert err.max() < BF16_LOGITS_ATOL, (key, err.max())
        assert err.mean() < BF16_LOGITS_MEAN_ATOL, (key, err.mean())
    logp = ours["train_token_logp"].astype(np.float32)
    np.testing.assert_allclose(logp, expected["train_token_logp"], rtol=0, atol=BF16_LOGP_ATOL)
    loss = ours["train_loss"].astype(np.float32)
    np.testing.assert_allclose(loss, expected["train_loss"], rtol=0, atol=BF16_LOSS_ATOL)


def test_bf16_greedy_tokens_identical(bf16):
    _, ours, expected = bf16
    for key in ("greedy_tokens", "greedy_tokens_masked_camera"):
        np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)
