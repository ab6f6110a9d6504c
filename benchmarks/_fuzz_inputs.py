"""The hostile inputs: seeded hypothesis strategies and the valid messages they mangle.

Random bytes, truncated and bit-flipped messages, deep nesting, headers declaring GB-sized
bins/arrays/bodies, wrong types in every field, NaN/inf, lying ndarray maps, oversize frames,
amplifiers (a frame of thousands of empty maps), mangled HTTP requests and WebSocket upgrades;
`corpus` draws `n` of a strategy, the same for the same seed. `report_specs` draws `report`s
whose transition id is resolved when sent (the attacker's own transitions, another robot's, the
good robot's, or a literal: 2**63, negative, float, ...) with every other field mangled too.
Also the valid templates (`GOOD_*`, one per ZMQ message type) and what a slow-loris trickles
(`SLOW`). Sizes and tokens are the rig's (`_fuzz_rigs.py`).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import msgpack
import numpy as np
from _fuzz_rigs import ADMIN_TOKEN, MAX_BYTES, OPERATOR_TOKEN
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st


def corpus(strategy: st.SearchStrategy, n: int, seed: int) -> list[Any]:
    """`n` examples of `strategy`, the same for the same seed (hypothesis drives generation)."""
    out: list[Any] = []

    @hseed(seed)
    @settings(
        max_examples=n,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(x: Any) -> None:
        out.append(x)

    collect()
    return out


_FLOATS = st.floats(allow_nan=True, allow_infinity=True)
_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | _FLOATS
    | st.text(max_size=64)
    | st.binary(max_size=64)
)
ANY_VALUE = st.recursive(
    _LEAF,
    lambda kids: (
        st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=8), kids, max_size=6)
    ),
    max_leaves=30,
)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | _FLOATS | st.text(max_size=64),
    lambda kids: (
        st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=8), kids, max_size=6)
    ),
    max_leaves=30,
)


def _huge_header() -> st.SearchStrategy[bytes]:
    """msgpack bin32/str32/array32/map32/ext32 headers declaring up to 4 GiB, little data."""
    return st.builds(
        lambda tag, n, tail: tag + struct.pack(">I", n) + tail,
        st.sampled_from([b"\xc6", b"\xdb", b"\xdd", b"\xdf", b"\xc9"]),
        st.integers(2**20, 2**32 - 1),
        st.binary(max_size=32),
    )


def _ndarray_lie() -> st.SearchStrategy[bytes]:
    shape = st.lists(st.integers(-(2**40), 2**40), max_size=5)
    dtype = st.sampled_from(["<f4", "<f8", "|O", "<U10", "V8", ">i8", "", "float128"]) | st.text(
        max_size=8
    )
    arr = st.fixed_dictionaries(
        {"__ndarray__": st.sampled_from([True, 1, "yes"]), "data": st.binary(max_size=64)},
        optional={"dtype": dtype, "shape": shape},
    )
    return arr.map(lambda a: msgpack.packb({"type": "infer", "observation": {"state": a}}))


def _nan_arrays(good: dict, obs_key: str | None) -> st.SearchStrategy[bytes]:
    from openpi_rl_client import wire

    def build(vals: list[float], dtype: str, extra: int) -> bytes:
        arr = np.array(vals + [0.0] * extra, dtype=dtype)
        obs = {"state": arr}
        msg = {**good, obs_key: obs} if obs_key else obs
        return wire.packb(msg)

    return st.builds(
        build,
        st.lists(_FLOATS, min_size=1, max_size=8),
        st.sampled_from(["float32", "float64", "float16"]),
        st.integers(0, 4),
    )


def msgpack_hostile(good: dict, obs_key: str | None = None) -> st.SearchStrategy[bytes]:
    """Hostile msgpack frames around the valid message `good`."""
    packed = msgpack.packb(good, use_bin_type=True, default=lambda o: o.tolist())

    def replace(field: str, value: Any) -> bytes:
        return msgpack.packb({**good, field: value}, use_bin_type=True)

    def flip(i: int, b: int) -> bytes:
        out = bytearray(packed)
        out[i % len(out)] ^= b or 1
        return bytes(out)

    return st.one_of(
        st.binary(max_size=2048),  # random bytes
        st.integers(0, len(packed) - 1).map(lambda k: packed[:k]),  # truncated
        st.builds(flip, st.integers(0, 10**6), st.integers(0, 255)),  # bit flips
        st.integers(1, 100_000).map(lambda d: b"\x91" * d + b"\xc0"),  # deep arrays
        st.integers(1, 50_000).map(lambda d: b"\x81\xa1k" * d + b"\xc0"),  # deep maps
        _huge_header(),
        st.builds(replace, st.sampled_from([*sorted(good), "extra"]), ANY_VALUE),  # wrong types
        ANY_VALUE.map(lambda v: msgpack.packb(v, use_bin_type=True)),  # not a map at all
        _nan_arrays(good, obs_key),
        _ndarray_lie(),
        st.integers(MAX_BYTES + 1, 2 * MAX_BYTES).map(lambda n: b"\x00" * n),  # oversize
    )


def amplifiers(good: dict) -> st.SearchStrategy[bytes]:
    """Small frames that decode into many objects: an array32 or map32 of empty maps, empty
    arrays or nils filling up to the frame cap (at 16 MiB, 16 M dicts), bare or as a field of
    the valid message `good` (appended to its map by hand: msgpack would not build it lazily)."""
    fill = st.sampled_from([b"\x80", b"\x90", b"\xc0", b"\x91\x80", b"\x81\xa0\x80"])

    def array(item: bytes, k: int) -> bytes:
        return b"\xdd" + struct.pack(">I", k) + item * k

    def mapping(item: bytes, k: int) -> bytes:  # int keys 0..k-1, each to `item`
        return b"\xdf" + struct.pack(">I", k) + b"".join(msgpack.packb(i) + item for i in range(k))

    def inside(field: str, body: bytes) -> bytes:
        packed = msgpack.packb({f: v for f, v in good.items() if f != field}, use_bin_type=True)
        assert 0x80 <= packed[0] <= 0x8E  # a fixmap: one more entry fits the header
        return bytes([packed[0] + 1]) + packed[1:] + msgpack.packb(field) + body

    room = MAX_BYTES - 1024  # the frame cap, less the valid message around the body
    body = st.one_of(
        st.builds(lambda it, f: array(it, max(1, int(f * room / len(it)))), fill, st.floats(0, 1)),
        st.builds(mapping, fill, st.integers(1_000, 9_000)),
        st.builds(array, st.just(b"\x80"), st.integers(16_380, 16_400)),  # about the cap
    )
    return st.one_of(body, st.builds(inside, st.sampled_from([*sorted(good), "extra"]), body))


_MISSING = ("missing",)  # a field left out of a report


def _np(dtype: str, shape: tuple, fill: float) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.full(shape, fill).astype(dtype)


def report_specs() -> st.SearchStrategy[dict]:
    """`report`s to send with `_fuzz_attacks.zmq_report_attack`. The transition id is a plan,
    resolved at send time: ("ref", "own") the attacker's newest transition, "own_old" its oldest,
    "other" another hostile robot's, "good" one of the good robot's, ("near", d) the attacker's
    newest plus d (a neighbour: any robot's), ("val", v) a literal. The robot is "self", "other"
    (the other hostile robot), "fresh" (a name never served) or a literal. A report the server may
    acknowledge names a transition served to the robot it names; any other acknowledged is a bug.
    """
    # One weighted pick (hypothesis's one_of does not weigh its branches evenly): real ids in
    # two of three reports, the attacker's own in one of three.
    refs = ["own"] * 4 + ["own_old", "good", "good", "other"]
    tid = st.builds(
        lambda k, d, special, i, odd: [
            *[("ref", r) for r in refs],
            ("near", d),
            ("val", special),
            ("val", i),
            ("val", odd),
        ][k],
        st.integers(0, len(refs) + 3),
        st.integers(-3, 3),
        st.sampled_from([2**63, 2**63 - 1, 2**64 - 1, -(2**63), -1, 0, 2**62, 2**53 + 1]),
        st.integers(-(2**63), 2**64 - 1),
        st.floats()
        | st.text(max_size=12)
        | st.binary(max_size=12)
        | st.none()
        | st.booleans()
        | st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3),
    )
    # One weighted pick (hypothesis's one_of does not weigh its branches evenly): mostly the
    # attacker itself, so that the transition id and the mangled fields decide.
    robot = st.builds(
        lambda k, text, odd: [*["self"] * 6, "other", "fresh", ("val", text), ("val", odd)][k],
        st.integers(0, 9),
        st.text(max_size=16),
        st.integers(-(2**63), 2**64 - 1) | st.none() | st.binary(max_size=8),
    )
    big = [1e308, -1e308, 1.7976931348623157e308, 5e-324, 1000.0, 1000.5, -1000.5, 1e16]
    special = [float("nan"), float("inf"), float("-inf")]
    npgeneric = st.builds(
        lambda x, dt: {b"__npgeneric__": True, b"data": x, b"dtype": dt},
        st.floats() | st.integers(-(2**63), 2**63 - 1) | st.booleans(),
        st.sampled_from(["<f8", "<f4", "<i8", "|b1", "<c16", "|O"]),
    )
    reward = st.one_of(
        st.floats(),
        st.sampled_from(big + special),
        st.integers(-(2**63), 2**64 - 1),
        st.booleans() | st.none() | st.text(max_size=8) | st.lists(st.floats(), max_size=3),
        npgeneric,
        st.just(_MISSING),
    )
    flag = st.one_of(
        st.booleans(), st.booleans(), st.integers(-1, 2), st.none(), st.text(max_size=4),
        st.floats(), npgeneric, st.just(_MISSING),
    )  # fmt: skip
    shape = st.one_of(
        st.sampled_from(["chunk", "chunk+1", "flat"]),
        st.lists(st.integers(0, 5), max_size=4).map(tuple),
    )
    executed = st.one_of(
        st.just(_MISSING),
        st.builds(
            lambda dt, sh, fill: ("array", dt, sh, fill),
            st.sampled_from(["<f4", "<f8", "<f2", "<i8", "<u8", "|u1", "|b1", "<i2"]),
            shape,
            st.sampled_from([0.0, 1.0, -1.0, 1e300, 3.4e38, 1e39, 2**62, -(2**63), *special]),
        ),
        ANY_VALUE,
        st.builds(  # an ndarray map whose header lies about its data
            lambda dt, sh, data: {b"__ndarray__": True, b"data": data, b"dtype": dt, b"shape": sh},
            st.sampled_from(["<f4", "<f8", "|O", "<U4", "V8", ">f4", "<c8"]) | st.text(max_size=4),
            st.lists(st.integers(-(2**31), 2**31), max_size=3),
            st.binary(max_size=32),
        ),
    )
    # Each report mangles at most two of its fields (or none): the others are valid, so that
    # what decides its fate is the mangled field, the transition id and the robot.
    valid = st.fixed_dictionaries(
        {
            "reward": st.floats(-10, 10) | st.sampled_from([0.0, 1.0, -1.0]),
            "done": st.booleans(),
            "truncated": st.booleans(),
            "intervened": st.just(_MISSING) | st.booleans(),
            "executed_actions": st.just(_MISSING)
            | st.sampled_from(["<f4", "<f8", "<i8"]).map(lambda dt: ("array", dt, "chunk", 0.5)),
        }
    )
    hostile = st.fixed_dictionaries(
        {
            "reward": reward,
            "done": flag,
            "truncated": flag,
            "intervened": st.just(_MISSING) | flag,
            "executed_actions": executed,
        }
    )
    fields = ["reward", "done", "truncated", "intervened", "executed_actions", "drop", "extra"]
    return st.builds(
        lambda t, r, v, h, mangle, drop, extra, single: {
            "tid": t,
            "robot": r,
            **{k: (h[k] if k in mangle else v[k]) for k in v},
            "drop": drop if "drop" in mangle else [],
            "extra": extra if "extra" in mangle else {},
            "single_float": single,  # floats as msgpack float32: NaN and inf stay so
        },
        tid,
        robot,
        valid,
        hostile,
        st.sets(st.sampled_from(fields), max_size=2),
        st.lists(st.sampled_from(["type", "protocol_version", "robot_id"]), min_size=1, max_size=1),
        st.dictionaries(st.text(max_size=6), ANY_VALUE, min_size=1, max_size=2),
        st.booleans(),
    )


def json_hostile(good: dict) -> st.SearchStrategy[str | bytes]:
    text = json.dumps(good)

    def replace(field: str, value: Any) -> str:
        return json.dumps({**good, field: value})  # NaN/Infinity written as JSON's extensions

    return st.one_of(
        st.text(max_size=512),
        st.binary(max_size=512),  # a binary frame where text is expected
        st.integers(0, len(text) - 1).map(lambda k: text[:k]),
        st.integers(1, 200_000).map(lambda d: "[" * d + "]" * (d % 3)),
        st.integers(1, 50_000).map(lambda d: '{"a":' * d + "1" + "}" * (d % 2)),
        st.builds(replace, st.sampled_from([*sorted(good), "type", "extra"]), JSON_VALUE),
        JSON_VALUE.map(lambda v: json.dumps(v)),
        st.integers(10, 20_000).map(lambda n: '{"value": ' + "9" * n + "}"),  # huge ints
        st.sampled_from(['{"value": 1e999}', '{"value": NaN}', '{"value": -Infinity}']),
        st.integers(MAX_BYTES + 1, 2 * MAX_BYTES).map(lambda n: '{"x": "' + "a" * n + '"}'),
    )


def http_hostile(feedback: dict) -> st.SearchStrategy[bytes]:
    def request(method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers)
        return head.encode("utf-8", "surrogatepass") + b"\r\n" + body

    auth = st.sampled_from(
        [("Authorization", f"Bearer {OPERATOR_TOKEN}"), ("Authorization", "Bearer nope")]
    )
    length = st.one_of(
        st.integers(-(10**12), 10**12).map(str),
        st.sampled_from(["", "abc", "1e9", "0x10", "99999999999999999999", " 5"]),
    )
    body = json_hostile(feedback).map(lambda t: t.encode() if isinstance(t, str) else t)
    header_value = st.text(st.characters(codec="latin-1"), max_size=64)

    def with_length(body: bytes, declared: str | None, extra: list) -> tuple:
        hs = [auth_ok, ("Content-Type", "application/json"), *extra]
        hs.append(("Content-Length", str(len(body)) if declared is None else declared))
        return hs, body

    auth_ok = ("Authorization", f"Bearer {OPERATOR_TOKEN}")
    return st.one_of(
        st.binary(max_size=1024),  # not HTTP
        st.builds(
            lambda hb, m, p: request(m, p, *hb),
            st.builds(
                with_length,
                body,
                st.none() | length,
                st.lists(
                    st.tuples(st.text("abcXY-", min_size=1, max_size=8), header_value), max_size=4
                ),
            ),
            st.sampled_from(["POST", "GET", "PUT", "DELETE", "post", "X" * 300]),
            st.sampled_from(
                ["/feedback", "/query", "/query?token=wrong", "/healthz", "/../x", "*"]
            ),
        ),
        st.builds(
            lambda a, n: request("POST", "/feedback", [a, ("X-Long", "a" * n)], b""),
            auth,
            st.integers(60_000, 70_000),  # a header line past the reader's 64 KiB limit
        ),
        st.integers(101, 300).map(
            lambda k: request("GET", "/healthz", [(f"H{i}", "v") for i in range(k)], b"")
        ),
        st.builds(
            lambda te: request("POST", "/feedback", [auth_ok, ("Transfer-Encoding", te)], b"5\r\n"),
            st.sampled_from(["chunked", "gzip, chunked"]),
        ),
    )


def ws_handshake_hostile() -> st.SearchStrategy[bytes]:
    """What arrives before a WebSocket handshake completes: garbage or a mangled upgrade."""

    def upgrade(path: str, version: str, key: str, extra: str) -> bytes:
        return (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n{extra}\r\n"
        ).encode("utf-8", "surrogatepass")

    return st.one_of(
        st.binary(max_size=1024),
        st.builds(
            upgrade,
            st.sampled_from(["/", "/pendant", "/query", "/x" * 50]),
            st.sampled_from(["13", "8", "", "99999"]),
            st.sampled_from(["dGhlIHNhbXBsZSBub25jZQ==", "", "!!"]),
            st.sampled_from(["", "Content-Length: 99999999\r\n", "X: " + "a" * 9000 + "\r\n"]),
        ),
    )


GOOD_INFER = {
    "type": "infer",
    "protocol_version": 1,
    "request_id": "x",
    "robot_id": "r",
    "episode_id": "e",
    "observation": {"state": [0.0, 0.0, 0.0, 0.0]},
}
GOOD_REPORT = {
    "type": "report",
    "protocol_version": 1,
    "request_id": "x",
    "robot_id": "r",
    "transition_id": 1,
    "reward": 0.0,
    "done": False,
    "truncated": False,
    "intervened": False,
    "executed_actions": [[0.0]],
}
GOOD_HEALTH = {"type": "health", "protocol_version": 1, "request_id": "x", "robot_id": "r"}
GOOD_METADATA = {"type": "metadata", "protocol_version": 1, "request_id": "x", "robot_id": "r"}
GOOD_ADMIN = {"token": ADMIN_TOKEN, "command": "status", "version": 0}
GOOD_EVENT = {
    "type": "feedback",
    "robot_id": "r",
    "kind": "step_reward",
    "value": 1.0,
    "idempotency_key": "k",
}
ZMTP_GREETING = b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f\x03\x00NULL" + b"\x00" * 16
SLOW = {  # what a slow-loris trickles: a handshake or request head that never ends
    "zmq": ZMTP_GREETING,
    "admin": ZMTP_GREETING,
    "openpi_ws": b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
    "bridge_ws": b"GET /pendant HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
    "bridge_http": b"POST /feedback HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n",
}
