"""Hostile input on every listener (guarantee 6): seeded hypothesis inputs, slow-loris and a
connection flood at each of zmq, openpi_ws, bridge_ws, bridge_http and admin, while a good
client per listener keeps sending valid requests. The full-size run is
`benchmarks/fuzz_listeners.py` (10,000 per listener)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import fuzz_listeners

N = 150  # hostile inputs per listener here; slow-loris and flood come on top


@pytest.fixture(scope="module")
def results():
    args = fuzz_listeners.Args(n=N, slowloris=6, flood=60, handshake_timeout_s=1.0, good_hz=20.0)
    return fuzz_listeners.run(args)


@pytest.mark.parametrize("listener", fuzz_listeners.LISTENERS)
def test_listener_survives_hostile_input_and_keeps_serving_good_clients(results, listener):
    r = results[listener]
    assert r["tried"] >= N + 6 + 60
    assert r["crashes"] == 0, r
    assert r["good_client_errors"] == 0, r
    assert r["good_client_requests"] > 0


@pytest.mark.parametrize("listener", fuzz_listeners.LISTENERS)
def test_slowloris_connections_are_dropped_after_the_handshake_timeout(results, listener):
    assert results[listener]["slowloris_dropped"] == results[listener]["slowloris"]
