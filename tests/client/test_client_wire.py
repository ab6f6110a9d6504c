"""The wire codec: round trips, openpi-client's exact map layout, refusals, and a seeded fuzz
that proves any bytes decode to a message or a WireError, never another exception."""

from __future__ import annotations

import random
import time

import msgpack
import numpy as np
import pytest

from openpi_rl_client import wire
from openpi_rl_client.protocol import BAD_MESSAGE, TOO_LARGE
from openpi_rl_client.wire import WireError

DTYPES = [
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
    np.uint64, np.float16, np.float32, np.float64, ">i4", ">f8", "S5", "<U3", "M8[ns]",
]  # fmt: skip
SHAPES = [(), (0,), (3,), (2, 0, 4), (2, 3), (1, 1, 1, 5), (4, 3, 2)]


def _array(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    dtype = np.dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    arr = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape)
    if dtype.kind == "b":
        arr = arr.astype(np.uint8) % 2 == 1
    return arr


def _assert_equal(a, b) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()  # bitwise: NaN payloads included
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_equal(x, y)
    else:
        assert type(a) is type(b) and a == b


def test_round_trip_nested_arrays_of_many_dtypes_and_shapes():
    rng = np.random.default_rng(0)
    arrays = {f"{np.dtype(d).str}{list(s)}": _array(rng, d, s) for d in DTYPES for s in SHAPES}
    msg = {
        "type": "infer",
        "observation": arrays,
        "nested": [{"a": [np.arange(3, dtype=np.int16), None, True, 1.5, "x", b"y"]}],
        "fortran": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
        "strided": np.arange(20, dtype=np.int32)[::3],
        "scalars": [np.int64(-7), np.uint8(200), np.bool_(True), np.float32(0.25)],
    }
    out = wire.unpackb(wire.packb(msg))
    expected = dict(msg, scalars=[np.int64(-7), np.uint8(200), np.bool_(True), np.float32(0.25)])
    assert out["fortran"].tolist() == msg["fortran"].tolist()
    assert out["strided"].tolist() == msg["strided"].tolist()
    del expected["fortran"], expected["strided"], out["fortran"], out["strided"]
    _assert_equal(expected, out)


def test_decoded_arrays_are_read_only_views_of_the_message():
    msg = wire.unpackb(wire.packb({"img": np.ones((224, 224, 3), np.uint8)}))
    img = msg["img"]
    assert not img.flags.writeable
    assert isinstance(img.base, bytes) and len(img.base) == img.nbytes  # no copy of the data
    with pytest.raises(ValueError):
        img[0, 0, 0] = 2


def test_array_map_is_exactly_openpi_clients_layout():
    """Decoded with plain msgpack (openpi's unpackb uses msgpack defaults plus a hook)."""
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = msgpack.unpackb(wire.packb({"a": arr, "s": np.int64(3)}))
    assert raw["a"] == {
        b"__ndarray__": True,
        b"data": arr.tobytes(),
        b"dtype": "<f4",
        b"shape": [2, 3],
    }
    assert raw["s"] == {b"__npgeneric__": True, b"data": 3, b"dtype": "<i8"}
    # And the bytes are what msgpack.packb with openpi's default hook produces.
    openpi_style = {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": "<f4", b"shape": (2, 3)}
    assert wire.packb({"a": arr}) == msgpack.packb({"a": openpi_style})


@pytest.mark.parametrize("dtype", ["|O", "O", "|V8", "<c8", "<c16", "i4,i4", "(2,)f4", "a", "<f4 "])
def test_refused_dtypes_on_decode(dtype):
    bad = {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": dtype, b"shape": [1]}
    with pytest.raises(WireError, match="dtype") as info:
        wire.unpackb(msgpack.packb(bad))
    assert info.value.code == BAD_MESSAGE


@pytest.mark.parametrize(
    "value", [np.zeros(2, np.complex64), np.array([object()]), np.complex128(1)]
)
def test_refused_dtypes_on_encode(value):
    with pytest.raises(WireError, match="dtype"):
        wire.packb({"x": value})


def test_length_must_match_shape_and_dtype():
    for n in (7, 9, 0):
        bad = {b"__ndarray__": True, b"data": b"\0" * n, b"dtype": "<f4", b"shape": [2]}
        with pytest.raises(WireError, match="needs 8 bytes") as info:
            wire.unpackb(msgpack.packb(bad))
        assert info.value.code == BAD_MESSAGE


def test_size_cap():
    raw = wire.packb({"x": np.zeros(1000, np.uint8)})
    assert wire.unpackb(raw, max_bytes=len(raw))["x"].shape == (1000,)
    with pytest.raises(WireError) as info:
        wire.unpackb(raw, max_bytes=len(raw) - 1)
    assert info.value.code == TOO_LARGE


def test_absurd_nesting_and_foreign_types_are_refused():
    deep = 1
    for _ in range(wire.MAX_DEPTH):
        deep = [deep]
    assert wire.unpackb(msgpack.packb(deep)) == deep
    deep = {"k": deep}
    with pytest.raises(WireError, match="deeper"):
        wire.unpackb(msgpack.packb(deep))
    with pytest.raises(WireError, match="ext type"):
        wire.unpackb(msgpack.packb(msgpack.ExtType(5, b"x")))
    with pytest.raises(WireError, match="Timestamp"):
        wire.unpackb(msgpack.packb(msgpack.Timestamp(1)))
    with pytest.raises(WireError):
        wire.unpackb(b"\x91" * 100_000)  # msgpack's own stack limit
    with pytest.raises(WireError, match="expected bytes"):
        wire.unpackb(12)


def _mutated_array_maps(rng: random.Random):
    """Array/scalar maps with one field of the wrong type or value."""
    good = {b"__ndarray__": True, b"data": b"\0" * 24, b"dtype": "<f4", b"shape": [2, 3]}
    wrong_values = [
        None, 1, -1, 2**63, 1.5, "x", b"x", [], [1, -2], [2**64 - 1], {}, {"a": 1}, True,
        [2, 3.0], [True, 6], "<f4", "O", "|V4", "c8", "notadtype", "f" * 100, b"<f4",
        b"\0" * 23, b"\0" * 25, list(range(40)),
    ]  # fmt: skip
    while True:
        m = dict(good)
        r = rng.random()
        if r < 0.7:
            m[rng.choice(list(good))] = rng.choice(wrong_values)
        elif r < 0.8:
            del m[rng.choice(list(good))]
        elif r < 0.9:
            m[rng.choice([b"extra", "data", 1])] = 1
        else:
            m = {
                b"__npgeneric__": True,
                b"data": rng.choice(wrong_values),
                b"dtype": rng.choice(wrong_values),
            }
        yield m


def test_fuzz_malformed_inputs_raise_only_wire_error():
    rng = random.Random(1234)
    nprng = np.random.default_rng(1234)
    valid = [
        wire.packb({"type": "infer", "observation": {"img": _array(nprng, np.uint8, (8, 8, 3))}}),
        wire.packb({"a": [np.arange(5, dtype=np.float64), {"b": np.int32(3)}, "str", 1.5, None]}),
        wire.packb([np.zeros((2, 0), np.int8), np.ones((), np.float16), b"bytes" * 10]),
    ]
    mutated = _mutated_array_maps(rng)
    outcomes = {"ok": 0, "error": 0}
    n = 12_000
    start = time.perf_counter()
    for i in range(n):
        kind = i % 4
        if kind == 0:  # random bytes, biased towards msgpack container headers
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
            if data and rng.random() < 0.5:
                data = bytes([rng.choice([0x81, 0x91, 0xDE, 0xDC, 0xC4, 0xD9, 0xC7])]) + data
        elif kind == 1:  # truncated valid message
            src = rng.choice(valid)
            data = src[: rng.randrange(0, len(src))]
        elif kind == 2:  # bit flips in a valid message
            buf = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            data = bytes(buf)
        else:  # wrong types / shape-length mismatch inside the ndarray map
            data = msgpack.packb({"obs": {"x": next(mutated)}})
        try:
            wire.unpackb(data)
            outcomes["ok"] += 1
        except WireError as e:
            assert e.code in (BAD_MESSAGE, TOO_LARGE)
            outcomes["error"] += 1
    elapsed = time.perf_counter() - start
    assert outcomes["error"] > n // 2
    assert elapsed < 5.0, f"{n} fuzz cases took {elapsed:.2f} s"


def _amplifiers() -> dict[str, bytes]:
    """Small messages that decode into a great many Python objects without caps."""
    n = 16 * 2**20
    return {
        "16 MiB array of empty maps": b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n,
        "16 MiB array of empty arrays": b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n,
        "arrays of 1024 empty maps": msgpack.packb([[{}] * 1024] * 1024),
        "a map of 100k keys": msgpack.packb({str(i): 0 for i in range(100_000)}),
        "a 2 MiB str": msgpack.packb("x" * (2 << 20)),
    }


@pytest.mark.parametrize("name", list(_amplifiers()))
def test_messages_that_amplify_into_objects_are_refused_with_bounded_memory(name):
    import tracemalloc

    data = _amplifiers()[name]
    tracemalloc.start()
    try:
        with pytest.raises(WireError) as e:
            wire.unpackb(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.code == BAD_MESSAGE
    assert peak < 16 * 2**20, f"{name}: decoding peaked at {peak / 2**20:.0f} MiB"


def test_a_request_within_the_caps_still_decodes():
    msg = {
        "type": "infer",
        "prompt": "p" * 4096,
        "observation": {f"cam{i}": np.zeros((224, 224, 3), np.uint8) for i in range(8)},
        "tags": list(range(1000)),
    }
    out = wire.unpackb(wire.packb(msg))
    assert out["observation"]["cam7"].shape == (224, 224, 3) and len(out["tags"]) == 1000
