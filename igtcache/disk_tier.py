"""The disk tier: checksummed blocks in one LMDB environment, bounded by bytes.

Four named databases share one environment, so every change is one atomic
transaction: ``index`` (key -> size, xxh3-64 checksums of the block and of its
pieces, write sequence, path, version), ``data`` (key -> block bytes), ``meta``
(path -> object stat and until when it is vouched for, for TTL revalidation
across restarts and for readers in other processes) and ``settings`` (what the
bytes mean: format version, block size, checksum algorithm, the remote they
were fetched from). The layout is ``igtcache.disk_format``'s, which the
daemon's clients read too (``igtcache.short_circuit``).

An environment whose settings differ from the ones asked for (another block
size, another remote, an older format without settings) holds bytes that
would be served at the wrong place or for the wrong object: it is moved aside
and the tier starts empty, exactly as for a damaged one.

Durability: the environment is opened with ``sync=False, metasync=False``.
A committed transaction is in the OS page cache when ``write()`` returns, so it
survives the process being killed (``kill -9``); after an OS crash or power
loss the last transactions may be lost. Either way every block is verified
against its checksum on read, so a torn or corrupted block is never returned, and
an environment that cannot be opened at all (or whose data file is shorter
than its own meta page says) is moved aside and started anew.

No ``lmdb.Error`` leaves this module: a failed write raises :class:`DiskFull`,
any other failure :class:`DiskTierError`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Iterator

import lmdb

from igtcache.block_store import TierFull
from igtcache.disk_format import (
    DATABASES, ENV_NAME, block_key, decode_index, decode_meta, encode_index, encode_meta, path_key, settings,
    stored_settings, verified,
)
from igtcache.policies import BlockKey
from igtcache.remote import ObjectInfo

log = logging.getLogger(__name__)

# LMDB stores values in 4 KiB pages and copies pages on write; the map leaves room for that.
_MAP_OVERHEAD = 1.25
_MAP_SLACK = 64 << 20
# What LMDB raises for a damaged file, as opposed to e.g. a second open in this process.
_DAMAGED = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError, lmdb.PageNotFoundError, lmdb.BadValsizeError)
_FULL = (lmdb.MapFullError, lmdb.DiskError)  # DiskError is ENOSPC

# LMDB's MDB_meta on 64-bit builds, after the 16-byte page header: magic, version,
# address, map size, two 48-byte MDB_db records (the first one's md_pad is the
# page size), last page number, transaction id.
_META_MAGIC = 0xBEEFC0DE
_META_HEAD = struct.Struct("<II")
_META_PSIZE = struct.Struct("<I")
_META_TAIL = struct.Struct("<QQ")
_PSIZE_AT, _LAST_PG_AT = 40, 136


class DiskFull(TierFull):
    """The disk tier could not take a write: file system or LMDB map full, over its
    byte bound, or the write transaction failed."""


class DiskTierError(OSError):
    """The disk tier's LMDB environment failed on something other than a write."""


def _key(key: BlockKey) -> bytes:
    return block_key(key.path, key.version, key.index)


def _truncation(data_file: Path) -> str | None:
    """Why ``data.mdb`` is shorter than its newest meta page says, or ``None``.

    LMDB maps the file lazily, so touching a page past its end kills the process
    with SIGBUS; this is checked before the environment is opened. A file LMDB
    would reject anyway (bad magic, not a 64-bit layout) is left to LMDB.
    """
    if struct.calcsize("P") != 8:
        return None
    try:
        with open(data_file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            metas = []
            offset = 0
            for _ in range(2):
                f.seek(offset)
                raw = f.read(_LAST_PG_AT + _META_TAIL.size)
                if len(raw) < _LAST_PG_AT + _META_TAIL.size or _META_HEAD.unpack_from(raw, 16)[0] != _META_MAGIC:
                    break
                psize = _META_PSIZE.unpack_from(raw, _PSIZE_AT)[0]
                last_pg, txnid = _META_TAIL.unpack_from(raw, _LAST_PG_AT)
                metas.append((txnid, last_pg, psize))
                offset = psize
    except FileNotFoundError:
        return None
    if not metas:
        return None
    _txnid, last_pg, psize = max(metas)
    need = (last_pg + 1) * psize
    if need > size:
        return f"data.mdb is {size} bytes, its meta page says {need}"
    return None


class DiskTier:
    """Blocks on local disk that survive restarts; never more than ``capacity`` bytes of blocks.

    ``block_size`` and ``remote_id`` (see :attr:`igtcache.remote.Remote.identity`) are
    stored with the blocks; an environment written with others is moved aside.
    """

    def __init__(self, directory: str | os.PathLike, capacity: int, *, block_size: int, remote_id: str) -> None:
        self.directory = Path(directory)
        self.capacity = capacity
        self.settings = settings(block_size, remote_id)
        self.bytes = 0
        self.recovered_from_corruption = False
        self.moved_aside: Path | None = None  # where an unusable environment went
        self.corrupt_reads = 0  # blocks get() found failing their checksum
        self._sizes: dict[BlockKey, int] = {}
        self._seq = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._env = self._open_env()
            self._load_index()
        except lmdb.Error as exc:
            raise DiskTierError(f"disk tier at {self.directory} cannot be opened: {exc}") from exc

    # ------------------------------------------------------------------ opening

    def _open_env(self) -> lmdb.Environment:
        target = self.directory / ENV_NAME
        truncated = _truncation(target / "data.mdb")
        if truncated is not None:
            self._damaged(target, truncated)
        try:
            env = self._env_at(target)
        except _DAMAGED as exc:
            self._damaged(target, str(exc))
            env = self._env_at(target)
        found = self._stored_settings(env)
        if found == self.settings:
            return env
        if found is not None:
            env.close()
            aside = self._move_aside(target, "mismatch")
            log.warning("disk tier at %s was written with %s; now %s: moved aside to %s, starting empty",
                        target, self._describe(found), self._describe(self.settings), aside)
            env = self._env_at(target)
        with env.begin(write=True) as txn:
            for name, value in self.settings.items():
                txn.put(name.encode(), value.encode("utf-8", "surrogatepass"), db=self._settings_db)
        return env

    def _env_at(self, target: Path) -> lmdb.Environment:
        env = lmdb.open(
            str(target), map_size=int(self.capacity * _MAP_OVERHEAD) + _MAP_SLACK, max_dbs=4, max_readers=512,
            sync=False, metasync=False, readahead=False,
        )
        self._index_db, self._data_db, self._meta_db, self._settings_db = map(env.open_db, DATABASES)
        return env

    def _stored_settings(self, env: lmdb.Environment) -> dict[str, str] | None:
        """The environment's settings; ``{}`` for one with blocks but no settings
        (an older format); ``None`` for a fresh, empty one."""
        with env.begin() as txn:
            found = stored_settings(txn, self._settings_db)
            if found:
                return found
            empty = all(txn.stat(db)["entries"] == 0 for db in (self._index_db, self._data_db, self._meta_db))
        return None if empty else {}

    @staticmethod
    def _describe(settings: dict[str, str]) -> str:
        if not settings:
            return "no settings (an older format)"
        return (f"block size {settings.get('block_size')} for {settings.get('remote')} "
                f"(format {settings.get('format')}, {settings.get('checksum')} checksums)")

    def _damaged(self, target: Path, why: str) -> None:
        aside = self._move_aside(target, "corrupt")
        log.warning("disk tier at %s cannot be opened (%s); moved aside to %s, starting empty", target, why, aside)
        self.recovered_from_corruption = True

    def _move_aside(self, target: Path, reason: str) -> Path:
        """Rename ``target`` aside for inspection; only the newest environment set aside is
        kept, so restarts with changing settings cannot grow the cache directory."""
        for older in target.parent.glob("blocks.lmdb.*-*"):
            shutil.rmtree(older, ignore_errors=True)
        stamp = int(time.time())
        aside = target.with_name(f"blocks.lmdb.{reason}-{stamp}")
        n = 1
        while aside.exists():
            aside = target.with_name(f"blocks.lmdb.{reason}-{stamp}.{n}")
            n += 1
        target.rename(aside)
        self.moved_aside = aside
        return aside

    def _load_index(self) -> None:
        entries, broken = [], []
        with self._env.begin() as txn:
            for raw_key, value in txn.cursor(db=self._index_db):
                try:
                    size, seq, path, version = decode_index(value)
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

    # ------------------------------------------------------------------ blocks

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def entries(self) -> list[tuple[BlockKey, int]]:
        """Stored blocks and their sizes, oldest write first."""
        return list(self._sizes.items())

    def keys(self) -> list[BlockKey]:
        """Every stored key, oldest write first."""
        return list(self._sizes)

    @contextlib.contextmanager
    def views(self, keys: list[BlockKey]) -> Iterator[tuple[dict[BlockKey, memoryview], list[BlockKey]]]:
        """Zero-copy views of the blocks that pass their checksum, and the keys that fail it.

        Views are valid only inside the ``with`` block (they point into the
        LMDB map); absent keys appear in neither result.
        """
        found: dict[BlockKey, memoryview] = {}
        corrupt: list[BlockKey] = []
        try:
            txn = self._env.begin(buffers=True)
        except lmdb.Error as exc:
            raise DiskTierError(f"disk tier at {self.directory} could not start a read: {exc}") from exc
        try:
            try:
                for key in keys:
                    raw_key = _key(key)
                    index = txn.get(raw_key, db=self._index_db)
                    if index is None:
                        continue
                    data = txn.get(raw_key, db=self._data_db)
                    if data is None or not verified(index, data):
                        corrupt.append(key)
                    else:
                        found[key] = data
            except lmdb.Error as exc:
                raise DiskTierError(f"disk tier at {self.directory} could not read blocks: {exc}") from exc
            yield found, corrupt
        finally:
            txn.abort()  # read-only: nothing to commit

    def get(self, key: BlockKey) -> bytes | None:
        """A verified copy of the block, or ``None`` if absent or failing its checksum
        (counted in ``corrupt_reads``; the block stays until the owner discards it)."""
        with self.views([key]) as (found, corrupt):
            if corrupt:
                self.corrupt_reads += 1
                return None
            view = found.get(key)
            return None if view is None else bytes(view)

    def put(self, key: BlockKey, data: bytes) -> None:
        """Store one block (no-op if held); ``DiskFull`` if it cannot."""
        self.write(puts=[(key, data)])

    def discard(self, key: BlockKey) -> None:
        """Drop one block if held."""
        self.write(deletes=[key])

    def write(self, puts: list[tuple[BlockKey, bytes]] = (), deletes: list[BlockKey] = ()) -> None:
        """Delete then store blocks in one atomic transaction; ``DiskFull`` if it cannot
        (including when the blocks would exceed ``capacity``)."""
        deletes = [k for k in deletes if k in self._sizes]
        puts = [(k, d) for k, d in puts if k not in self._sizes]
        after = self.bytes - sum(self._sizes[k] for k in deletes) + sum(len(d) for _, d in puts)
        if after > self.capacity:
            raise DiskFull(f"disk tier at {self.directory}: write would hold {after} bytes, over its bound of {self.capacity}")
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
                    txn.put(raw_key, encode_index(data, seq, key.path, key.version), db=self._index_db)
                    txn.put(raw_key, data, db=self._data_db)
        except lmdb.Error as exc:
            raise self._write_failed("blocks", exc) from exc
        self._seq = seq
        for key in deletes:
            self.bytes -= self._sizes.pop(key)
        for key, data in puts:
            self._sizes[key] = len(data)
            self.bytes += len(data)

    def _write_failed(self, what: str, exc: lmdb.Error) -> DiskFull:
        if isinstance(exc, _FULL):
            return DiskFull(f"disk tier at {self.directory} is full (writing {what}): {exc}")
        return DiskFull(f"disk tier at {self.directory} could not write {what}: {exc}")

    # ------------------------------------------------------------------ metadata

    def save_meta(self, info: ObjectInfo, fresh_until: float) -> None:
        """Keep an object's stat across restarts, vouched for until ``fresh_until``
        (``time.monotonic()``, which other processes of this boot share); ``DiskFull`` if it cannot."""
        value = encode_meta(info.path, info.size, info.version, fresh_until)
        try:
            with self._env.begin(write=True) as txn:
                txn.put(path_key(info.path), value, db=self._meta_db)
        except lmdb.Error as exc:
            raise self._write_failed("metadata", exc) from exc

    def load_meta(self) -> dict[str, ObjectInfo]:
        """Every object stat kept, by path, each due for revalidation (``fetched_at`` -inf)."""
        found: dict[str, ObjectInfo] = {}
        try:
            with self._env.begin() as txn:
                for _key_bytes, value in txn.cursor(db=self._meta_db):
                    try:
                        record = decode_meta(value)
                    except (ValueError, struct.error):
                        continue
                    found[record.path] = ObjectInfo(record.path, record.size, record.version, -math.inf)
        except lmdb.Error as exc:
            raise DiskTierError(f"disk tier at {self.directory} could not read metadata: {exc}") from exc
        return found

    def delete_meta(self, path: str) -> None:
        """Forget an object's stat; ``DiskFull`` if the deletion cannot be written."""
        try:
            with self._env.begin(write=True) as txn:
                txn.delete(path_key(path), db=self._meta_db)
        except lmdb.Error as exc:
            raise self._write_failed("metadata", exc) from exc

    def clear_stale_readers(self) -> int:
        """Free reader slots that processes which died mid-read left in the lock file; how many."""
        try:
            return self._env.reader_check()
        except lmdb.Error as exc:
            raise DiskTierError(f"disk tier at {self.directory} could not check its readers: {exc}") from exc

    def file_bytes(self) -> int:
        """Bytes the LMDB data file takes on disk."""
        return sum(f.stat().st_blocks * 512 for f in (self.directory / ENV_NAME).iterdir())

    def close(self) -> None:
        """Flush to the OS and close the environment."""
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            raise DiskTierError(f"disk tier at {self.directory} could not sync: {exc}") from exc
        finally:
            self._env.close()
