"""Append-only segment files for observation bytes.

A segment is `segments/<id:08d>.seg`, a sequence of records. A record is a 12-byte header
`b"OPRS" | payload length (u32 LE) | crc32(payload) (u32 LE)` followed by the payload. An index
row points at the payload: (seg, off = payload offset, len, crc). Only the newest segment can end
in a torn record (the writer died mid-append); `scan_valid_end` finds the end of its last good
record so recovery can cut what follows.
"""

from __future__ import annotations

import ctypes
import os
import struct
import zlib
from pathlib import Path

import numpy as np

MAGIC = b"OPRS"
HEADER = struct.Struct("<4sII")
HEADER_SIZE = HEADER.size  # 12
MAX_RECORD = 0xFFFFFFFF
WRITEBACK_BYTES = 8 << 20


def _sync_file_range():  # Linux only; elsewhere writeback starts at the fsync
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _libdeflate_crc32():
    """libdeflate's crc32, the same CRC-32 as zlib's but ~5x faster than zlib 1.2 (PCLMUL): about
    16 us instead of 50-80 us for 150 kB. Used when the system has the library (Debian and Ubuntu:
    libdeflate0) and it agrees with zlib; ctypes releases the GIL for the call."""
    for name in ("libdeflate.so.0", "libdeflate.so", "libdeflate.dylib"):
        try:
            fn = ctypes.CDLL(name).libdeflate_crc32
            break
        except (OSError, AttributeError):
            continue
    else:
        return None
    fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_uint32
    probe = bytes(range(256)) * 41
    return fn if fn(0, probe, len(probe)) == zlib.crc32(probe) else None


_FAST_CRC32 = _libdeflate_crc32()


def crc32(data: bytes | memoryview) -> int:
    """CRC-32 of `data`, as `zlib.crc32` computes it (the record format names zlib's)."""
    if _FAST_CRC32 is None:
        return zlib.crc32(data)
    if type(data) is bytes:
        return _FAST_CRC32(0, data, len(data))
    view = np.frombuffer(data, np.uint8)  # e.g. a ZMQ frame's memory, not copied
    return _FAST_CRC32(0, view.ctypes.data, view.size)


class CorruptRecord(Exception):
    """Observation bytes that do not match their index row (length, header or crc32)."""


class MissingRecord(LookupError):
    """The segment a row points at is gone (deleted by retention)."""


def segment_path(seg_dir: Path, seg: int) -> Path:
    return seg_dir / f"{seg:08d}.seg"


def list_segments(seg_dir: Path) -> list[int]:
    """Ids of the segment files present, ascending."""
    out = []
    for p in seg_dir.glob("*.seg"):
        try:
            out.append(int(p.stem))
        except ValueError:
            continue
    return sorted(out)


def scan_valid_end(path: Path, chunk: int = 1 << 20) -> int:
    """Byte offset just past the last good record, reading from the start of `path`.

    A record is good when its magic is right, its payload lies within the file and its crc32
    matches. Everything from the first bad record on is a torn tail.
    """
    size = path.stat().st_size
    end = 0
    with open(path, "rb", buffering=chunk) as f:
        while end + HEADER_SIZE <= size:
            magic, length, crc = HEADER.unpack(f.read(HEADER_SIZE))
            if magic != MAGIC or end + HEADER_SIZE + length > size:
                break
            if crc32(f.read(length)) != crc:
                break
            end += HEADER_SIZE + length
    return end


class SegmentWriter:
    """The current segment file, opened for append without a user-space buffer: a record is in
    the OS (safe from a `kill -9`) when `append` returns. Appends come from one thread; `sync`
    may run on another (the commit stage), `close` on whichever thread owns the file last."""

    def __init__(self, seg_dir: Path, seg: int):
        self.seg = seg
        self.path = segment_path(seg_dir, seg)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = os.fstat(self._fd).st_size
        self._writeback_from = self.size

    def append(self, payload: bytes) -> tuple[int, int, int]:
        """Write one record; returns (payload offset, length, crc32)."""
        n = len(payload)
        if n > MAX_RECORD:
            raise ValueError(f"observation: expected at most {MAX_RECORD} bytes, got {n}")
        crc = crc32(payload)  # GIL-free, as os.writev is
        header = HEADER.pack(MAGIC, n, crc)
        # One syscall for header + payload, no concatenated copy of the payload.
        done = os.writev(self._fd, (header, payload))
        if done < HEADER_SIZE + n:  # a short write (rare: signals, near-full disks)
            rest = memoryview(header + payload)[done:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]
        off = self.size + HEADER_SIZE
        self.size = off + n
        return off, n, crc

    def start_writeback(self) -> None:
        """Once `WRITEBACK_BYTES` are new, start writing them to the disk without waiting
        (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): the disk works while the writer goes on, and
        the next `sync` waits only for the rest. For writers that `sync` on a timer."""
        start = self._writeback_from
        if _SYNC_FILE_RANGE is not None and self.size - start >= WRITEBACK_BYTES:
            # A hint: an error (say, a filesystem without it) only leaves the work to `sync`.
            _SYNC_FILE_RANGE(self._fd, start, self.size - start, _SYNC_FILE_RANGE_WRITE)
            self._writeback_from = self.size

    def sync(self) -> None:
        """fdatasync: every record appended before this call is on the disk on return."""
        if self._fd >= 0:
            os.fdatasync(self._fd)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class SegmentAppender:
    """A writer's stage appending to its newest segment file in `seg_dir`, the next one started
    once a record would pass `max_bytes` (opened lazily: an idle restart adds no file). With
    `syncing`, a retired file stays open for the commit stage to sync and close
    (`sync_segments`); without, nothing is pending (each record is in the OS on return) and it
    is closed at once."""

    def __init__(self, seg_dir: Path, first: int, max_bytes: int, syncing: bool):
        self.seg_dir = seg_dir
        self.max_bytes = max_bytes
        self.syncing = syncing
        self._next = first
        self._seg: SegmentWriter | None = None

    def append(self, payload: bytes) -> tuple[SegmentWriter, int, int, int]:
        """(the segment's writer, payload offset, length, crc32) of the record, in the OS."""
        seg = self._seg
        if (
            seg is not None
            and seg.size > 0
            and seg.size + HEADER_SIZE + len(payload) > self.max_bytes
        ):
            if not self.syncing:
                seg.close()
            seg = None
        if seg is None:
            seg = self._seg = SegmentWriter(self.seg_dir, self._next)
            self._next += 1
        off, length, crc = seg.append(payload)
        if self.syncing:
            seg.start_writeback()
        return seg, off, length, crc

    def close(self) -> None:
        if self._seg is not None:
            self._seg.close()
            self._seg = None


def sync_segments(unsynced: dict[int, SegmentWriter]) -> None:
    """fdatasync each segment in `unsynced` (number -> its writer, the files rows about to commit
    point into); close and forget all but the newest: the stage that appends moved on from them
    (it leaves a retired file open when its writer syncs, for this)."""
    newest = max(unsynced, default=None)
    for seg_id in list(unsynced):
        unsynced[seg_id].sync()
        if seg_id != newest:
            unsynced.pop(seg_id).close()


def read_payload(fd: int, off: int, length: int, crc: int, where: str = "") -> bytes:
    """Read and verify the payload at `off` (the header before it is checked too)."""
    if off < HEADER_SIZE:
        raise CorruptRecord(f"{where}: offset {off} inside the first header")
    buf = os.pread(fd, HEADER_SIZE + length, off - HEADER_SIZE)
    if len(buf) != HEADER_SIZE + length:
        raise CorruptRecord(f"{where}: expected {HEADER_SIZE + length} bytes, got {len(buf)}")
    magic, hlen, hcrc = HEADER.unpack_from(buf)
    if magic != MAGIC or hlen != length or hcrc != crc:
        raise CorruptRecord(
            f"{where}: header: expected magic {MAGIC!r} len {length} crc {crc}, "
            f"got {magic!r} len {hlen} crc {hcrc}"
        )
    payload = buf[HEADER_SIZE:]
    got = crc32(payload)
    if got != crc:
        raise CorruptRecord(f"{where}: crc32: expected {crc}, got {got}")
    return payload
