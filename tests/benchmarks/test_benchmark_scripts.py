"""The benchmark scripts keep working: their --quick runs end in one JSON line with the
figures the issue names. (Timings themselves are not asserted: the machine is shared.)

The heaviest smoke runs are marked slow (CI skips them; `pytest -m slow` runs them) where
another test already covers the same path: pi0_fast training and sizes (tests/models,
tests/train), the fuzz harness (tests/security), 4 robots at 50 Hz (tests/policy_server).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks"


def _last_json(script: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ppo_update_speed_quick_reports_its_ratios():
    figures = _last_json("ppo_update_speed.py", "--samples", "512", "--epochs", "2")
    assert figures["fused_samples_per_s"] > 0
    assert figures["fused_over_unfused"] > 0 and figures["fused_over_plain"] > 0


def test_learn_inverted_pendulum_quick_reaches_950():
    figures = _last_json("learn_inverted_pendulum.py")
    steps = figures["steps_to_950"]
    assert len(steps) == 1 and steps[0] is not None and steps[0] <= 100_000


@pytest.mark.slow
def test_pi0_fast_learning_quick_reports_the_return_ratio():
    figures = _last_json("learn_inverted_pendulum.py", "--model", "pi0_fast")
    assert set(figures) >= {"pi0_fast_return_ratio", "init_return", "final_return"}
    assert figures["final_return"][0] > figures["init_return"][0]


@pytest.mark.slow
def test_pi0_fast_sizes_quick_reports_params_and_times():
    figures = _last_json("pi0_fast_sizes.py")
    assert figures["params"]["dummy"] < 1_000_000 < figures["params"]["gemma_2b"]
    assert figures["sample_ms"]["dummy"] > 0 and figures["update_ms"]["dummy"] > 0


def test_bridge_load_quick_stores_every_acked_event_once():
    figures = _last_json("bridge_load.py")
    assert figures["connections"] == 20 and figures["acked"] == figures["sent"] > 0
    assert figures["stored"] == figures["acked"] and figures["missing"] == 0
    assert figures["duplicates"] > 0  # resends were answered, not stored again


@pytest.mark.slow
def test_robots_50hz_quick_every_reply_is_stored():
    figures = _last_json("robots_50hz.py")
    # 3 s of 50 Hz control on 4 robots; a chunk of 10 steps is asked for every ~6 ticks.
    assert figures["errors"] == 0 and figures["ticks"] >= 4 * 100 and figures["replies"] >= 4 * 10
    assert figures["stored"] == figures["replies"]


@pytest.mark.slow
def test_serve_latency_quick_reports_every_case():
    figures = _last_json("serve_latency.py", "--pg")
    assert figures["errors"] == 0
    keys = ("echo_p50_ms", "noop_p50_ms", "pi0_fast_p50_ms", "ws_p50_ms", "fleet4_p99_ms")
    for key in (*keys, "fleet4_model_bound", "noop_pg_p99_ms", "noop_pg_p99_over_noop"):
        assert figures[key] > 0, key


def test_learn_service_quick_reports_both_returns():
    figures = _last_json("learn_service.py")
    assert set(figures) >= {"service_return", "sync_return", "service_over_sync"}
    assert figures["service_env_steps"] >= figures["budget"] == 2_000
    assert figures["service_return"] > 0 and figures["sync_return"] > 0


def test_hot_swap_quick_serves_every_version_without_a_failure():
    figures = _last_json("hot_swap.py")
    assert set(figures) >= {"swaps", "requests", "failed", "late", "p99_ratio"}
    assert figures["final_version"] == 10 and 1 <= figures["swaps"] <= 10
    assert figures["failed"] == 0 and figures["compilations_during_run"] == 0
    assert figures["requests_quiet"] > 0 and figures["requests_swapping"] > 0
    assert figures["p99_ratio"] > 0


@pytest.mark.slow
def test_pi0_fast_decode_quick_reports_per_step_times_before_and_after():
    figures = _last_json("pi0_fast_decode.py")
    assert figures["same_tokens"]
    for impl in ("before", "after"):
        assert set(figures["per_step_ms"][impl]) == {"1", "4"}
        assert figures["serve_ms"]["batched"][impl] > 0


@pytest.mark.slow
def test_chaos_quick_survives_every_kill():
    figures = _last_json("chaos.py", "--interval-min-s", "1", "--interval-max-s", "2")
    assert set(figures) >= {
        "kills", "survived", "acked_events_lost", "transitions_duplicated",
        "checkpoints_unrestorable",
    }  # fmt: skip
    assert figures["kills"] == figures["survived"] == 5
    assert figures["acked_events_lost"] == 0 and figures["transitions_duplicated"] == 0
    assert figures["checkpoints_unrestorable"] == 0
    # Then kill -9 of the daemon itself, restarted: every acknowledged report still stored.
    assert figures["daemon_kills"] == figures["daemon_kills_survived"] == 1
    assert figures["acked_reports"] > 0 and figures["acked_reports_lost"] == 0
    assert figures["acked_reports_altered"] == 0


@pytest.mark.slow
def test_fuzz_listeners_quick_crashes_nothing_and_good_clients_see_no_error():
    figures = _last_json("fuzz_listeners.py")
    assert set(figures) == {"zmq", "openpi_ws", "bridge_ws", "bridge_http", "admin"}
    for name, r in figures.items():
        assert r["tried"] >= 500, name
        assert r["crashes"] == 0 and r["good_client_errors"] == 0, (name, r)
        assert r["good_client_p99_ms"] > 0, name
    z = figures["zmq"]  # the replay on, every message type, acknowledged reports all stored
    assert z["health_after"] == "ready" and z["replay_writer_alive"]
    assert z["reports"]["foreign_reports_acked"] == 0 and z["acked_reports_lost"] == 0
    assert z["good_reports_acked"] > 0 and z["good_transitions_altered"] == 0
    for name in ("bridge_ws", "bridge_http"):
        assert figures[name]["acked_events_lost"] == 0, (name, figures[name])


def test_report_ack_quick_reads_back_every_acknowledged_report():
    figures = _last_json("report_ack.py")
    assert figures["acknowledged"] == figures["rounds"] == 200
    assert figures["acknowledged_lost"] == 0
    assert figures["report_p50_ms"] > 0 and figures["report_over_health_p50"] > 0


def test_paligemma_decode_quick_reports_prefill_and_decode_rate():
    # Ours only (openpi's side needs its scratch venv and a subprocess; the full run has it).
    figures = _last_json("paligemma_decode.py", "--no-openpi")
    assert figures["openpi"] is False and figures["steps"] == 8
    assert figures["tiny"]["params"] > 0 and figures["tiny"]["ours"]["prefill_ms"] > 0
    assert "decode_tok_per_s" in figures["tiny"]["ours"]  # None when noise beat the timing


@pytest.mark.slow  # ~3 min on 2 cores: two servers compile Pi0-FAST; the delta swap itself is
# covered by tests/policy_server/test_swap.py
def test_hot_swap_lora_quick_reports_bytes_and_swap_times_side_by_side():
    """Full versions against LoRA delta versions of one model (tiny_lora here; the README's
    figures are mid_lora's): every version served, a delta smaller than a full version, and
    LoRA swaps that read only the delta."""
    figures = _last_json(
        "hot_swap.py", "--model-variant", "tiny_lora", "--versions", "3", "--block", "3",
        "--publish-hz", "1", "--hz", "2",
    )  # fmt: skip
    full, lora = figures["full"], figures["lora"]
    for mode in (full, lora):
        assert mode["failed"] == 0 and mode["final_version"] == 3 and mode["swaps"] >= 1
    assert lora["bytes_per_version"] < full["bytes_per_version"] / 2
    assert lora["bytes_read_per_swap"] < full["bytes_read_per_swap"] / 2
    assert 0 < figures["lora_over_full"]["bytes_per_version"] < 0.5
