"""Append-only segment files for observation bytes.

A segment is `segments/<id:08d>.seg`, a sequence of records. A record is a 12-byte header
`b"OPRS" | payload length (u32 LE) | crc32(payload) (u32 LE)` followed by the payload. An index
row points at the payload: (seg, off = payload offset, len, crc). Only the newest segment can end
in a torn record (the writer died mid-append); `scan_valid_end` finds the end of its last good
record so recovery can cut what follows.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

MAGIC = b"OPRS"
HEADER = struct.Struct("<4sII")
HEADER_SIZE = HEADER.size  # 12
MAX_RECORD = 0xFFFFFFFF


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


def encode_header(payload: bytes) -> tuple[bytes, int]:
    crc = zlib.crc32(payload)
    return HEADER.pack(MAGIC, len(payload), crc), crc


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
            if zlib.crc32(f.read(length)) != crc:
                break
            end += HEADER_SIZE + length
    return end


class SegmentWriter:
    """The current segment file, opened for append. Not thread-safe: the writer thread owns it."""

    def __init__(self, seg_dir: Path, seg: int):
        self.seg = seg
        self.path = segment_path(seg_dir, seg)
        self._f = open(self.path, "ab")  # noqa: SIM115 — kept open across many appends
        self.size = self._f.tell()

    def append(self, payload: bytes) -> tuple[int, int, int]:
        """Write one record; returns (payload offset, length, crc32). Bytes reach the OS on
        `flush` (large payloads bypass the buffer and reach it at once)."""
        if len(payload) > MAX_RECORD:
            raise ValueError(
                f"observation: expected at most {MAX_RECORD} bytes, got {len(payload)}"
            )
        header, crc = encode_header(payload)
        self._f.write(header)
        self._f.write(payload)
        off = self.size + HEADER_SIZE
        self.size = off + len(payload)
        return off, len(payload), crc

    def flush(self) -> None:
        self._f.flush()

    def sync(self) -> None:
        self._f.flush()
        os.fdatasync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()


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
    got = zlib.crc32(payload)
    if got != crc:
        raise CorruptRecord(f"{where}: crc32: expected {crc}, got {got}")
    return payload
