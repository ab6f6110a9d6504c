"""Request validation and error replies: every bad request maps to one documented code."""

from __future__ import annotations

import numpy as np
import pytest

from openpi_rl_client import protocol, wire
from openpi_rl_client.protocol import (
    ERROR_CODES,
    PROTOCOL_VERSION,
    ProtocolError,
    check_observation,
    error_reply,
    validate_request,
)


def _infer(**over):
    msg = {
        "type": "infer",
        "protocol_version": PROTOCOL_VERSION,
        "request_id": "s-1",
        "robot_id": "arm0",
        "episode_id": "e1",
        "observation": {"state": np.zeros(4, np.float32)},
    }
    msg.update(over)
    return msg


def _report(**over):
    msg = {
        "type": "report",
        "protocol_version": PROTOCOL_VERSION,
        "robot_id": "arm0",
        "transition_id": 3,
        "reward": 1.0,
        "done": False,
        "truncated": False,
    }
    msg.update(over)
    return msg


def test_error_codes_are_the_documented_set():
    assert set(ERROR_CODES) == {
        "bad_message", "too_large", "unknown_type", "bad_version", "invalid_observation",
        "invalid_field", "unknown_transition", "not_ready", "overloaded", "internal",
        "unauthorized",
    }  # fmt: skip
    assert error_reply("overloaded", "queue full") == {
        "error": {"code": "overloaded", "message": "queue full"}
    }
    with pytest.raises(ValueError):
        error_reply("nope", "x")
    assert issubclass(wire.WireError, ProtocolError) and issubclass(ProtocolError, ValueError)


def test_valid_requests_pass_after_a_wire_round_trip():
    for msg in (
        _infer(prompt="pick"),
        _report(executed_actions=np.zeros((10, 7), np.float32), intervened=True, extra="ignored"),
        {"type": "metadata", "protocol_version": 1},
        {"type": "health", "protocol_version": 1, "robot_id": "arm0"},
    ):
        kind, decoded = validate_request(wire.unpackb(wire.packb(msg)))
        assert kind == msg["type"] and decoded["type"] == kind


@pytest.mark.parametrize(
    ("msg", "code", "text"),
    [
        ([1, 2], "bad_message", "expected a map"),
        ({"protocol_version": 1}, "unknown_type", "'type'"),
        (_infer(type="train"), "unknown_type", "'train'"),
        (_infer(protocol_version=2), "bad_version", "expected 1, got 2"),
        (_infer(protocol_version=True), "bad_version", "got True"),
        ({"type": "health"}, "bad_version", "got None"),
        (_infer(robot_id=""), "invalid_field", "robot_id"),
        (_infer(episode_id=5), "invalid_field", "'episode_id': expected non-empty str, got int"),
        (_infer(prompt=b"x"), "invalid_field", "prompt"),
        (_infer(observation=[1]), "invalid_observation", "expected a map"),
        (_infer(observation={"state": [1.0]}), "invalid_observation", "observation['state']"),
        (
            {k: v for k, v in _infer().items() if k != "observation"},
            "invalid_observation",
            "missing",
        ),
        (
            {k: v for k, v in _report().items() if k != "done"},
            "invalid_field",
            "missing field 'done'",
        ),
        (_report(transition_id="3"), "invalid_field", "transition_id"),
        (_report(transition_id=True), "invalid_field", "transition_id"),
        (_report(reward=float("nan")), "invalid_field", "finite"),
        (_report(reward=True), "invalid_field", "reward"),
        (_report(done=1), "invalid_field", "'done': expected bool, got int"),
        (_report(executed_actions=np.zeros((2, 2, 2))), "invalid_field", "executed_actions"),
        (_report(executed_actions=np.full(3, np.inf)), "invalid_field", "NaN or inf"),
    ],
)
def test_bad_requests_get_their_code_and_a_message_naming_the_field(msg, code, text):
    with pytest.raises(ProtocolError) as info:
        validate_request(msg)
    assert info.value.code == code
    assert text in info.value.message
    assert info.value.reply() == {"error": {"code": code, "message": info.value.message}}


def test_check_observation_against_spec():
    spec = {
        "state": {"shape": [4], "dtype": "float32", "optional": False},
        "wrist": {"shape": [8, 8, 3], "dtype": "uint8", "optional": True},
    }
    check_observation({"state": np.zeros(4, np.float32)}, spec)
    cases = [
        ({}, "missing key 'state'"),
        ({"state": np.zeros(7, np.float64)}, "observation['state']: expected float32 [4], got ndarray float64 [7]"),
        ({"state": np.array([0, np.nan, 0, 0], np.float32)}, "NaN"),
        ({"state": np.zeros(4, np.float32), "x": np.zeros(1)}, "unknown keys ['x']"),
    ]  # fmt: skip
    for obs, text in cases:
        with pytest.raises(ProtocolError, match=r".*") as info:
            check_observation(obs, spec)
        assert info.value.code == protocol.INVALID_OBSERVATION
        assert text in info.value.message
