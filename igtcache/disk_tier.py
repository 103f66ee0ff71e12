"""The disk tier: checksummed blocks in one LMDB environment, bounded by bytes.

Three named databases share one environment, so every change is one atomic
transaction: ``index`` (key -> size, xxh3-64 checksum, write sequence, path, version),
``data`` (key -> block bytes) and ``meta`` (path -> object stat, for TTL
revalidation across restarts).

Durability: the environment is opened with ``sync=False, metasync=False``.
A committed transaction is in the OS page cache when ``write()`` returns, so it
survives the process being killed (``kill -9``); after an OS crash or power
loss the last transactions may be lost. Either way every block is verified
against its checksum on read, so a torn or corrupted block is never returned, and
an environment that cannot be opened at all is moved aside and started anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Iterator

import lmdb
import xxhash

from igtcache.policies import BlockKey
from igtcache.remote import ObjectInfo

log = logging.getLogger(__name__)

_INDEX = struct.Struct("<QQQ")  # size, xxh3-64 checksum, write sequence
# LMDB stores values in 4 KiB pages and copies pages on write; the map leaves room for that.
_MAP_OVERHEAD = 1.25
_MAP_SLACK = 64 << 20
# What LMDB raises for a damaged file, as opposed to e.g. a second open in this process.
_DAMAGED = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError, lmdb.PageNotFoundError, lmdb.BadValsizeError)


class DiskFull(OSError):
    """The disk tier could not take a write (file system or LMDB map full)."""


def _key(key: BlockKey) -> bytes:
    digest = hashlib.blake2b(f"{key.path}\x00{key.version}".encode("utf-8", "surrogatepass"), digest_size=16)
    return digest.digest() + key.index.to_bytes(8, "big")


def _path_key(path: str) -> bytes:
    return hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=24).digest()


class DiskTier:
    """Blocks on local disk that survive restarts; never more than ``capacity`` bytes of blocks."""

    def __init__(self, directory: str | os.PathLike, capacity: int) -> None:
        self.directory = Path(directory)
        self.capacity = capacity
        self.bytes = 0
        self.recovered_from_corruption = False
        self._sizes: dict[BlockKey, int] = {}
        self._seq = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._env = self._open_env()
        self._load_index()

    def _open_env(self) -> lmdb.Environment:
        mapsize = int(self.capacity * _MAP_OVERHEAD) + _MAP_SLACK
        target = self.directory / "blocks.lmdb"
        try:
            return self._env_at(target, mapsize)
        except _DAMAGED as exc:
            aside = target.with_name(f"blocks.lmdb.corrupt-{int(time.time())}")
            log.warning("disk tier at %s cannot be opened (%s); moved aside to %s, starting empty", target, exc, aside)
            target.rename(aside)
            self.recovered_from_corruption = True
            return self._env_at(target, mapsize)

    def _env_at(self, target: Path, mapsize: int) -> lmdb.Environment:
        env = lmdb.open(
            str(target), map_size=mapsize, max_dbs=3, max_readers=512,
            sync=False, metasync=False, readahead=False,
        )
        self._index_db = env.open_db(b"index")
        self._data_db = env.open_db(b"data")
        self._meta_db = env.open_db(b"meta")
        return env

    def _load_index(self) -> None:
        entries, broken = [], []
        with self._env.begin() as txn:
            for raw_key, value in txn.cursor(db=self._index_db):
                try:
                    size, _checksum, seq = _INDEX.unpack_from(value)
                    path, version = value[_INDEX.size:].decode("utf-8", "surrogatepass").split("\x00")
                    key = BlockKey(path, version, int.from_bytes(raw_key[16:], "big"))
                except (struct.error, ValueError):
                    broken.append(bytes(raw_key))
                    continue
                entries.append((seq, key, size))
        if broken:
            log.warning("disk tier: dropping %d unreadable index entries", len(broken))
            with self._env.begin(write=True) as txn:
                for raw_key in broken:
                    txn.delete(raw_key, db=self._index_db)
                    txn.delete(raw_key, db=self._data_db)
        entries.sort()
        for seq, key, size in entries:
            self._sizes[key] = size
            self.bytes += size
            self._seq = seq
        self.corrupt_index_entries = len(broken)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def entries(self) -> list[tuple[BlockKey, int]]:
        """Stored blocks and their sizes, oldest write first."""
        return list(self._sizes.items())

    @contextlib.contextmanager
    def views(self, keys: list[BlockKey]) -> Iterator[tuple[dict[BlockKey, memoryview], list[BlockKey]]]:
        """Zero-copy views of the blocks that pass their checksum, and the keys that fail it.

        Views are valid only inside the ``with`` block (they point into the
        LMDB map); absent keys appear in neither result.
        """
        found: dict[BlockKey, memoryview] = {}
        corrupt: list[BlockKey] = []
        with self._env.begin(buffers=True) as txn:
            for key in keys:
                raw_key = _key(key)
                index = txn.get(raw_key, db=self._index_db)
                if index is None:
                    continue
                size, checksum, _seq = _INDEX.unpack_from(index)
                data = txn.get(raw_key, db=self._data_db)
                if data is None or len(data) != size or xxhash.xxh3_64_intdigest(data) != checksum:
                    corrupt.append(key)
                else:
                    found[key] = data
            yield found, corrupt

    def write(self, puts: list[tuple[BlockKey, bytes]] = (), deletes: list[BlockKey] = ()) -> None:
        """Delete then store blocks in one atomic transaction; ``DiskFull`` if it cannot."""
        deletes = [k for k in deletes if k in self._sizes]
        puts = [(k, d) for k, d in puts if k not in self._sizes]
        after = self.bytes - sum(self._sizes[k] for k in deletes) + sum(len(d) for _, d in puts)
        if after > self.capacity:
            raise ValueError(f"disk tier write would hold {after} bytes, over its bound of {self.capacity}")
        seq = self._seq
        try:
            with self._env.begin(write=True) as txn:
                for key in deletes:
                    raw_key = _key(key)
                    txn.delete(raw_key, db=self._index_db)
                    txn.delete(raw_key, db=self._data_db)
                for key, data in puts:
                    seq += 1
                    raw_key = _key(key)
                    name = f"{key.path}\x00{key.version}".encode("utf-8", "surrogatepass")
                    txn.put(raw_key, _INDEX.pack(len(data), xxhash.xxh3_64_intdigest(data), seq) + name, db=self._index_db)
                    txn.put(raw_key, data, db=self._data_db)
        except lmdb.MapFullError as exc:
            raise DiskFull(f"disk tier map at {self.directory} is full") from exc
        except lmdb.Error as exc:
            raise DiskFull(f"disk tier at {self.directory} could not write: {exc}") from exc
        self._seq = seq
        for key in deletes:
            self.bytes -= self._sizes.pop(key)
        for key, data in puts:
            self._sizes[key] = len(data)
            self.bytes += len(data)

    def save_meta(self, info: ObjectInfo) -> None:
        value = json.dumps({"path": info.path, "size": info.size, "version": info.version, "fetched_at": info.fetched_at})
        try:
            with self._env.begin(write=True) as txn:
                txn.put(_path_key(info.path), value.encode(), db=self._meta_db)
        except lmdb.Error as exc:
            raise DiskFull(f"disk tier at {self.directory} could not write metadata: {exc}") from exc

    def load_meta(self) -> dict[str, ObjectInfo]:
        found: dict[str, ObjectInfo] = {}
        with self._env.begin() as txn:
            for _key_bytes, value in txn.cursor(db=self._meta_db):
                try:
                    info = ObjectInfo(**json.loads(value))
                except (ValueError, TypeError):
                    continue
                found[info.path] = info
        return found

    def delete_meta(self, path: str) -> None:
        with self._env.begin(write=True) as txn:
            txn.delete(_path_key(path), db=self._meta_db)

    def file_bytes(self) -> int:
        """Bytes the LMDB data file takes on disk."""
        return sum(f.stat().st_blocks * 512 for f in (self.directory / "blocks.lmdb").iterdir())

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()
