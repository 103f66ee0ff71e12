"""Short-circuit reads: a client serves hits from its daemon's disk tier in its own process.

As HDFS and Alluxio let a client read a local worker's blocks directly, an
attached client (``DaemonClient``, and through it the fsspec plugin and the
FUSE mount) opens the daemon's LMDB environment read-only (LMDB is built for
many reader processes beside one writer) and serves a read itself when it
can settle it alone:

- the object's metadata is in the tier and the daemon's last check of the
  remote still vouches for its version (``igtcache.disk_format.MetaRecord``);
- every block of the range is in the tier and each piece of it that the read
  returns passes its checksum.

Anything else (a miss, metadata past its TTL, a block not yet stored, a damaged
piece, an environment this process cannot open) returns ``None`` and the
client asks the daemon over the socket, as without short-circuit reads.

Reads run in per-thread read transactions that are kept and renewed, not
opened per read: a snapshot serves for ``RENEW_AFTER`` seconds, and one left
unused for ``IDLE_RELEASE`` seconds is released by a janitor thread, so no
client pins an old snapshot (which would keep the daemon from reusing pages).
LMDB's snapshots make a read safe against the daemon evicting, replacing or
invalidating the same block meanwhile: the reader sees the block whole or not
at all. Every hit is logged and reported to the daemon in batches
(``igtcache.hit_report``), so its access stream tree, policy and stats see
every read, a little later.

After ``fork`` the child drops the parent's environment and transactions
without touching them (closing them would release the parent's reader slots)
and opens its own; the slot a killed client leaves is freed by the daemon.
"""

from __future__ import annotations

import atexit
import gc
import logging
import math
import os
import stat
import struct
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, TypeVar

import lmdb
import xxhash

from igtcache.disk_format import (
    DATABASES, ENV_NAME, MetaRecord, boot_id, checks, decode_meta, map_size_of, object_digest, path_key, settings,
    stored_settings,
)
from igtcache.hit_report import HitLog

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a read snapshot serves before the next read of its thread takes a newer one.
RENEW_AFTER = 0.05
#: Seconds a snapshot may sit unused before the janitor releases it.
IDLE_RELEASE = 0.5
#: Seconds between reports of hits to the daemon (sooner when ``REPORT_AT`` are waiting).
REPORT_EVERY = 0.25
REPORT_AT = 16384
#: Seconds between checks that the environment opened is still the daemon's.
RECHECK_EVERY = 1.0


class ShortCircuitUnavailable(OSError):
    """This process cannot read the daemon's disk tier itself; the message says why."""


class _Snapshot:
    """One thread's read transaction, and when it began and was last used."""

    __slots__ = ("lock", "txn", "began", "used", "generation", "thread", "objects", "blocks")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.txn: lmdb.Transaction | None = None
        self.began = self.used = 0.0
        self.generation = -1
        self.thread = threading.current_thread()
        self.objects: dict[str, tuple[MetaRecord, bytes]] = {}  # looked up in this snapshot
        self.blocks: dict[bytes, tuple[memoryview, memoryview]] = {}  # index entry and bytes, by block key


class DiskTierReader:
    """Verified hits from a daemon's disk tier (``directory``), read in place in this process.

    ``block_size`` and ``remote_id`` must be what the tier's settings record
    (else ``ShortCircuitUnavailable``); its files must belong to ``owner`` (the
    daemon's uid) and be writable by nobody else. ``report`` sends one hit
    report's payload to the daemon for ``remote``.
    """

    def __init__(self, directory: str | os.PathLike, *, remote: str, block_size: int, remote_id: str,
                 owner: int, report: Callable[[bytes], object]) -> None:
        self.directory = Path(directory)
        self.remote = remote
        self.block_size = block_size
        self.remote_id = remote_id
        self.owner = owner
        self._report = report
        self._fork_state()
        self._env, self._identity = self._open()

    def _after_fork(self) -> None:
        """Drop the parent's environment and transactions untouched (py-lmdb leaves the parent's
        reader slots alone when a child deallocates them); only then may this process open the
        same files again."""
        for snapshot in self._snapshots:
            snapshot.txn = None
        self._env = self._local = self._snapshots = None
        self._fork_state()
        try:
            self._env, self._identity = self._open()
        except ShortCircuitUnavailable:
            gc.collect()  # something still held the parent's environment: a full collection drops it
            try:
                self._env, self._identity = self._open()
            except ShortCircuitUnavailable as exc:
                log.info("short-circuit reads from %s stop in process %d: %s", self.directory, os.getpid(), exc)
                self._env = _Closed()

    def _fork_state(self) -> None:
        """Everything that belongs to one process, made anew in a forked child (but the environment)."""
        self._forks = _forks[0]
        self._boot = boot_id()
        self.served = 0  # reads served in this process
        self.damaged = 0  # pieces that failed their checksum here (the daemon then reads them)
        self.reports_failed = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._snapshots: list[_Snapshot] = []
        self._generation = 0
        self._janitor: threading.Thread | None = None
        self._wake = threading.Event()
        self.log = HitLog()
        self._identity: tuple[int, int] | None = None
        self._checked = time.monotonic()

    # ------------------------------------------------------------------ opening

    def _open(self) -> tuple[lmdb.Environment, tuple[int, int]]:
        target = self.directory / ENV_NAME
        data_file = target / "data.mdb"
        try:
            for path in (target, data_file, target / "lock.mdb"):
                info = path.lstat()
                if info.st_uid != self.owner or stat.S_ISLNK(info.st_mode):
                    raise ShortCircuitUnavailable(f"{path} is not the daemon's (uid {info.st_uid}, not {self.owner})")
                if path != target / "lock.mdb" and info.st_mode & 0o022:
                    raise ShortCircuitUnavailable(f"{path} is writable by others than the daemon")
            env = lmdb.open(str(target), map_size=map_size_of(data_file), readonly=True, create=False, lock=True,
                            max_dbs=len(DATABASES), readahead=False)
        except (OSError, ValueError, struct.error, lmdb.Error) as exc:
            if isinstance(exc, ShortCircuitUnavailable):
                raise
            raise ShortCircuitUnavailable(f"cannot open the disk tier at {target}: {exc}") from None
        try:
            found = self._settings(env)
        except lmdb.Error as exc:
            env.close()
            raise ShortCircuitUnavailable(f"cannot read the disk tier's settings at {target}: {exc}") from None
        expected = settings(self.block_size, self.remote_id)
        if found != expected:
            env.close()
            raise ShortCircuitUnavailable(f"the disk tier at {target} records {found}, not {expected}")
        info = data_file.stat()
        return env, (info.st_dev, info.st_ino)

    def _settings(self, env: lmdb.Environment) -> dict[str, str]:
        self._index_db, self._data_db, self._meta_db, settings_db = (
            env.open_db(name, create=False) for name in DATABASES)
        with env.begin() as txn:
            return stored_settings(txn, settings_db)

    # ------------------------------------------------------------------ reading

    def info(self, path: str) -> MetaRecord | None:
        """``path``'s size and version if the daemon's last check still vouches for them."""
        return self._settle(lambda snapshot, now: self._fresh_meta(snapshot.txn, path, now))[0]

    def read(self, path: str, offset: int, size: int, job: str, out: memoryview | None = None) -> bytes | int | None:
        """Bytes ``[offset, offset+size)`` of ``path`` (``size`` -1: to the end), or with ``out`` the
        count written there; ``None`` if the tier alone cannot serve the read. ``path`` must be
        normalized (``igtcache.remote.normalize_path``)."""
        found, now = self._settle(lambda snapshot, now: self._serve(snapshot, path, offset, size, now, out))
        if found is None:
            return None
        result, meta, length = found
        self.served += 1
        if length:
            self.log.add(job, path, meta.version, meta.size, offset, length, now)
            if len(self.log) >= REPORT_AT:
                self._wake.set()
        return result

    def _settle(self, settle: Callable[[_Snapshot, float], T | None]) -> tuple[T | None, float]:
        """What ``settle`` finds in this thread's snapshot (``None``: the tier alone cannot
        answer), and the time it was asked at."""
        now = time.monotonic()
        try:
            snapshot = self._snapshot(now)
        except lmdb.Error:
            return None, now
        try:
            found = settle(snapshot, now)
        except lmdb.Error:
            found = None
        if found is None:
            snapshot.began = -math.inf  # the daemon is about to store what it finds: look anew next time
        snapshot.lock.release()
        return found, now

    def _serve(self, snapshot: _Snapshot, path: str, offset: int, size: int, now: float,
               out: memoryview | None) -> tuple[bytes | int, MetaRecord, int] | None:
        found = snapshot.objects.get(path)
        if found is None:
            meta = self._fresh_meta(snapshot.txn, path, now)
            if meta is None:
                return None
            found = snapshot.objects[path] = (meta, object_digest(path, meta.version))
        meta, digest = found
        if not meta.fresh(now, self._boot):
            return None
        txn = snapshot.txn
        end = meta.size if size < 0 else min(meta.size, offset + size)
        if out is not None:
            end = min(end, offset + out.nbytes)
        if offset >= end:
            return (0 if out is not None else b""), meta, 0
        bs = self.block_size
        parts = []
        on_copy = []  # checks of spans wholly returned: made on the copy, one pass over the map, not two
        copied = 0
        for index in range(offset // bs, (end - 1) // bs + 1):
            raw_key = digest + index.to_bytes(8, "big")
            entry, data = snapshot.blocks.get(raw_key) or (None, None)
            if data is None:
                entry = txn.get(raw_key, db=self._index_db)
                data = txn.get(raw_key, db=self._data_db) if entry is not None else None
                if data is None:
                    return None
                snapshot.blocks[raw_key] = (entry, data)
            start = index * bs
            lo, hi = max(offset - start, 0), min(end - start, bs)
            spans = checks(entry, len(data), lo, hi) if len(data) == min(bs, meta.size - start) else None
            if spans is None:
                self.damaged += 1
                return None
            for a, b, expected in spans:
                if lo <= a and b <= hi:
                    on_copy.append((copied + a - lo, copied + b - lo, expected))
                elif xxhash.xxh3_64_intdigest(data[a:b]) != expected:
                    self.damaged += 1
                    return None
            parts.append(data[lo:hi])
            copied += hi - lo
        if out is None:
            result = b"".join(parts)
            copy = memoryview(result)
        else:
            result = end - offset
            copy = out[:result]
            at = 0
            for part in parts:
                copy[at:at + len(part)] = part
                at += len(part)
        for a, b, expected in on_copy:
            if xxhash.xxh3_64_intdigest(copy[a:b]) != expected:
                self.damaged += 1
                return None  # a copy into ``out`` is left there: the caller reads again over the socket
        return result, meta, end - offset

    def _fresh_meta(self, txn: lmdb.Transaction, path: str, now: float) -> MetaRecord | None:
        value = txn.get(path_key(path), db=self._meta_db)
        if value is None:
            return None
        try:
            meta = decode_meta(value)
        except ValueError:
            return None
        return meta if meta.path == path and meta.fresh(now, self._boot) else None

    # ------------------------------------------------------------------ snapshots

    def _snapshot(self, now: float) -> _Snapshot:
        """This thread's snapshot, locked, no older than ``RENEW_AFTER``; the caller releases its lock."""
        if self._forks != _forks[0]:
            self._after_fork()
        snapshot = getattr(self._local, "snapshot", None)
        if snapshot is None:
            snapshot = self._local.snapshot = _Snapshot()
            with self._lock:
                self._snapshots.append(snapshot)
        if self._janitor is None:
            self._start_janitor()
        snapshot.lock.acquire()
        try:
            if (snapshot.txn is None or now - snapshot.began > RENEW_AFTER
                    or snapshot.generation != self._generation):
                if snapshot.txn is not None:
                    snapshot.txn.abort()
                    snapshot.txn = None
                snapshot.objects.clear()
                snapshot.blocks.clear()  # views into the old snapshot: invalid once it ends
                snapshot.txn = self._env.begin(buffers=True)
                snapshot.began, snapshot.generation = now, self._generation
        except BaseException:
            snapshot.lock.release()
            raise
        snapshot.used = now
        return snapshot

    def refresh(self) -> None:
        """Make every thread's next read take a new snapshot (after this process changed the tier
        through the daemon, e.g. invalidated an object)."""
        self._generation += 1

    # ------------------------------------------------------------------ the janitor

    def _start_janitor(self) -> None:
        with self._lock:
            if self._janitor is not None:
                return
            self._janitor = threading.Thread(target=self._tend, args=(weakref.ref(self),),
                                             name="igtcache-short-circuit", daemon=True)
            self._janitor.start()

    @staticmethod
    def _tend(ref: "weakref.ReferenceType[DiskTierReader]") -> None:
        """Report hits, release idle snapshots, notice a replaced environment, until the reader goes."""
        forks = _forks[0]
        while True:
            reader = ref()
            if reader is None or reader._forks != forks:
                return
            wake = reader._wake
            try:
                reader.flush()
                busy = reader._release_idle(time.monotonic())
                reader._recheck(time.monotonic())
            except Exception:  # noqa: BLE001 - the janitor must outlive any one failure
                log.debug("short-circuit janitor", exc_info=True)
                busy = True
            if isinstance(reader._env, _Closed):
                reader.flush()
                return
            del reader
            wake.wait(REPORT_EVERY if busy else RECHECK_EVERY)
            wake.clear()

    def flush(self) -> None:
        """Send every hit logged so far to the daemon (hits it cannot take are counted and dropped)."""
        while (payload := self.log.take(self.remote)) is not None:
            try:
                self._report(payload)
            except Exception as exc:  # noqa: BLE001 - reporting must never fail a read
                self.reports_failed += 1
                log.debug("reporting hits to the daemon failed: %s", exc)
                return

    def _release_idle(self, now: float) -> bool:
        """Release snapshots idle for ``IDLE_RELEASE``; whether any snapshot or logged hit remains."""
        with self._lock:
            snapshots = list(self._snapshots)
        for snapshot in snapshots:
            if snapshot.txn is None or now - snapshot.used < IDLE_RELEASE:
                continue
            if snapshot.lock.acquire(blocking=False):
                try:
                    if snapshot.txn is not None:
                        snapshot.objects.clear()
                        snapshot.blocks.clear()
                        snapshot.txn.abort()
                        snapshot.txn = None
                finally:
                    snapshot.lock.release()
        with self._lock:
            self._snapshots = [s for s in self._snapshots if s.thread.is_alive() or s.txn is not None]
            return len(self.log) > 0 or any(s.txn is not None for s in self._snapshots)

    def _recheck(self, now: float) -> None:
        """Reopen the tier if the daemon replaced its environment (moved a damaged or mismatched one aside)."""
        if now - self._checked < RECHECK_EVERY:
            return
        self._checked = now
        try:
            info = (self.directory / ENV_NAME / "data.mdb").stat()
            if (info.st_dev, info.st_ino) == self._identity:
                return
            env, identity = self._open()
        except OSError as exc:  # ShortCircuitUnavailable included
            log.info("short-circuit reads from %s stop: %s", self.directory, exc)
            self._env = _Closed()
            self.refresh()
            with _readers_lock:
                if _readers.get(self.directory) is self:
                    del _readers[self.directory]
            return
        self._env, self._identity = env, identity
        self.refresh()

    def close(self) -> None:
        """Report what is logged and release every snapshot."""
        self.flush()
        self._release_idle(float("inf"))


class _Closed:
    """Stands for an environment that can no longer be read: every read goes to the daemon."""

    def begin(self, **_kwargs) -> None:
        raise lmdb.Error("the disk tier is no longer readable here")


_forks = [0]  # forks this process descends from: a reader made before the last one is its parent's
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))

_readers: dict[Path, DiskTierReader] = {}
_readers_lock = threading.Lock()


def attach(directory: str | os.PathLike, **kwargs) -> DiskTierReader:
    """The process's reader of the disk tier at ``directory`` (LMDB allows one environment per
    file per process, so every client of one tier shares it); ``ShortCircuitUnavailable`` if
    this process cannot read it. ``kwargs`` as for :class:`DiskTierReader`."""
    key = Path(directory).resolve()
    with _readers_lock:
        reader = _readers.get(key)
        if reader is not None and all(getattr(reader, k) == v for k, v in kwargs.items() if k != "report"):
            return reader
        reader = _readers[key] = DiskTierReader(key, **kwargs)
        return reader


@atexit.register
def _report_at_exit() -> None:
    for reader in list(_readers.values()):
        if reader._forks == _forks[0]:
            reader.flush()
