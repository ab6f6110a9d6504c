"""The openpi golden fixtures themselves (tests/fixtures/openpi_pi0_fast/, made by its
make_golden.py from openpi's own Pi0-FAST code; see its README.md): present, self-consistent,
the tiny params load with orbax in THIS environment, and the tiny tree has openpi's full-size
tree's keys with shapes given by the same formulas. This file shows the fixture format in
code; the model's numerical comparison against them lives in test_paligemma_golden.py."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "openpi_pi0_fast"
TINY = FIXTURES / "tiny"
OPENPI_COMMIT = "15a9616a00943ada6c20a0f158e3adb39df2ccac"


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((TINY / "config.json").read_text())


@pytest.fixture(scope="module")
def full() -> dict:
    return json.loads((FIXTURES / "full_tree.json").read_text())


@pytest.fixture(scope="module")
def inputs() -> dict:
    return dict(np.load(TINY / "inputs.npz"))


@pytest.fixture(scope="module")
def outputs() -> dict:
    return dict(np.load(TINY / "outputs.npz"))


def _restore(path: pathlib.Path) -> dict:
    """Reads an openpi params/ directory: an orbax PyTree whose single item is "params"."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        md = ckptr.metadata(path.resolve())
        tree = md.item_metadata.tree if hasattr(md, "item_metadata") else md
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(path.resolve(), restore_args=args)


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _expected_shapes(g: dict, s: dict, n_patches: int, lora_rank: int | None) -> dict[str, tuple]:
    """openpi's Pi0-FAST parameter tree, as formulas of the Gemma and SigLIP sizes."""
    V, W, D, M = g["vocab_size"], g["width"], g["depth"], g["mlp_dim"]
    H, K, hd = g["num_heads"], g["num_kv_heads"], g["head_dim"]
    w, d, m, h, p = s["width"], s["depth"], s["mlp_dim"], s["num_heads"], s["patch_size"][0]
    llm = "PaliGemma/llm"
    img = "PaliGemma/img"
    blk = f"{img}/Transformer/encoderblock"
    att = f"{blk}/MultiHeadDotProductAttention_0"
    shapes = {
        f"{llm}/embedder/input_embedding": (V, W),
        f"{llm}/final_norm/scale": (W,),
        f"{llm}/layers/attn/attn_vec_einsum/w": (D, H, hd, W),
        f"{llm}/layers/attn/kv_einsum/w": (D, 2, K, W, hd),
        f"{llm}/layers/attn/q_einsum/w": (D, H, W, hd),
        f"{llm}/layers/mlp/gating_einsum": (D, 2, W, M),
        f"{llm}/layers/mlp/linear": (D, M, W),
        f"{llm}/layers/pre_attention_norm/scale": (D, W),
        f"{llm}/layers/pre_ffw_norm/scale": (D, W),
        f"{img}/Transformer/encoder_norm/bias": (w,),
        f"{img}/Transformer/encoder_norm/scale": (w,),
        f"{blk}/LayerNorm_0/bias": (d, w),
        f"{blk}/LayerNorm_0/scale": (d, w),
        f"{blk}/LayerNorm_1/bias": (d, w),
        f"{blk}/LayerNorm_1/scale": (d, w),
        f"{blk}/MlpBlock_0/Dense_0/bias": (d, m),
        f"{blk}/MlpBlock_0/Dense_0/kernel": (d, w, m),
        f"{blk}/MlpBlock_0/Dense_1/bias": (d, w),
        f"{blk}/MlpBlock_0/Dense_1/kernel": (d, m, w),
        f"{att}/out/bias": (d, w),
        f"{att}/out/kernel": (d, h, w // h, w),
        f"{img}/embedding/bias": (w,),
        f"{img}/embedding/kernel": (p, p, 3, w),
        f"{img}/head/bias": (W,),
        f"{img}/head/kernel": (w, W),
        f"{img}/pos_embedding": (1, n_patches, w),
    }
    for qkv in ("query", "key", "value"):
        shapes[f"{att}/{qkv}/bias"] = (d, h, w // h)
        shapes[f"{att}/{qkv}/kernel"] = (d, w, h, w // h)
    if lora_rank is not None:
        r = lora_rank
        a = f"{llm}/layers/attn"
        f = f"{llm}/layers/mlp"
        shapes.update(
            {
                f"{a}/attn_vec_einsum/lora_a": (D, H, hd, r),
                f"{a}/attn_vec_einsum/lora_b": (D, H, r, W),
                f"{a}/kv_einsum/lora_a": (D, 2, K, W, r),
                f"{a}/kv_einsum/lora_b": (D, 2, K, r, hd),
                f"{a}/q_einsum/lora_a": (D, H, W, r),
                f"{a}/q_einsum/lora_b": (D, H, r, hd),
                f"{f}/gating_einsum_lora_a": (D, 2, W, r),
                f"{f}/gating_einsum_lora_b": (D, 2, r, M),
                f"{f}/linear_lora_a": (D, M, r),
                f"{f}/linear_lora_b": (D, r, W),
            }
        )
    return shapes


def test_fixture_files_present_and_small():
    for rel in ("README.md", "make_golden.py", "full_tree.json", "tiny/config.json", "tiny/inputs.npz", "tiny/outputs.npz", "tiny/outputs_bf16.npz", "tiny/outputs_bf16_params.npz", "tiny/lora/outputs.npz"):  # fmt: skip
        assert (FIXTURES / rel).is_file(), rel
    for sub in ("params", "params_pure", "lora/params"):
        assert (TINY / sub / "_METADATA").is_file(), sub
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert total < 4 * 2**20, total


def test_full_tree_matches_formulas_and_counts(full):
    assert full["openpi_commit"] == OPENPI_COMMIT
    for variant, rank in (("gemma_2b", None), ("gemma_2b_lora", 16)):
        v = full[variant]
        cfg = v["config"]
        res = cfg["image_resolution"]
        siglip = {
            "width": 1152,
            "depth": 27,
            "mlp_dim": 4304,
            "num_heads": 16,
            "patch_size": [14, 14],
        }
        n_patches = (res[0] // 14) * (res[1] // 14)
        expected = _expected_shapes(cfg["gemma"], siglip, n_patches, rank)
        got = {r["path"]: tuple(r["shape"]) for r in v["leaves"]}
        assert got == expected, variant
        assert all(r["dtype"] == "float32" for r in v["leaves"])
        assert v["total_params"] == sum(math.prod(s) for s in got.values())
        assert v["num_leaves"] == len(got)
    assert full["gemma_2b"]["total_params"] == 2_923_335_408
    assert full["gemma_2b_lora"]["total_params"] == 2_951_204_592
    assert full["gemma_2b_lora"]["lora_params"] == 2_951_204_592 - 2_923_335_408


def test_tiny_tree_has_full_tree_keys_with_tiny_shapes(meta, full):
    n_patches = math.prod(r // meta["siglip"]["patch_size"][0] for r in meta["image_resolution"])
    for key, rank, variant in (("leaves", None, "gemma_2b"), ("lora_leaves", meta["gemma_lora"]["rank"], "gemma_2b_lora")):  # fmt: skip
        tiny = {r["path"]: tuple(r["shape"]) for r in meta[key]}
        big = {r["path"]: tuple(r["shape"]) for r in full[variant]["leaves"]}
        assert tiny.keys() == big.keys(), variant
        assert all(len(tiny[k]) == len(big[k]) for k in tiny)
        assert tiny == _expected_shapes(meta["gemma"], meta["siglip"], n_patches, rank)
    assert meta["total_params"] == sum(math.prod(r["shape"]) for r in meta["leaves"])


@pytest.mark.parametrize("sub", ["params", "params_pure"])
def test_tiny_params_load_with_orbax_here(sub, meta):
    restored = _restore(TINY / sub)
    assert list(restored) == ["params"]  # openpi's checkpoint item
    flat = _flatten(restored["params"])
    if sub == "params":  # as openpi's trainer writes them: nnx.State, every leaf under "value"
        assert all(k.endswith("/value") for k in flat)
        flat = {k.removesuffix("/value"): v for k, v in flat.items()}
    else:  # as openpi's released checkpoints hold them: a pure dict
        assert not any(k.endswith("/value") for k in flat)
    expected = {r["path"]: tuple(r["shape"]) for r in meta["leaves"]}
    assert {k: v.shape for k, v in flat.items()} == expected
    assert all(v.dtype == np.float32 for v in flat.values())
    # The weights are random (openpi's init leaves most of Gemma at zero).
    assert all(np.abs(v).max() > 0 for v in flat.values())


def test_params_and_params_pure_hold_the_same_weights():
    a = {
        k.removesuffix("/value"): v
        for k, v in _flatten(_restore(TINY / "params")["params"]).items()
    }
    b = _flatten(_restore(TINY / "params_pure")["params"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_inputs_layout(meta, inputs):
    B, L = meta["batch"], meta["model_config"]["max_token_len"]
    H, W = meta["image_resolution"]
    V = meta["gemma"]["vocab_size"]
    for c in meta["cameras"]:
        u8, f = inputs[f"image_u8/{c}"], inputs[f"image/{c}"]
        assert u8.shape == (B, H, W, 3) and u8.dtype == np.uint8
        assert f.dtype == np.float32
        np.testing.assert_array_equal(f, u8.astype(np.float32) / 255.0 * 2.0 - 1.0)
        for which in ("train", "infer"):
            assert inputs[f"{which}_image_mask/{c}"].shape == (B,)
    assert inputs["state"].shape == (B, meta["model_config"]["action_dim"])
    for which in ("train", "infer"):
        tok = inputs[f"{which}_tokenized_prompt"]
        mask = inputs[f"{which}_tokenized_prompt_mask"]
        ar = inputs[f"{which}_token_ar_mask"]
        loss = inputs[f"{which}_token_loss_mask"]
        assert tok.shape == mask.shape == ar.shape == loss.shape == (B, L)
        assert tok.dtype == np.int32 and ar.dtype == np.int32
        assert mask.dtype == bool and loss.dtype == bool
        assert (tok[:, 0] == 2).all()  # BOS
        assert (tok < V).all() and (tok[~mask] == 0).all()
        # ar/loss masks are 1 exactly on the postfix ("Action: " + FAST ids + "|" + EOS).
        np.testing.assert_array_equal(ar.astype(bool), loss)
        for b in range(B):
            n = int(mask[b].sum())
            assert mask[b, :n].all()
            if which == "train":
                assert tok[b, n - 1] == meta["paligemma_eos_token"]
    assert not inputs["infer_token_ar_mask"].any()
    # FAST ids sit at the end of the vocabulary: vocab_size - 1 - 128 - fast_id.
    skip = meta["fast_skip_tokens"]
    for b in range(B):
        ids = inputs["fast_ids"][b][inputs["fast_ids"][b] >= 0]
        tok = inputs["train_tokenized_prompt"][b]
        p = int(
            (~inputs["train_token_loss_mask"][b] & inputs["train_tokenized_prompt_mask"][b]).sum()
        )
        np.testing.assert_array_equal(tok[p + 3 : p + 3 + len(ids)], V - 1 - skip - ids)


def test_outputs_self_consistent(meta, inputs, outputs):
    B, L = meta["batch"], meta["model_config"]["max_token_len"]
    V, W = meta["gemma"]["vocab_size"], meta["gemma"]["width"]
    n_img = len(meta["cameras"]) * math.prod(
        r // meta["siglip"]["patch_size"][0] for r in meta["image_resolution"]
    )
    S = n_img + L
    steps = meta["max_decoding_steps"]
    shapes = {
        "train_embeddings": (B, S, W),
        "train_attn_mask": (B, S, S),
        "train_full_logits": (B, S, V),
        "train_target_logits": (B, L - 1, V),
        "train_token_logp": (B, L - 1),
        "train_target_loss_mask": (B, L - 1),
        "train_loss": (B,),
        "prefix_logits": (B, S, V),
        "prefill_last_logits": (B, V),
        "prefill_positions": (B, S),
        "greedy_tokens": (B, steps),
        "greedy_tokens_masked_camera": (B, steps),
        "greedy_top2_margin": (B, steps),
        "greedy_teacher_forced_logits": (B, steps, V),
    }
    for k, shape in shapes.items():
        assert outputs[k].shape == shape, k
    # compute_loss's targets are the last L-1 positions of the (S-1)-long forward.
    # (Padding positions attend to nothing; their logits depend on the sequence length, so
    # only the valid positions are compared.)
    valid = inputs["train_tokenized_prompt_mask"][:, :-1]
    np.testing.assert_allclose(
        outputs["train_target_logits"][valid],
        outputs["train_full_logits"][:, n_img : S - 1][valid],
        atol=1e-4,
    )
    logits = outputs["train_target_logits"].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)  # fmt: skip
    tgt = inputs["train_tokenized_prompt"][:, 1:]
    np.testing.assert_allclose(np.take_along_axis(logp, tgt[..., None], -1)[..., 0], outputs["train_token_logp"], atol=1e-4)  # fmt: skip
    mask = inputs["train_token_loss_mask"][:, 1:]
    np.testing.assert_array_equal(mask, outputs["train_target_loss_mask"])
    loss = -(outputs["train_token_logp"] * mask).sum(-1) / np.clip(mask.sum(-1), 1, None)
    np.testing.assert_allclose(loss, outputs["train_loss"], rtol=1e-5)
    # Greedy tokens are the argmax of openpi's teacher-forced logits, with clear margins.
    np.testing.assert_array_equal(
        outputs["greedy_teacher_forced_logits"].argmax(-1), outputs["greedy_tokens"]
    )
    assert outputs["greedy_top2_margin"].min() > 1e-2
    np.testing.assert_array_equal(
        outputs["greedy_tokens_raw_float"].astype(np.int32), outputs["greedy_tokens"]
    )
