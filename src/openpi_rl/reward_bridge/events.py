"""Wire format of the bridge: feedback events in, acknowledgements and errors out.

    event:  {"robot_id", "kind", "value", "client_time", "idempotency_key", ["episode_id"]}
            kind: step_reward | success | failure | end_episode; the operator is the one the
            token names (an "operator" field is ignored); value is optional for verdicts
            (success → +success_value, failure → −failure_value, end_episode → 0).
    ack:    {"type": "ack", "idempotency_key", "event_id", "transition_id", "episode_id",
             "status", "duplicate"}        (sent only after the event's commit)
    error:  {"type": "error", "error": {"code", "message"}, ["idempotency_key"]}

Error codes (the fixed set): bad_json, bad_event, too_large, unauthorized, unknown_type,
not_stored (the replay could not commit in time: resend with the same idempotency key), and
on HTTP bad_request (framing, unknown endpoint) and internal.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

from openpi_rl.reward_bridge.credit import KINDS, Feedback

ERROR_CODES = (
    "bad_json",
    "bad_event",
    "too_large",
    "unauthorized",
    "unknown_type",
    "not_stored",
    "bad_request",
    "internal",
)
MAX_ID_CHARS = 128
MAX_ABS_CLIENT_TIME = 1e11  # seconds since the epoch: past year 5000 is not a clock


class BadRequest(Exception):
    """A message the bridge refuses; becomes an error reply, the connection stays."""

    def __init__(self, code: str, message: str):
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def error_reply(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "error": {"code": code, "message": message}, **extra}


def _no_constants(name: str) -> float:
    raise BadRequest("bad_json", f"{name} is not valid JSON (values must be finite numbers)")


def parse_json(data: str | bytes, max_bytes: int) -> dict[str, Any]:
    """A JSON object from a frame or body of at most `max_bytes`; NaN/Infinity refused."""
    if len(data) > max_bytes:
        raise BadRequest("too_large", f"message of {len(data)} bytes; at most {max_bytes}")
    try:
        msg = json.loads(data, parse_constant=_no_constants)
    except BadRequest:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest("bad_json", f"not JSON: {e}") from None
    except RecursionError:  # `[[[[...` deeper than the interpreter's stack
        raise BadRequest("bad_json", "not JSON: nested too deeply") from None
    if not isinstance(msg, dict):
        raise BadRequest("bad_json", f"expected a JSON object, got {type(msg).__name__}")
    return msg


def check_id(v: Any, key: str) -> str:
    """An id (robot, episode, idempotency key) as the replay can store it: a printable string
    of 1..MAX_ID_CHARS characters (no control characters, no lone surrogates, which UTF-8
    cannot encode and SQLite would refuse inside the writer's commit)."""
    if not isinstance(v, str) or not 0 < len(v) <= MAX_ID_CHARS or not v.isprintable():
        raise BadRequest(
            "bad_event",
            f"{key}: expected a printable string of 1..{MAX_ID_CHARS} characters, got {show(v)}",
        )
    return v


def printable_id(v: Any) -> str | None:
    """`v` if it is a valid id (to echo back in an error reply), else None."""
    try:
        return check_id(v, "id")
    except BadRequest:
        return None


def show(v: Any) -> str:
    """A short, log- and UTF-8-safe rendering of a client's value for an error message."""
    big = isinstance(v, int) and abs(v) >= 10**30
    text = f"an integer of {v.bit_length()} bits" if big else repr(v)
    return text[:60].encode("ascii", "backslashreplace").decode("ascii")


def _text(msg: dict, key: str, required: bool = True) -> str | None:
    v = msg.get(key)
    if v is None and not required:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and key == "episode_id":
        v = str(v)  # the replay stores episode ids as text
    return check_id(v, key)


def parse_number(msg: dict, key: str, max_abs: float, required: bool = False) -> float | None:
    """`msg[key]` as a finite float within +-max_abs (None if absent and not required)."""
    v = msg.get(key)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BadRequest("bad_event", f"{key}: expected a finite number, got {show(v)}")
    try:
        f = float(v)  # an integer past a float's range raises OverflowError
    except OverflowError:
        f = math.inf
    if not (math.isfinite(f) and abs(f) <= max_abs):
        raise BadRequest(
            "bad_event", f"{key}: expected a finite number, |{key}| <= {max_abs:g}, got {show(v)}"
        )
    return f


def parse_feedback(
    msg: dict[str, Any],
    operator: str,
    now: float,
    max_abs_value: float = 10.0,
    success_value: float = 1.0,
    failure_value: float = 1.0,
) -> Feedback:
    """Validate one event; errors name the field, what was expected and what came."""
    robot_id = _text(msg, "robot_id")
    kind = msg.get("kind")
    if kind not in KINDS:
        raise BadRequest("bad_event", f"kind: expected one of {list(KINDS)}, got {show(kind)}")
    value = parse_number(msg, "value", max_abs_value)
    if value is None:
        if kind == "step_reward":
            raise BadRequest("bad_event", "value: a step_reward needs a number")
        value = {"success": success_value, "failure": -failure_value, "end_episode": 0.0}[kind]
    if kind == "end_episode":
        value = 0.0  # closes without reward
    key = _text(msg, "idempotency_key", required=False) or f"bridge-{uuid.uuid4().hex}"
    return Feedback(
        robot_id=robot_id,  # type: ignore[arg-type]
        kind=kind,
        value=value,
        operator=operator,
        t=now,
        idempotency_key=key,
        client_time=parse_number(msg, "client_time", MAX_ABS_CLIENT_TIME),
        episode_id=_text(msg, "episode_id", required=False),
    )
