"""openpi's Pi0-FAST tokenization and normalisation, against openpi's own outputs.

Fixtures (tests/fixtures/tokenizers/, made by the scripts there): a tiny SentencePiece model
shaped like PaliGemma's, a tiny FAST processor directory, openpi's norm_stats.json layout, and
openpi_golden.json: what openpi's FASTTokenizer (tokenizer.py at commit 15a9616, with the FAST
processor's code) produced for fixed inputs.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import scipy.fft

from openpi_rl.models.normalize import (
    NormStats,
    load_norm_stats,
    normalize,
    save_norm_stats,
    unnormalize,
)
from openpi_rl.models.pi0fast_tokens import (
    FASTActionTokenizer,
    PaligemmaTokenizer,
    Pi0FASTTokenizer,
    discretize_state,
)

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers"
SP_MODEL = FIXTURES / "paligemma_tiny.model"
FAST_DIR = FIXTURES / "fast_tiny"
GOLDEN = json.loads((FIXTURES / "openpi_golden.json").read_text())
H, D = GOLDEN["action_horizon"], GOLDEN["action_dim"]


def make_tokenizer(max_len: int = 64) -> Pi0FASTTokenizer:
    return Pi0FASTTokenizer.from_files(SP_MODEL, FAST_DIR, max_len=max_len)


def smooth_chunk(seed: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, H)[:, None]
    rng = np.random.default_rng(seed)
    amp, freq, phase = rng.uniform(-0.6, 0.6, D), rng.uniform(0.2, 1.5, D), rng.uniform(0, 6.28, D)
    return np.clip(rng.uniform(-0.3, 0.3, D) + amp * np.sin(2 * np.pi * freq * t + phase), -1, 1)


@pytest.mark.parametrize("case", GOLDEN["tokenize"], ids=lambda c: f"len{c['max_len']}")
def test_tokenize_equals_openpi(case):
    tok = make_tokenizer(case["max_len"])
    actions = None if case["actions"] is None else np.asarray(case["actions"])
    tokens, token_mask, ar_mask, loss_mask = tok.tokenize(
        case["prompt"], np.asarray(case["state"]), actions
    )
    assert tokens.tolist() == case["tokens"]
    assert token_mask.tolist() == case["token_mask"]
    assert ar_mask.tolist() == case["ar_mask"]
    assert loss_mask.tolist() == case["loss_mask"]


@pytest.mark.parametrize("name", sorted(GOLDEN["extract_actions"]))
def test_extract_actions_equals_openpi(name):
    case = GOLDEN["extract_actions"][name]
    tok = make_tokenizer()
    actions = tok.extract_actions(np.asarray(case["tokens"]), H, D)
    assert actions.shape == (H, D) and actions.dtype == np.float32
    np.testing.assert_allclose(actions, np.asarray(case["actions"]), rtol=0, atol=1e-6)


def test_malformed_sequences_decode_to_zeros_and_are_counted():
    tok = make_tokenizer()
    zeros = [n for n, c in GOLDEN["extract_actions"].items() if not np.any(c["actions"])]
    # openpi's cases with zeros: no "Action: ", too few ids, no ids, an id past the FAST range.
    assert sorted(zeros) == [
        "no_action_ids",
        "no_action_marker",
        "seg_id_among_action_ids",
        "too_few_action_ids",
    ]
    for name in zeros:
        tok.extract_actions(np.asarray(GOLDEN["extract_actions"][name]["tokens"]), H, D)
    tok.extract_actions(np.asarray(GOLDEN["extract_actions"]["postfix"]["tokens"]), H, D)
    assert tok.malformed_actions == len(zeros)
    assert tok.fast.decode_failures == len(zeros) - 1  # "no Action:" never reaches FAST


def test_fast_encode_equals_processor():
    fast = FASTActionTokenizer.from_directory(FAST_DIR)
    for case in GOLDEN["fast_encode"]:
        assert fast.encode(np.asarray(case["actions"])) == [case["ids"]]


def test_fast_id_mapping_equals_openpi():
    tok = make_tokenizer()
    mapping = GOLDEN["act_tokens_to_paligemma_tokens"]
    assert tok.act_tokens_to_paligemma_tokens(mapping["fast"]).tolist() == mapping["paligemma"]
    # The map is its own inverse.
    assert tok.act_tokens_to_paligemma_tokens(mapping["paligemma"]).tolist() == mapping["fast"]


def test_round_trip_within_dct_quantisation():
    tok = make_tokenizer()
    fast = tok.fast
    for seed in range(20):
        actions = smooth_chunk(seed)
        tokens, _, ar_mask, _ = tok.tokenize("pick up the block", np.zeros(3), actions)
        decoded = tok.extract_actions(tokens[ar_mask == 1], H, D)
        # Exactly the quantised DCT, inverted.
        coeffs = np.around(scipy.fft.dct(actions, axis=0, norm="ortho") * fast.scale)
        expected = scipy.fft.idct(coeffs / fast.scale, axis=0, norm="ortho")
        np.testing.assert_allclose(decoded, expected, atol=1e-6)
        # Rounding moves each coefficient by <= 0.5 / scale; the orthonormal inverse's columns
        # have unit norm, so each value moves by <= sqrt(H) * 0.5 / scale.
        assert np.abs(decoded - actions).max() <= np.sqrt(H) * 0.5 / fast.scale
    assert tok.malformed_actions == 0


def test_fast_batch_decode_and_ids_past_vocab_are_skipped():
    fast = FASTActionTokenizer.from_directory(FAST_DIR)
    chunks = np.stack([smooth_chunk(1), smooth_chunk(2)])
    ids = fast.encode(chunks)
    decoded = fast.decode(ids)  # horizon and dim from processor_config.json
    assert decoded.shape == (2, H, D)
    # tokenizers skips ids it does not know, as the FAST processor sees it.
    np.testing.assert_allclose(fast.decode([[*ids[0], fast.vocab_size + 5]])[0], decoded[0])
    assert fast.decode_failures == 0
    assert not np.any(fast.decode([[-1, *ids[0]]]))
    assert fast.decode_failures == 1


def test_prefix_format_and_state_bins():
    tok = make_tokenizer()
    text = tok.prefix_text("  Pick_Up the CUP\n", np.array([-1.5, -1.0, 0.0, 0.999, 1.0]))
    assert text == "Task: pick up the cup, State: -1 0 128 255 255;\n"
    assert discretize_state(np.array([-1.0, -0.9921875, 0.0039, 0.00390625])).tolist() == [
        0,
        1,
        128,
        128,
    ]


def test_paligemma_tokenizer_vocab_and_specials():
    sp = PaligemmaTokenizer(SP_MODEL)
    assert (sp.vocab_size, sp.bos_id, sp.eos_id) == (980, 2, 1)
    text = "Task: pick up the red block, State: 1 2 3;\n"
    assert sp.decode(sp.encode(text)) == text


def test_missing_files_name_the_file_and_where_it_goes(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"paligemma_tokenizer\.model.*big_vision"):
        PaligemmaTokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*physical-intelligence/fast"):
        FASTActionTokenizer.from_directory(tmp_path)
    shutil.copy(FAST_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=r"processor_config\.json"):
        FASTActionTokenizer.from_directory(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"norm_stats\.json.*assets"):
        load_norm_stats(tmp_path)


def test_tokenize_names_a_mis_shaped_input():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match=r"state: expected .* \[D\], got shape \(2, 3\)"):
        tok.tokenize("go", np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"actions: expected .* \[H, D\], got shape \(1, 10, 3\)"):
        tok.tokenize("go", np.zeros(3), np.zeros((1, H, D)))


def test_fast_vocab_must_fit_paligemma_tail():
    sp = PaligemmaTokenizer(SP_MODEL)
    fast = FASTActionTokenizer.from_directory(FAST_DIR)
    fast.vocab_size = sp.vocab_size
    with pytest.raises(ValueError, match=r"fast\.vocab_size"):
        Pi0FASTTokenizer(sp, fast)


def test_norm_stats_file_layout():
    stats = load_norm_stats(FIXTURES)
    raw = json.loads((FIXTURES / "norm_stats.json").read_text())["norm_stats"]
    assert set(stats) == {"state", "actions"}
    for key, entry in raw.items():
        for field in ("mean", "std", "q01", "q99"):
            np.testing.assert_array_equal(getattr(stats[key], field), entry[field])


def test_reads_norm_stats_written_by_openpi():
    # norm_stats_openpi/ was written by openpi's own normalize.save (RunningStats, quantiles).
    stats = load_norm_stats(FIXTURES / "norm_stats_openpi")
    raw = json.loads((FIXTURES / "norm_stats_openpi" / "norm_stats.json").read_text())["norm_stats"]
    assert set(stats) == {"state", "actions", "no_quantiles"}
    np.testing.assert_array_equal(stats["state"].q99, raw["state"]["q99"])
    assert stats["actions"].mean.shape == (3,)
    assert stats["no_quantiles"].q01 is None and stats["no_quantiles"].q99 is None
    with pytest.raises(ValueError, match="q01 and q99"):
        normalize(np.zeros(2), stats["no_quantiles"], use_quantiles=True)


def test_norm_stats_save_load_round_trip(tmp_path):
    stats = {"state": NormStats(np.array([1.0, 2.0]), np.array([0.5, 0.25]))}
    save_norm_stats(tmp_path, stats)
    back = load_norm_stats(tmp_path / "norm_stats.json")
    np.testing.assert_array_equal(back["state"].mean, [1.0, 2.0])
    assert back["state"].q01 is None and back["state"].q99 is None


STATS = NormStats(
    mean=np.array([1.0, -2.0, 0.5]),
    std=np.array([2.0, 0.5, 1.0]),
    q01=np.array([-1.0, 0.0, 2.0]),
    q99=np.array([3.0, 1.0, 4.0]),
)


@pytest.mark.parametrize(
    "case", GOLDEN["normalize"], ids=lambda c: "quantile" if c["use_quantiles"] else "z"
)
def test_normalize_equals_openpi_transforms(case):
    # openpi's transforms.Normalize / Unnormalize with norm_stats.json: state has fewer dims
    # than its stats on the way in, actions more dims than theirs on the way back.
    stats = load_norm_stats(FIXTURES)
    q = case["use_quantiles"]
    for key in ("state", "actions"):
        x = np.asarray(case["normalize_in"][key])
        np.testing.assert_allclose(
            normalize(x, stats[key], q), case["normalize_out"][key], rtol=1e-12
        )
        y = np.asarray(case["unnormalize_in"][key])
        np.testing.assert_allclose(
            unnormalize(y, stats[key], q), case["unnormalize_out"][key], rtol=1e-12
        )


def test_z_score_both_ways_by_hand():
    x = np.array([3.0, -1.0, 0.5])
    want = np.array([2.0 / 2.000001, 1.0 / 0.500001, 0.0])  # (x - mean) / (std + 1e-6)
    np.testing.assert_allclose(normalize(x, STATS), want, rtol=1e-12)
    np.testing.assert_allclose(unnormalize(want, STATS), x, rtol=1e-12)
    # Fewer dims than the stats: the stats are cut. More dims on the way back: mean 0, std 1.
    np.testing.assert_allclose(normalize(x[:2], STATS), want[:2], rtol=1e-12)
    np.testing.assert_allclose(
        unnormalize(np.array([*want, 7.0]), STATS), [*x, 7.0 * 1.000001], rtol=1e-12
    )


def test_quantile_both_ways_by_hand():
    x = np.array([[3.0, 0.5, 2.0], [-1.0, 1.0, 3.0]])
    # (x - q01) / (q99 - q01 + 1e-6) * 2 - 1
    want = np.array(
        [
            [4.0 / 4.000001 * 2 - 1, 0.5 / 1.000001 * 2 - 1, -1.0],
            [-1.0, 1.0 / 1.000001 * 2 - 1, 1.0 / 2.000001 * 2 - 1],
        ]
    )
    np.testing.assert_allclose(
        normalize(x, STATS, use_quantiles=True), want, rtol=1e-12, atol=1e-15
    )
    np.testing.assert_allclose(
        unnormalize(want, STATS, use_quantiles=True), x, rtol=1e-12, atol=1e-12
    )
    # Dims past the stats pass through unchanged on the way back.
    padded = np.concatenate([want, np.full((2, 1), 0.25)], axis=-1)
    back = unnormalize(padded, STATS, use_quantiles=True)
    np.testing.assert_allclose(back[:, :3], x, atol=1e-12)
    assert back[:, 3].tolist() == [0.25, 0.25]


def test_quantile_without_quantiles_is_a_clear_error():
    with pytest.raises(ValueError, match="q01 and q99"):
        normalize(np.zeros(2), NormStats(np.zeros(2), np.ones(2)), use_quantiles=True)
