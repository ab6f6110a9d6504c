"""The robot ↔ policy-server protocol: message shapes, framing and error codes, in one place.

Both ends import this module (the server through ``openpi_rl_client``), so they agree by
construction. Payloads are encoded with :mod:`openpi_rl_client.wire` (msgpack, numpy arrays
as ``{__ndarray__, data, dtype, shape}`` maps, the openpi-client scheme).

Framing (ZMQ)
-------------
The client is a DEALER socket; it sends two frames ``[b"", payload]``: the empty delimiter a
REQ socket would add, then ONE frame holding the msgpack request. A ROUTER server therefore
receives ``[identity, b"", payload]`` (the same as from a REQ client) and answers
``[identity, b"", reply_payload]``; the client receives ``[b"", reply_payload]``. One request,
one reply, one payload frame each way.

Every request carries ``"request_id"`` (a str, unique per request); the server copies it into
the reply. A resend after a timeout reuses the id, so the server dedupes ``infer`` and
``report`` by ``(robot_id, request_id)``: it answers a resend with the first reply (or, while the
first is still queued, sends that reply to the new socket), so one request is one transition and
one report one reward. The client discards replies whose id is not the one it waits
for (a late reply to an abandoned request). A reply without an id is accepted only if it is
an error reply: a server that cannot decode a request cannot know its id.

Requests (unknown extra fields are ignored, for forward compatibility)
----------------------------------------------------------------------
Every request: ``{"type": str, "protocol_version": int, "request_id"?: str, "robot_id"?: str}``.

``infer``
    ``{"robot_id": str, "episode_id": str, "observation": {str: ndarray}, "prompt"?: str}``
    → ``{"actions": ndarray [H, D] float32, "policy_version": int, "transition_id": int,
    "server_timing": {"queue_ms": float, "infer_ms": float}}``
``report``
    ``{"robot_id": str, "transition_id": int, "reward": float, "done": bool,
    "truncated": bool, "executed_actions"?: ndarray, "intervened"?: bool}`` → ``{"ok": True}``.
    Rewards of the steps a chunk played are summed into its transition; ``executed_actions``
    (the chunk's shape ``[H, D]``) and ``intervened`` flag an operator take-over. The
    transition must be one the server served to this ``robot_id`` (among its latest
    ``report_window``; a reconnected robot keeps its own), else ``unknown_transition``; the
    reward is clamped into the server's ``reward_range``. ``{"ok": True}`` comes once the
    report is committed to the replay: an acknowledged report survives a ``kill -9``.
``metadata``
    → ``{"obs_spec": {key: {"shape": [...], "dtype": str, "optional": bool}},
    "action_horizon": int, "action_dim": int, "policy_version": int}``
``health``
    → ``{"status": "ready" | "warming" | ..., "policy_version": int}``

Errors
------
Any request may be answered ``{"error": {"code": str, "message": str}}`` with a code from
:data:`ERROR_CODES`. A bad request never ends the connection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1

# Message types.
INFER = "infer"
REPORT = "report"
METADATA = "metadata"
HEALTH = "health"
MESSAGE_TYPES = (INFER, REPORT, METADATA, HEALTH)

# Error codes: the only values an error reply's "code" may take.
BAD_MESSAGE = "bad_message"
TOO_LARGE = "too_large"
UNKNOWN_TYPE = "unknown_type"
BAD_VERSION = "bad_version"
INVALID_OBSERVATION = "invalid_observation"
INVALID_FIELD = "invalid_field"
UNKNOWN_TRANSITION = "unknown_transition"
NOT_READY = "not_ready"
OVERLOADED = "overloaded"
INTERNAL = "internal"
UNAUTHORIZED = "unauthorized"

ERROR_CODES: dict[str, str] = {
    BAD_MESSAGE: "the payload is not a decodable message (bad msgpack, bad array map, nesting)",
    TOO_LARGE: "the payload is larger than the receiver's size cap",
    UNKNOWN_TYPE: "'type' is missing or not one of infer, report, metadata, health",
    BAD_VERSION: "'protocol_version' is missing or not the receiver's PROTOCOL_VERSION",
    INVALID_OBSERVATION: "the observation does not match the policy's obs_spec (key, shape, dtype, NaN)",
    INVALID_FIELD: "a required field is missing or a field has the wrong type or value",
    UNKNOWN_TRANSITION: "a report names a transition the server does not know (or not this robot's)",
    NOT_READY: "the server is still loading or warming up its policy",
    OVERLOADED: "the server's queue is full; retry later",
    INTERNAL: "the server failed while handling a valid request",
    UNAUTHORIZED: "the request lacks the credentials the server requires (or, with CURVE, its "
    "robot_id belongs to another client key)",
}


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, code: str, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}; expected one of {sorted(ERROR_CODES)}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def reply(self) -> dict[str, Any]:
        """This error as a wire reply."""
        return error_reply(self.code, self.message)


def error_reply(code: str, message: str) -> dict[str, Any]:
    """The reply ``{"error": {"code": code, "message": message}}``; ``code`` must be known."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}; expected one of {sorted(ERROR_CODES)}")
    return {"error": {"code": code, "message": str(message)}}


def _type_name(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray {value.dtype} {list(value.shape)}"
    return type(value).__name__


def _field(msg: Mapping, name: str, kinds: tuple[type, ...], *, required: bool, what: str) -> Any:
    if name not in msg:
        if required:
            raise ProtocolError(INVALID_FIELD, f"{msg.get('type')}: missing field {name!r}")
        return None
    value = msg[name]
    # bool is an int subclass; a bool where a number is expected is a bug on the sender.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ProtocolError(INVALID_FIELD, f"{name!r}: expected {what}, got {_type_name(value)}")
    return value


def _check_request_common(msg: Mapping) -> None:
    _field(msg, "request_id", (str, int), required=False, what="str")
    robot_id = _field(msg, "robot_id", (str,), required=False, what="str")
    if robot_id is not None and not robot_id:
        raise ProtocolError(INVALID_FIELD, "'robot_id': expected a non-empty str")


def _check_infer(msg: Mapping) -> None:
    for name in ("robot_id", "episode_id"):
        if not _field(msg, name, (str,), required=True, what="non-empty str"):
            raise ProtocolError(INVALID_FIELD, f"{name!r}: expected a non-empty str, got ''")
    _field(msg, "prompt", (str,), required=False, what="str")
    if "observation" not in msg:
        raise ProtocolError(INVALID_OBSERVATION, "infer: missing field 'observation'")
    obs = msg["observation"]
    if not isinstance(obs, dict):
        raise ProtocolError(
            INVALID_OBSERVATION, f"'observation': expected a map, got {_type_name(obs)}"
        )
    for key, value in obs.items():
        if not isinstance(key, str):
            raise ProtocolError(INVALID_OBSERVATION, f"observation key {key!r}: expected str")
        if not isinstance(value, np.ndarray):
            raise ProtocolError(
                INVALID_OBSERVATION,
                f"observation[{key!r}]: expected ndarray, got {_type_name(value)}",
            )


def _check_report(msg: Mapping) -> None:
    if not _field(msg, "robot_id", (str,), required=True, what="non-empty str"):
        raise ProtocolError(INVALID_FIELD, "'robot_id': expected a non-empty str, got ''")
    _field(msg, "transition_id", (int,), required=True, what="int")
    reward = _field(msg, "reward", (int, float), required=True, what="float")
    if not math.isfinite(reward):
        raise ProtocolError(INVALID_FIELD, f"'reward': expected a finite float, got {reward}")
    _field(msg, "done", (bool,), required=True, what="bool")
    _field(msg, "truncated", (bool,), required=True, what="bool")
    _field(msg, "intervened", (bool,), required=False, what="bool")
    executed = _field(msg, "executed_actions", (np.ndarray,), required=False, what="ndarray")
    if executed is not None:
        if executed.dtype.kind not in "fiu" or executed.ndim not in (1, 2):
            raise ProtocolError(
                INVALID_FIELD,
                f"'executed_actions': expected a numeric [H, D] or [D] array, got {_type_name(executed)}",
            )
        if executed.dtype.kind == "f" and not np.isfinite(executed).all():
            raise ProtocolError(INVALID_FIELD, "'executed_actions': contains NaN or inf")


_CHECKS = {INFER: _check_infer, REPORT: _check_report, METADATA: None, HEALTH: None}


def validate_request(msg: Any) -> tuple[str, dict]:
    """Check a decoded request's type, version, required fields and field types.

    Returns ``(type, msg)``. Raises :class:`ProtocolError` with ``unknown_type``,
    ``bad_version``, ``invalid_field`` or ``invalid_observation``. Observation keys, shapes and
    dtypes against the policy's spec are checked by :func:`check_observation`.
    """
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_MESSAGE, f"request: expected a map, got {_type_name(msg)}")
    kind = msg.get("type")
    if kind not in MESSAGE_TYPES:
        raise ProtocolError(
            UNKNOWN_TYPE, f"'type': expected one of {list(MESSAGE_TYPES)}, got {kind!r}"
        )
    version = msg.get("protocol_version")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(
            BAD_VERSION, f"'protocol_version': expected {PROTOCOL_VERSION}, got {version!r}"
        )
    _check_request_common(msg)
    check = _CHECKS[kind]
    if check is not None:
        check(msg)
    return kind, msg


def check_observation(
    observation: Mapping[str, np.ndarray], obs_spec: Mapping[str, Mapping]
) -> None:
    """Check an observation against an ``obs_spec`` as served by ``metadata``.

    ``obs_spec``: ``{key: {"shape": [...], "dtype": str, "optional": bool}}``. Every
    non-optional key must be present, no unknown key may be, shapes and dtypes must match
    exactly and float arrays must be finite. Raises ``ProtocolError(invalid_observation)``
    naming the key, what was expected and what came.
    """
    for key, spec in obs_spec.items():
        if key not in observation:
            if spec.get("optional", False):
                continue
            raise ProtocolError(INVALID_OBSERVATION, f"observation: missing key {key!r}")
        value = observation[key]
        want_dtype = np.dtype(spec["dtype"])
        want_shape = tuple(spec["shape"])
        if (
            not isinstance(value, np.ndarray)
            or value.dtype != want_dtype
            or value.shape != want_shape
        ):
            got = _type_name(value)
            raise ProtocolError(
                INVALID_OBSERVATION,
                f"observation[{key!r}]: expected {want_dtype} {list(want_shape)}, got {got}",
            )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ProtocolError(INVALID_OBSERVATION, f"observation[{key!r}]: contains NaN or inf")
    unknown = sorted(set(observation) - set(obs_spec))
    if unknown:
        raise ProtocolError(
            INVALID_OBSERVATION,
            f"observation: unknown keys {unknown}; expected a subset of {sorted(obs_spec)}",
        )
