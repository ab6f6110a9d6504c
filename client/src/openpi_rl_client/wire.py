"""The wire codec both ends use: msgpack with numpy arrays, the openpi-client scheme.

An array travels as the map ``{b"__ndarray__": True, b"data": <bytes>, b"dtype": dtype.str,
b"shape": shape}`` and a numpy scalar as ``{b"__npgeneric__": True, b"data": item,
b"dtype": dtype.str}`` (bytes keys), exactly as ``openpi_client.msgpack_numpy`` writes them,
so one decoder serves our ZMQ protocol and openpi's WebSocket protocol.

Unlike openpi's decoder, :func:`unpackb` treats its input as hostile: it caps the size,
refuses object/void/complex dtypes, checks that ``len(data) == prod(shape) * itemsize``,
refuses ext types and absurd nesting, caps every container's length, every str and the number
of elements in a message (bounded memory: :data:`MAX_ELEMENTS`), and raises only
:class:`WireError` whatever the bytes.
Decoded arrays are read-only views of the message's bytes (no copy).
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgpack
import numpy as np

from openpi_rl_client.protocol import BAD_MESSAGE, TOO_LARGE, ProtocolError

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Largest message :func:`unpackb` accepts; a two-camera 224² request is about 300 KB."""

MAX_DEPTH = 32
"""Deepest nesting of maps and lists accepted (the top-level object is depth 1)."""

MAX_NDIM = 32

# Per-message caps on what msgpack builds (guarantee 6: bounded memory per peer). A request is a
# few maps of a few keys; without caps, 16 MiB of one-byte empty maps is 16 M dicts (~1 GiB).
MAX_CONTAINER_LEN = 1024  # entries in one map or one array
MAX_ELEMENTS = 16_384  # maps, arrays and their entries in one message, all together
MAX_STR_BYTES = 1 << 20  # one str (a prompt is a few hundred bytes)
REFUSED_DTYPE_KINDS = ("V", "O", "c")  # void/structured, object (pickle), complex: as openpi

_NDARRAY = b"__ndarray__"
_NPGENERIC = b"__npgeneric__"
_DTYPE_STR = re.compile(r"[<>|=][biufcmMSUVO][0-9]{1,4}(\[[0-9]*[a-zA-Z]{1,3}\])?")
_LEAF_TYPES = (str, bytes, int, float, bool, type(None), np.ndarray, np.generic)


class WireError(ProtocolError):
    """Bytes that are not a valid message; ``code`` is ``bad_message`` or ``too_large``."""


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic):
        if obj.dtype.kind in REFUSED_DTYPE_KINDS:
            raise WireError(
                BAD_MESSAGE, f"cannot encode dtype {obj.dtype}: kind {obj.dtype.kind!r}"
            )
        if isinstance(obj, np.ndarray):
            return {
                _NDARRAY: True,
                b"data": obj.tobytes(),  # C order, whatever the array's layout
                b"dtype": obj.dtype.str,
                b"shape": obj.shape,
            }
        return {_NPGENERIC: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise WireError(BAD_MESSAGE, f"cannot encode object of type {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """Encode ``obj`` (maps, lists, str, bytes, numbers, None, numpy arrays and scalars).

    Raises :class:`WireError` (``bad_message``) for objects the wire cannot carry.
    """
    try:
        return msgpack.packb(obj, default=_pack_default, use_bin_type=True)
    except WireError:
        raise
    except Exception as e:  # msgpack: TypeError, OverflowError, ValueError (recursion)
        raise WireError(BAD_MESSAGE, f"cannot encode message: {e}") from e


def _dtype(value: Any) -> np.dtype:
    # Only the canonical form numpy's dtype.str writes ('<f4', '|u1', '<U3', '<M8[ns]'):
    # np.dtype() also parses field lists, subarrays and deprecated aliases.
    if not isinstance(value, str) or not _DTYPE_STR.fullmatch(value):
        raise WireError(BAD_MESSAGE, f"array map: bad dtype {value!r:.40}")
    try:
        dtype = np.dtype(value)
    except Exception as e:
        raise WireError(BAD_MESSAGE, f"array map: unknown dtype {value!r}") from e
    if dtype.kind in REFUSED_DTYPE_KINDS or dtype.itemsize == 0 or dtype.hasobject:
        raise WireError(BAD_MESSAGE, f"array map: refused dtype {value!r} (kind {dtype.kind!r})")
    return dtype


def _decode_ndarray(obj: dict) -> np.ndarray:
    if set(obj) != {_NDARRAY, b"data", b"dtype", b"shape"} or obj[_NDARRAY] is not True:
        raise WireError(BAD_MESSAGE, f"array map: unexpected keys {sorted(map(repr, obj))}")
    data, shape = obj[b"data"], obj[b"shape"]
    dtype = _dtype(obj[b"dtype"])
    if not isinstance(data, bytes):
        raise WireError(BAD_MESSAGE, f"array map: 'data' must be bin, got {type(data).__name__}")
    if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM:
        raise WireError(BAD_MESSAGE, f"array map: 'shape' must be a list of <= {MAX_NDIM} ints")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim < 2**62:
            raise WireError(BAD_MESSAGE, f"array map: bad dimension {dim!r} in shape {shape!r:.80}")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise WireError(
            BAD_MESSAGE,
            f"array map: {dtype.str} {list(shape)} needs {expected} bytes, got {len(data)}",
        )
    # A view of the immutable bytes object: read-only, zero-copy.
    return np.ndarray(buffer=data, dtype=dtype, shape=tuple(shape))


def _decode_npgeneric(obj: dict) -> np.generic:
    if set(obj) != {_NPGENERIC, b"data", b"dtype"} or obj[_NPGENERIC] is not True:
        raise WireError(BAD_MESSAGE, f"scalar map: unexpected keys {sorted(map(repr, obj))}")
    dtype = _dtype(obj[b"dtype"])
    data = obj[b"data"]
    if not isinstance(data, bool | int | float | str | bytes):
        raise WireError(BAD_MESSAGE, f"scalar map: bad 'data' type {type(data).__name__}")
    try:
        return dtype.type(data)
    except Exception as e:
        raise WireError(BAD_MESSAGE, f"scalar map: {data!r:.40} is not a {dtype.str}") from e


class _Budget:
    """Counts the containers msgpack builds and their entries; past MAX_ELEMENTS, refuses."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_ELEMENTS

    def spend(self, n: int) -> None:
        self.left -= n + 1
        if self.left < 0:
            raise WireError(BAD_MESSAGE, f"message holds more than {MAX_ELEMENTS} elements")

    def map(self, obj: dict) -> Any:
        self.spend(len(obj))
        if _NDARRAY in obj:
            return _decode_ndarray(obj)
        if _NPGENERIC in obj:
            return _decode_npgeneric(obj)
        return obj

    def list(self, obj: list) -> list:
        self.spend(len(obj))
        return obj


def _ext_hook(code: int, data: bytes) -> Any:
    raise WireError(BAD_MESSAGE, f"msgpack ext type {code} is not allowed")


def _check_tree(obj: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH and any non-wire type (e.g. msgpack Timestamp)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                raise WireError(BAD_MESSAGE, f"message nests deeper than {MAX_DEPTH} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
        elif not isinstance(node, _LEAF_TYPES):
            raise WireError(BAD_MESSAGE, f"unsupported value of type {type(node).__name__}")


def unpackb(data: Any, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Decode one message. Raises only :class:`WireError` (``too_large`` or ``bad_message``).

    Map keys must be str or bytes. Arrays come back read-only and share the message's memory.
    """
    try:
        size = memoryview(data).nbytes
    except TypeError:
        raise WireError(BAD_MESSAGE, f"expected bytes, got {type(data).__name__}") from None
    if size > max_bytes:
        raise WireError(TOO_LARGE, f"message of {size} bytes exceeds the cap of {max_bytes}")
    try:
        budget = _Budget()
        obj = msgpack.unpackb(
            data,
            raw=False,
            object_hook=budget.map,
            list_hook=budget.list,
            ext_hook=_ext_hook,
            strict_map_key=True,
            timestamp=0,
            max_str_len=MAX_STR_BYTES,
            max_bin_len=size,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
            max_ext_len=16,  # refused by _ext_hook (and timestamp=0 above) anyway
        )
        _check_tree(obj)
    except WireError:
        raise
    except Exception as e:  # ExtraData, FormatError, StackError, UnicodeDecodeError, ...
        raise WireError(BAD_MESSAGE, f"undecodable message: {type(e).__name__}: {e}") from e
    return obj
