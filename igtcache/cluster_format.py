"""How the cluster tier names blocks in Redis and lays out their values.

Keys: ``PREFIX:REMOTE:BLOCKSIZE:OBJECT:INDEX``, where REMOTE is a digest of the
remote's identity (so two deployments sharing a cluster never see each
other's blocks) and OBJECT a digest of path and version (so a changed object
has new keys). No key has a hash tag: blocks spread over every slot. A
block's lease is its key plus ``:lease``.

Values: a 24-byte header -- magic ``IGTB``, format 1, three zero bytes, the
data's length and its xxh3-64, both little-endian 64-bit -- then the data.
A value is served only if every header field checks out. An object's shared
metadata (``PREFIX:REMOTE:BLOCKSIZE:meta:PATH``) is a value of the same layout
holding JSON, stored with an expiry of the publishing node's TTL.
"""

from __future__ import annotations

import hashlib
import struct

import xxhash

from igtcache.policies import BlockKey

MAGIC = b"IGTB"
FORMAT = 1
_HEADER = struct.Struct("<4sB3xQQ")
HEADER_SIZE = _HEADER.size


def _digest(*parts: str) -> str:
    """128-bit hex digest of ``parts``, each length-prefixed so that no two tuples collide by concatenation."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        raw = part.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


class KeySpace:
    """Redis key names for one remote's blocks of one block size under ``prefix``."""

    def __init__(self, prefix: str, remote_id: str, block_size: int) -> None:
        if not prefix or any(c in prefix for c in "{}"):
            # A brace would make part of the prefix a hash tag and put every block in one slot.
            raise ValueError(f"prefix must be non-empty and free of braces, got {prefix!r}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._base = f"{prefix}:{_digest(remote_id)}:{block_size}"

    def block(self, key: BlockKey) -> str:
        return f"{self._base}:{_digest(key.path, key.version)}:{key.index}"

    def lease(self, key: BlockKey) -> str:
        return self.block(key) + ":lease"

    def meta(self, path: str) -> str:
        """An object's shared metadata (its last stat by any node)."""
        return f"{self._base}:meta:{_digest(path)}"


def encode(data: bytes | memoryview) -> bytes:
    """The stored value of ``data``: header, then the data."""
    return b"".join((_HEADER.pack(MAGIC, FORMAT, len(data), xxhash.xxh3_64_intdigest(data)), data))


def decode(value: bytes) -> bytes | None:
    """The data in a stored value, or ``None`` where the value is damaged or not ours."""
    if len(value) < HEADER_SIZE:
        return None
    magic, fmt, length, checksum = _HEADER.unpack_from(value)
    data = memoryview(value)[HEADER_SIZE:]
    if magic != MAGIC or fmt != FORMAT or length != len(data) or xxhash.xxh3_64_intdigest(data) != checksum:
        return None
    return bytes(data)
