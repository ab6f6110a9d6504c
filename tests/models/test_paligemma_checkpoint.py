"""openpi checkpoints load as openpi writes them (`load_openpi_checkpoint`): the trainer's
layout (`<step>/params/`, leaves ending in `value`) and a released one's (no `value`), given
the step directory or `params/` itself; bf16 leaves; and a broken or foreign checkpoint gets
one error naming every bad key. Broken checkpoints are written here with orbax from the
golden fixture's tree (tests/fixtures/openpi_pi0_fast/, see its README.md)."""

from __future__ import annotations

import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from openpi_rl.models.paligemma import PaliGemmaConfig
from openpi_rl.models.paligemma.checkpoint import (
    load_openpi_checkpoint,
    openpi_params_dir,
    restore_openpi_params,
)

TINY = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "openpi_pi0_fast" / "tiny"
pytestmark = pytest.mark.skipif(
    not (TINY / "params").exists(), reason="openpi golden fixtures not present"
)

# The fixture's sizes are the `dummy` variants' (README.md: width 64, depth 2, vocab 512;
# SigLIP width 32, depth 2, 56x56 images).
CONFIG = PaliGemmaConfig("dummy", "dummy", dtype="float32")


def _flat(model) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _save(path: pathlib.Path, params: dict) -> pathlib.Path:
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path.absolute(), {"params": params})
    return path


def _edit(tree: dict, path: tuple[str, ...], fn) -> dict:
    """A copy of the nested dict with the leaf at `path` replaced by fn(leaf) (None: removed)."""
    out = dict(tree)
    if len(path) == 1:
        new = fn(out.get(path[0]))
        if new is None:
            del out[path[0]]
        else:
            out[path[0]] = new
        return out
    out[path[0]] = _edit(out.get(path[0], {}), path[1:], fn)
    return out


@pytest.fixture(scope="module")
def reference():
    return _flat(load_openpi_checkpoint(TINY / "params_pure", CONFIG))


@pytest.mark.parametrize("layout", ["params", "params_pure"])
def test_both_layouts_load_from_the_step_dir_or_params_itself(tmp_path, layout, reference):
    # openpi's trainer: <ckpt>/<step>/params/; pass the step directory or params/ itself.
    step = tmp_path / "ckpt" / "1000"
    shutil.copytree(TINY / layout, step / "params")
    assert openpi_params_dir(step) == step / "params"
    for where in (step, step / "params"):
        got = _flat(load_openpi_checkpoint(where, CONFIG))
        assert got.keys() == reference.keys() and len(got) == 32
        for k, v in got.items():
            np.testing.assert_array_equal(v, reference[k])
            assert v.dtype == np.float32


def test_fills_a_given_model_in_place(reference):
    model = CONFIG.create(jax.random.key(1))
    same = load_openpi_checkpoint(TINY / "params", model)
    assert same is model
    for k, v in _flat(model).items():
        np.testing.assert_array_equal(v, reference[k])


def test_bf16_leaves_load_and_cast_to_the_param_dtype(tmp_path, reference):
    params = restore_openpi_params(TINY / "params_pure")
    bf16 = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    _save(tmp_path / "params", bf16)
    stored = restore_openpi_params(tmp_path)
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree.leaves(stored))
    for param_dtype in ("float32", "bfloat16"):
        config = PaliGemmaConfig("dummy", "dummy", dtype="float32", param_dtype=param_dtype)
        got = _flat(load_openpi_checkpoint(tmp_path, config))
        for k, v in got.items():
            assert v.dtype == np.dtype(param_dtype if param_dtype == "float32" else ml_dtypes.bfloat16)  # fmt: skip
            want = reference[k].astype(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(v.astype(np.float32), want.astype(np.float32))


def test_missing_and_misshaped_keys_are_named_in_one_error(tmp_path):
    params = restore_openpi_params(TINY / "params")  # the trainer's layout: `value` leaves
    llm = ("PaliGemma", "llm")
    params = _edit(params, (*llm, "final_norm", "scale", "value"), lambda _: None)
    params = _edit(params, (*llm, "layers", "mlp", "linear", "value"), lambda x: x[:, :-1])
    params = _edit(params, ("PaliGemma", "img", "extra", "value"), lambda _: np.zeros(3))
    _save(tmp_path / "params", params)
    with pytest.raises(ValueError) as e:
        load_openpi_checkpoint(tmp_path, CONFIG)
    msg = str(e.value)
    assert str(tmp_path / "params") in msg
    assert "missing (1): llm/final_norm/scale" in msg
    assert "unexpected (1): img/extra" in msg
    assert "mis-shaped (1): llm/layers/mlp/linear: expected [2, 128, 64], got [2, 127, 64]" in msg


def test_a_checkpoint_of_another_variant_is_named_key_by_key():
    with pytest.raises(ValueError) as e:  # the dummy checkpoint into `tiny` (width 128)
        load_openpi_checkpoint(TINY / "params", PaliGemmaConfig("tiny", "tiny", dtype="float32"))
    msg = str(e.value)
    assert "mis-shaped (" in msg and "llm/embedder/input_embedding: expected [1024, 128], got [512, 64]" in msg  # fmt: skip
    with pytest.raises(ValueError, match=r"missing \(10\): llm/layers/attn/attn_vec_einsum/lora_a"):
        load_openpi_checkpoint(TINY / "params", PaliGemmaConfig("dummy_lora", "dummy"))


def test_a_directory_that_is_not_a_checkpoint_says_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"expected an orbax checkpoint directory.*params/"):
        load_openpi_checkpoint(tmp_path, CONFIG)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_openpi_checkpoint(tmp_path / "nope", CONFIG)
    # An orbax checkpoint, but not openpi's (no `params` item).
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save((tmp_path / "other").absolute(), {"weights": {"w": np.zeros(2)}})
    with pytest.raises(ValueError, match=r"expected the item `params`"):
        load_openpi_checkpoint(tmp_path / "other", CONFIG)
