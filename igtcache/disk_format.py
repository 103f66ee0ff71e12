"""The disk tier's on-disk layout, shared by its writer (``igtcache.disk_tier``) and its
in-process readers (``igtcache.short_circuit``), so both verify bytes the same way.

One LMDB environment, ``blocks.lmdb``, holds four databases:

- ``index``: block key -> size, write sequence, xxh3-64 of the whole block, xxh3-64 of
  each ``PIECE_SIZE`` piece, then ``path \\0 version``. A read of a few KiB verifies
  the pieces it returns, not the whole block.
- ``data``: block key -> the block's bytes.
- ``meta``: path key -> object size, version, and until when (``CLOCK_MONOTONIC`` of
  this boot) the daemon's last check of the remote vouches for that version.
- ``settings``: what the bytes mean (format, block size, checksum, remote identity).

A block key is 16 bytes of BLAKE2b over ``path \\0 version`` then the block index
(8 bytes, big-endian), so the keys of one object version sort together.
"""

from __future__ import annotations

import hashlib
import os
import struct
from functools import lru_cache
from typing import NamedTuple

import xxhash

FORMAT_VERSION = 3  # 1: no settings database; 2: one checksum per block
CHECKSUM = "xxh3-64"
PIECE_SIZE = 32 << 10
ENV_NAME = "blocks.lmdb"
DATABASES = (b"index", b"data", b"meta", b"settings")

_INDEX_HEAD = struct.Struct("<QQQ")  # size, write sequence, checksum of the whole block
_PIECE = struct.Struct("<Q")
_META_HEAD = struct.Struct("<Qd16sH")  # size, fresh until, boot id, length of the version
_NO_BOOT = bytes(16)


def settings(block_size: int, remote_id: str) -> dict[str, str]:
    """What a tier's bytes mean, as its ``settings`` database records it: a tier recording
    anything else holds bytes that would be wrong here."""
    return {"format": str(FORMAT_VERSION), "block_size": str(block_size), "checksum": CHECKSUM, "remote": remote_id}


def stored_settings(txn, db) -> dict[str, str]:
    """The settings recorded in ``db`` (read in ``txn``); ``{}`` where none are."""
    return {bytes(k).decode(): bytes(v).decode("utf-8", "surrogatepass") for k, v in txn.cursor(db=db)}


def object_digest(path: str, version: str) -> bytes:
    """The first 16 bytes of every block key of one object version."""
    return hashlib.blake2b(f"{path}\x00{version}".encode("utf-8", "surrogatepass"), digest_size=16).digest()


def block_key(path: str, version: str, index: int) -> bytes:
    """The LMDB key of block ``index`` of ``path`` at ``version``."""
    return object_digest(path, version) + index.to_bytes(8, "big")


def path_key(path: str) -> bytes:
    """The LMDB key of an object's metadata."""
    return hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=24).digest()


def pieces_of(size: int) -> int:
    """How many pieces a block of ``size`` bytes has checksums for (at least one)."""
    return max(1, -(-size // PIECE_SIZE))


def encode_index(data: bytes | memoryview, seq: int, path: str, version: str) -> bytes:
    """The index entry of a block about to be stored."""
    view = memoryview(data)
    pieces = [xxhash.xxh3_64_intdigest(view[at:at + PIECE_SIZE])
              for at in range(0, max(len(view), 1), PIECE_SIZE)]
    name = f"{path}\x00{version}".encode("utf-8", "surrogatepass")
    return b"".join([_INDEX_HEAD.pack(len(view), seq, xxhash.xxh3_64_intdigest(view)),
                     struct.pack(f"<{len(pieces)}Q", *pieces), name])


class IndexEntry(NamedTuple):
    size: int
    seq: int
    path: str
    version: str


def decode_index(value: bytes | memoryview) -> IndexEntry:
    """An index entry's fields; ``ValueError`` (or ``struct.error``) if it is malformed."""
    size, seq, _checksum = _INDEX_HEAD.unpack_from(value)
    name_at = _INDEX_HEAD.size + _PIECE.size * pieces_of(size)
    path, version = bytes(value[name_at:]).decode("utf-8", "surrogatepass").split("\x00")
    return IndexEntry(size, seq, path, version)


class Check(NamedTuple):
    """Bytes ``[start, end)`` of a block must hash (xxh3-64) to ``expected``."""

    start: int
    end: int
    expected: int


def checks(index: bytes | memoryview, size: int, start: int = 0, end: int | None = None) -> list[Check] | None:
    """The checksums that verify bytes ``[start, end)`` of a block of ``size`` bytes, as
    ``(from, to, xxh3-64)`` spans of the block: the whole block's for a whole read, else each
    piece the range touches. ``None`` if ``index`` does not describe a block of ``size`` bytes."""
    try:
        stored, _seq, whole = _INDEX_HEAD.unpack_from(index)
    except struct.error:
        return None
    if stored != size or len(index) < _INDEX_HEAD.size + _PIECE.size * pieces_of(size):
        return None
    end = size if end is None else end
    if start <= 0 and end >= size:
        return [Check(0, size, whole)]
    first, last = start // PIECE_SIZE, (max(end, start + 1) - 1) // PIECE_SIZE
    sums = struct.unpack_from(f"<{last - first + 1}Q", index, _INDEX_HEAD.size + _PIECE.size * first)
    return [Check(p * PIECE_SIZE, min(size, (p + 1) * PIECE_SIZE), expected)
            for p, expected in zip(range(first, last + 1), sums)]


def verified(index: bytes | memoryview, data: bytes | memoryview, start: int = 0, end: int | None = None) -> bool:
    """Whether ``data`` is the block ``index`` describes, checked over ``[start, end)`` (:func:`checks`)."""
    spans = checks(index, len(data), start, end)
    return spans is not None and all(xxhash.xxh3_64_intdigest(data[a:b]) == expected for a, b, expected in spans)


class MetaRecord(NamedTuple):
    """An object's size and version, vouched for until ``fresh_until`` on boot ``boot``."""

    path: str
    size: int
    version: str
    fresh_until: float
    boot: bytes

    def fresh(self, now: float, boot: bytes | None) -> bool:
        """Whether the daemon's last check still vouches for this version at ``now`` (``CLOCK_MONOTONIC``)."""
        return boot is not None and self.boot == boot and now < self.fresh_until


def encode_meta(path: str, size: int, version: str, fresh_until: float) -> bytes:
    """A metadata value; ``fresh_until`` is on this boot's ``CLOCK_MONOTONIC``."""
    raw_version = version.encode("utf-8", "surrogatepass")
    return (_META_HEAD.pack(size, fresh_until, boot_id() or _NO_BOOT, len(raw_version))
            + raw_version + path.encode("utf-8", "surrogatepass"))


def decode_meta(value: bytes | memoryview) -> MetaRecord:
    """A metadata value's fields; ``ValueError`` (or ``struct.error``) if it is malformed."""
    size, fresh_until, boot, version_len = _META_HEAD.unpack_from(value)
    at = _META_HEAD.size
    raw = bytes(value[at:])
    return MetaRecord(raw[version_len:].decode("utf-8", "surrogatepass"), size,
                      raw[:version_len].decode("utf-8", "surrogatepass"), fresh_until, boot)


_LMDB_MAGIC = 0xBEEFC0DE
_LMDB_META = struct.Struct("<IIQQ")  # after the page header: magic, version, address, map size


def map_size_of(data_file: str | os.PathLike) -> int:
    """The map size the environment's writer set (from ``data.mdb``'s first meta page): a reader
    must map as much, or LMDB refuses its transactions once the data outgrows the reader's map."""
    with open(data_file, "rb") as f:
        raw = f.read(16 + _LMDB_META.size)
    magic, _version, _address, map_size = _LMDB_META.unpack_from(raw, 16)
    if magic != _LMDB_MAGIC:
        raise ValueError(f"{data_file} is not an LMDB data file")
    return map_size


@lru_cache(maxsize=1)
def boot_id() -> bytes | None:
    """This boot's id (Linux), which ``CLOCK_MONOTONIC`` readings are relative to; ``None`` where
    the kernel does not say, and then no reader may trust a stored freshness."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            text = f.read().strip().replace(b"-", b"")
        return bytes.fromhex(text.decode())[:16] or None
    except (OSError, ValueError):
        return None
