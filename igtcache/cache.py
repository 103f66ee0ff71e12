"""``igtcache.Cache``: the engine. Serves byte ranges of remote objects from a
bounded block cache with a memory tier and an LMDB disk tier.

Concurrency model: one lock (``_lock``) guards the policy, the tiers' indexes
and the counters and is never held across I/O. Block fetches are single-flight
(one future per missing block, shared by every reader that wants it). Stores
are serialized by ``_store_lock`` so that the disk tier changes in the order
the policy decided; a block between that decision and its LMDB commit is
served from ``_pending``.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import itertools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import fsspec

from igtcache.bench.trace import TraceRow, TraceWriter
from igtcache.disk_tier import DiskFull, DiskTier
from igtcache.memory_tier import MemoryTier
from igtcache.meta_table import MetaTable, parent
from igtcache.policies import BlockKey, Policy, make_policy
from igtcache.remote import ObjectInfo, Remote, check_range, normalize_path
from igtcache.residency import Residency, block_length, block_span
from igtcache.stats import CacheStats

log = logging.getLogger(__name__)

#: When this many entries of a directory are past half their TTL, one listing revalidates them all.
BATCH_REVALIDATION = 16

MiB = 1 << 20
GiB = 1 << 30


class CacheDirInUse(RuntimeError):
    """Another process holds the cache directory."""


class _ObjectChanged(Exception):
    """A fetched block's length disagrees with the object's known size."""


class Cache:
    """A block cache in front of any fsspec remote.

    ``remote`` is a URL (``s3://bucket/prefix``, ``file:///data``,
    ``memory://x``) or an fsspec filesystem, with ``root`` the prefix inside it.
    Without ``cache_dir`` the cache lives in memory only (``memory_bytes``);
    with it, ``disk_bytes`` of blocks are kept in LMDB under ``cache_dir`` and
    survive restarts, and the memory tier holds the hottest of them.
    Metadata is revalidated against the remote after ``ttl`` seconds; when
    many entries of one directory come due, one listing in the background
    revalidates them all, so re-reads of a dataset do not pay a stat each.
    ``policy`` is a registered name (``igtcache.policies.POLICIES``) or a
    ``Policy`` instance whose capacity fits the tier it governs.
    ``trace_path`` records every read as a trace CSV (``igtcache bench
    replay`` reads it), so a live run can be replayed against other policies.
    """

    STATS_STREAMS = 50  # most recently active streams listed by stats()

    def __init__(
        self,
        remote: str | fsspec.AbstractFileSystem,
        *,
        root: str = "",
        storage_options: dict | None = None,
        cache_dir: str | os.PathLike | None = None,
        memory_bytes: int = 512 * MiB,
        disk_bytes: int = 10 * GiB,
        block_size: int = 4 * MiB,
        policy: str | Policy = "igt",
        ttl: float = 30.0,
        retries: int = 3,
        timeout: float = 30.0,
        trace_path: str | os.PathLike | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if memory_bytes < 0 or disk_bytes < 0:
            raise ValueError("memory_bytes and disk_bytes must be >= 0")
        if isinstance(remote, str):
            self.remote = Remote.from_url(remote, storage_options, retries=retries, timeout=timeout)
        else:
            self.remote = Remote(remote, root, retries=retries, timeout=timeout)
        self.block_size = block_size
        self.ttl = ttl
        self._lock = threading.RLock()
        self._store_lock = threading.Lock()
        self._dir_lock = None
        self.disk: DiskTier | None = None
        if cache_dir is not None:
            self._dir_lock = _lock_directory(Path(cache_dir))
            self.disk = DiskTier(cache_dir, disk_bytes)
        capacity = disk_bytes if self.disk is not None else memory_bytes
        self.policy = make_policy(policy, capacity) if isinstance(policy, str) else policy
        if self.policy.capacity > capacity:
            raise ValueError(f"policy capacity {self.policy.capacity} exceeds the tier it governs ({capacity} bytes)")
        self.memory = MemoryTier(memory_bytes)
        self.residency = Residency(self.policy, block_size)
        self.stats_counters = CacheStats()
        self._meta = MetaTable()
        self._listing: set[str] = set()  # directories being revalidated by a listing
        self._revalidator = concurrent.futures.ThreadPoolExecutor(1, "igtcache-revalidate")
        self._by_path: dict[str, set[BlockKey]] = {}
        self._pending: dict[BlockKey, bytes] = {}
        self._inflight: dict[BlockKey, concurrent.futures.Future] = {}
        self._unused_prefetch: dict[BlockKey, int] = {}  # prefetched, not yet read: size
        self._store_pool = concurrent.futures.ThreadPoolExecutor(2, "igtcache-store")
        self._warned_disk_full = False
        self._closed = False
        self._started = time.monotonic()
        # Line-buffered: a trace must keep every read up to a crash.
        self._trace_file = open(trace_path, "w", newline="", buffering=1) if trace_path is not None else None
        self._trace = TraceWriter(self._trace_file) if self._trace_file is not None else None
        if self.disk is not None:
            self._restore_from_disk()

    # ------------------------------------------------------------------ public API

    def read(self, path: str, offset: int = 0, size: int = -1, *, job: str | None = None, hint: str | None = None) -> bytes:
        """Bytes ``[offset, offset+size)`` of ``path``; fewer at end of object.

        ``size=-1`` reads to the end. ``job`` tags the access (default: this
        process id); ``hint`` passes a pattern hint to the policy.
        """
        return self._read(path, offset, size, job, hint, None)

    def read_pieces(self, path: str, offset: int = 0, size: int = -1, *, job: str | None = None,
                    hint: str | None = None) -> list[bytes | memoryview]:
        """The bytes of :meth:`read` as a list of pieces in order, not joined.

        Pieces of memory-tier blocks are views of the cached blocks, not
        copies: for a caller that gathers them itself (``socket.sendmsg``).
        """
        return self._read(path, offset, size, job, hint, PIECES)

    def readinto(self, path: str, offset: int, buffer, *, job: str | None = None, hint: str | None = None) -> int:
        """Read up to ``len(buffer)`` bytes at ``offset`` into a writable buffer; return how many.

        Cached bytes are copied once, straight into ``buffer``.
        """
        out = memoryview(buffer).cast("B")
        return self._read(path, offset, len(out), job, hint, out)

    def _read(self, path, offset, size, job, hint, out):
        self._check_open()
        check_range(offset, size)
        job = str(os.getpid()) if job is None else str(job)
        for attempt in range(2):
            info = self._info(path, refresh=attempt > 0)
            length = info.size - offset if size == -1 else size
            try:
                return self._read_blocks(info, offset, max(0, length), job, hint, out)
            except _ObjectChanged:
                if attempt:
                    raise OSError(f"{path!r} on {self.remote.url} keeps changing while being read") from None
                self.invalidate(path)
        raise AssertionError("unreachable")

    def info(self, path: str) -> dict[str, Any]:
        """Size and version of an object (revalidated after ``ttl``)."""
        self._check_open()
        info = self._info(path)
        return {"name": info.path, "size": info.size, "type": "file", "version": info.version}

    def ls(self, prefix: str = "") -> list[dict[str, Any]]:
        """List a directory of the remote: ``name``, ``size``, ``type`` per entry."""
        self._check_open()
        return self.remote.ls(prefix)

    def invalidate(self, path: str) -> None:
        """Forget everything cached about ``path``: metadata and blocks."""
        self._check_open()
        path = normalize_path(path)
        with self._store_lock:
            with self._lock:
                self._meta.pop(path)
                keys = list(self._by_path.get(path, ()))
                for key in keys:
                    self.residency.drop(key)
                    self._forget(key)
            self._delete_from_disk(keys)
            if self.disk is not None:
                self.disk.delete_meta(path)

    def prefetch(self, path: str, offset: int = 0, size: int = -1) -> int:
        """Start fetching a range in the background; returns the number of blocks started."""
        self._check_open()
        check_range(offset, size)
        info = self._info(path)
        first, last = block_span(offset, info.size - offset if size == -1 else size, info.size, self.block_size)
        keys = [BlockKey(info.path, info.version, i) for i in range(first, last + 1)]
        with self._lock:
            keys = [k for k in keys if k not in self.policy]
        for key in keys:
            self._fetch(key, info, prefetched=True)
        return len(keys)

    def stats(self) -> dict[str, Any]:
        """Hits, misses, ratios, remote traffic, tiers, evictions, corruptions, per job, and the most
        recently active access streams with their patterns."""
        with self._lock:
            out = self.stats_counters.as_dict()
            out["policy"] = getattr(self.policy, "name", type(self.policy).__name__)
            out["block_size"] = self.block_size
            out["tiers"] = {
                "memory": {"bytes": self.memory.bytes, "blocks": len(self.memory), "capacity": self.memory.capacity},
            }
            if self.disk is not None:
                out["tiers"]["disk"] = {"bytes": self.disk.bytes, "blocks": len(self.disk), "capacity": self.disk.capacity}
            out["streams"] = self.residency.streams.streams(limit=self.STATS_STREAMS)
            return out

    def flush(self) -> None:
        """Wait until every block fetched so far is stored (on disk, with a disk tier).

        Reads return as soon as their blocks are placed, before the disk
        write; what ``flush`` returns after survives ``kill -9``.
        """
        for future in list(self._inflight.values()):
            try:
                future.result(timeout=self.remote.timeout * self.remote.retries)
            except Exception:  # noqa: BLE001 - a failed fetch stores nothing; its reader saw the error
                pass
        with self._store_lock:  # a block is handed over under this lock, before its disk write
            pass

    def close(self) -> None:
        """Finish in-flight fetches and stores and close the disk tier intact."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._store_pool.shutdown(wait=True)
        self._revalidator.shutdown(wait=True, cancel_futures=True)
        self.remote.close()
        if self._trace_file is not None:
            self._trace_file.close()
        if self.disk is not None:
            self.disk.close()
        if self._dir_lock is not None:
            self._dir_lock.close()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def _read_blocks(self, info: ObjectInfo, offset: int, size: int, job: str, hint: str | None,
                     out: memoryview | None) -> bytes | int:
        """The read itself: bytes, or with ``out`` the count of bytes written there (``PIECES``: the pieces)."""
        with self._lock:
            ts = time.monotonic()
            plan = self.residency.plan(
                ts=ts, job=job, path=info.path, version=info.version,
                offset=offset, size=size, object_size=info.size, hint=hint,
            )
            if self._trace is not None and plan.access.last_block >= plan.access.first_block:
                self._trace.write(TraceRow(ts - self._started, job, info.path, offset,
                                           min(size, info.size - offset), info.size))
        spans = _spans(offset, size, info.size, self.block_size)
        pieces: dict[int, bytes | memoryview] = {}
        on_disk: list[BlockKey] = []
        missing = list(plan.missing)
        for key in plan.resident:
            block = self._from_memory(key)
            if block is not None:
                pieces[key.index] = _slice(block, *spans[key.index])
            elif self.disk is not None:
                on_disk.append(key)
            else:
                self._lost(key)
                missing.append(key)
        futures = {key.index: self._fetch(key, info, prefetched=False) for key in missing}
        for index, future in futures.items():
            pieces[index] = _slice(future.result(), *spans[index])
        self._start_prefetch(plan.access, info)
        if on_disk:
            data, failed = self._join_with_disk(on_disk, pieces, spans, out)
            if failed:
                for key in failed:
                    pieces[key.index] = _slice(self._fetch(key, info, prefetched=False).result(), *spans[key.index])
                missing += failed
                data = _join(pieces, out)
        else:
            data = _join(pieces, out)
        length = sum(hi - lo for lo, hi in spans.values())
        if not length:
            return data  # touched no block: neither a hit nor a miss
        from_remote = sum(spans[key.index][1] - spans[key.index][0] for key in missing)
        with self._lock:
            self.stats_counters.record_read(
                job, hit=not missing, requested=length, from_cache=length - from_remote,
                remote=sum(block_length(key.index, info.size, self.block_size) for key in missing),
            )
        return data

    def _join_with_disk(self, keys, pieces, spans, out) -> tuple[bytes | int, list[BlockKey]]:
        """Add disk-tier blocks to ``pieces`` and join them (into ``out`` if given)
        while their views are valid.

        Returns the joined result, or, where some blocks were missing or
        corrupt, nothing and those keys (with the good pieces copied out).
        """
        promote = self.memory.capacity > 0
        with self.disk.views(keys) as (views, corrupt):
            lost = [key for key in keys if key not in views and key not in corrupt]
            for key, view in views.items():
                if promote:
                    block = bytes(view)
                    with self._lock:
                        if key in self.policy:
                            self.memory.put(key, block)
                    pieces[key.index] = _slice(block, *spans[key.index])
                elif out is PIECES:  # they leave the transaction
                    pieces[key.index] = bytes(view[slice(*spans[key.index])])
                else:
                    pieces[key.index] = view[slice(*spans[key.index])]
            if not corrupt and not lost:
                return _join(pieces, out), []
            for key in views:
                pieces[key.index] = bytes(pieces[key.index])  # outlive the transaction
        for key in corrupt:
            log.warning("block %d of %r failed its checksum; dropping it and fetching it again", key.index, key.path)
        with self._lock:
            self.stats_counters.corruptions += len(corrupt)
        self._drop_blocks(corrupt)
        for key in lost:
            self._lost(key)
        return 0, corrupt + lost

    def _from_memory(self, key: BlockKey) -> bytes | None:
        """A resident block from the memory tier or a store in progress."""
        with self._lock:
            block = self.memory.get(key)
            if block is None:
                block = self._pending.get(key)
            if self._unused_prefetch.pop(key, None) is not None:
                self.stats_counters.prefetch_used += 1
        return block

    def _lost(self, key: BlockKey) -> None:
        """A block the policy holds but no tier has (its disk write failed, or it
        was evicted after the read was planned): forget it, unless it came back
        meanwhile -- dropping a re-stored block would leave its bytes on disk
        outside the policy's account."""
        with self._store_lock, self._lock:
            if key in self.memory or key in self._pending or (self.disk is not None and key in self.disk):
                return
            self.stats_counters.lost_blocks += 1
            self.residency.drop(key)
            self._forget(key)

    def _info(self, path: str, refresh: bool = False) -> ObjectInfo:
        path = normalize_path(path)
        with self._lock:
            cached = self._meta.get(path)
        if cached and not refresh and time.time() - cached.fetched_at < self.ttl:
            return cached
        info = self.remote.info(path)
        self._validated(info, cached)
        if cached is not None:
            self._revalidate_directory_soon(parent(path))
        return info

    def _validated(self, info: ObjectInfo, cached: ObjectInfo | None) -> None:
        """Keep ``info``, just read from the remote; drop ``cached``'s blocks if the object changed."""
        changed = cached is None or cached.version != info.version
        if cached is not None and changed:
            self.invalidate(info.path)
        with self._lock:
            self._meta.put(info)
        if self.disk is not None and changed:
            try:
                self.disk.save_meta(info)
            except DiskFull as exc:
                self._warn_disk_full(exc)

    def _revalidate_directory_soon(self, directory: str) -> None:
        """List ``directory`` in the background if enough of its entries are past half their TTL."""
        due_before = time.time() - self.ttl / 2
        with self._lock:
            if self._closed or directory in self._listing:
                return
            due = itertools.islice(self._meta.fetched_before(directory, due_before), BATCH_REVALIDATION)
            if len(list(due)) < BATCH_REVALIDATION:
                return
            self._listing.add(directory)
        self._revalidator.submit(self._revalidate_directory, directory)

    def _revalidate_directory(self, directory: str) -> None:
        started = time.time()
        try:
            listed = {e["name"]: e for e in self.remote.ls(directory) if e["type"] == "file"}
            with self._lock:
                due = list(self._meta.fetched_before(directory, started))
            for cached in due:
                entry = listed.get(cached.path)
                with self._lock:
                    current = self._meta.get(cached.path)
                # one missing from the listing, or stat'ed since it started, is left as it is
                if entry is not None and current is not None and current.fetched_at < started:
                    self._validated(ObjectInfo(cached.path, entry["size"], entry["version"], started), current)
        except Exception:  # noqa: BLE001 - every entry is still revalidated by its own stat when read
            log.debug("revalidating %s by listing failed", directory, exc_info=True)
        finally:
            with self._lock:
                self._listing.discard(directory)

    # ------------------------------------------------------------------ fetching and storing

    def _fetch(self, key: BlockKey, info: ObjectInfo, *, prefetched: bool) -> concurrent.futures.Future:
        """The single-flight future of ``key``'s bytes, stored once they arrive."""
        with self._lock:
            future = self._inflight.get(key)
            if future is not None:
                return future
            future = concurrent.futures.Future()
            placed = self.memory.get(key) or self._pending.get(key)
            if placed is not None:  # stored since the caller planned its read
                future.set_result(placed)
                return future
            self._inflight[key] = future
            if prefetched:
                self.stats_counters.prefetch_issued += 1
        start = key.index * self.block_size
        expected = block_length(key.index, info.size, self.block_size)
        started = time.monotonic()
        remote_future = self.remote.fetch(info.path, start, start + expected)
        remote_future.add_done_callback(
            lambda done: self._store_pool.submit(
                self._complete, key, expected, done, future, prefetched, time.monotonic() - started
            )
        )
        return future

    def _complete(self, key, expected, done, future, prefetched, seconds) -> None:
        try:
            data = done.result()
            if len(data) != expected:
                raise _ObjectChanged(key.path)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            with self._lock:
                self._inflight.pop(key, None)
                self.stats_counters.remote_errors += not isinstance(exc, _ObjectChanged)
            future.set_exception(exc)
            return
        with self._lock:
            self.policy.observe_fetch(len(data), seconds)
            self.stats_counters.remote_fetches += 1
            self.stats_counters.remote_bytes += len(data)
            self.stats_counters.remote_seconds += seconds
            if prefetched:
                self.stats_counters.prefetch_bytes += len(data)

        def hand_over() -> None:
            with self._lock:
                self._inflight.pop(key, None)
            future.set_result(data)

        self._store(key, data, prefetched, hand_over)

    def _store(self, key: BlockKey, data: bytes, prefetched: bool, hand_over) -> None:
        """Let the policy place a fetched block, ``hand_over`` it to its waiters,
        then write it to disk: readers need not wait for the disk write, since
        the block is in ``_pending`` until it is committed."""
        with self._store_lock:
            try:
                with self._lock:
                    current = self._meta.get(key.path)
                    if current is not None and current.version != key.version:
                        return  # the object changed while this block was in flight
                    evicted = self.residency.admit(key, len(data), prefetched=prefetched)
                    if evicted is None:
                        return
                    for victim in evicted:
                        self._forget(victim)
                    self.stats_counters.evictions += len(evicted)
                    self._by_path.setdefault(key.path, set()).add(key)
                    self.memory.put(key, data)
                    if prefetched:
                        self._unused_prefetch[key] = len(data)
                    if self.disk is not None:
                        self._pending[key] = data
            finally:
                hand_over()
            if self.disk is not None:
                try:
                    self.disk.write(puts=[(key, data)], deletes=evicted)
                except DiskFull as exc:
                    self._warn_disk_full(exc)
                    self._delete_from_disk(evicted)
                finally:
                    with self._lock:
                        self._pending.pop(key, None)

    def _drop_blocks(self, keys: list[BlockKey]) -> None:
        with self._store_lock:
            with self._lock:
                for key in keys:
                    self.residency.drop(key)
                    self._forget(key)
            self._delete_from_disk(keys)

    def _delete_from_disk(self, keys: list[BlockKey]) -> None:
        """Remove blocks from the disk tier (store lock held); a failure only warns."""
        if self.disk is None or not keys:
            return
        try:
            self.disk.write(deletes=keys)
        except DiskFull as exc:
            self._warn_disk_full(exc)

    def _forget(self, key: BlockKey) -> None:
        """Drop a block that left the policy from the memory tier and indexes (lock held)."""
        self.memory.discard(key)
        siblings = self._by_path.get(key.path)
        if siblings is not None:
            siblings.discard(key)
            if not siblings:
                del self._by_path[key.path]
        self.stats_counters.prefetch_wasted_bytes += self._unused_prefetch.pop(key, 0)

    def _start_prefetch(self, access, info: ObjectInfo) -> None:
        with self._lock:
            keys = [k for k in self.residency.prefetch(access) if k not in self._inflight]
        for key in keys:
            self._fetch(key, info, prefetched=True)

    def _restore_from_disk(self) -> None:
        """Re-admit the blocks the disk tier kept across a restart, oldest first."""
        self._meta.update(self.disk.load_meta().values())
        surplus: list[BlockKey] = []
        for key, size in self.disk.entries():
            evicted = self.residency.admit(key, size) or []
            surplus.extend(evicted)
            for victim in evicted:
                self._forget(victim)
            if key in self.policy:
                self._by_path.setdefault(key.path, set()).add(key)
        if surplus:
            self.disk.write(deletes=surplus)

    def _warn_disk_full(self, exc: OSError) -> None:
        with self._lock:
            self.stats_counters.disk_write_errors += 1
            first = not self._warned_disk_full
            self._warned_disk_full = True
        if first:
            log.warning("%s; serving from the remote without caching on disk until space frees up", exc)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on a closed Cache")


def _spans(offset: int, size: int, object_size: int, block_size: int) -> dict[int, tuple[int, int]]:
    """For each block a read touches: the ``[lo, hi)`` range it needs inside that block."""
    end = min(offset + size, object_size)
    spans = {}
    for index in range(offset // block_size, -(-end // block_size)):
        base = index * block_size
        spans[index] = (max(offset, base) - base, min(end, base + block_size) - base)
    return spans


def _slice(block: bytes, lo: int, hi: int) -> bytes | memoryview:
    """``block[lo:hi]`` without a copy (the whole block itself where it is all wanted)."""
    return block if lo == 0 and hi == len(block) else memoryview(block)[lo:hi]


#: ``out`` of a read that returns its pieces unjoined (``Cache.read_pieces``).
PIECES = object()


def _join(blocks: dict[int, bytes | memoryview], out=None) -> bytes | int | list[bytes | memoryview]:
    """One ``bytes`` from the pieces in block order, or, with ``out``, the pieces
    copied into it and their total length, or with ``out`` ``PIECES`` the
    pieces themselves; each byte is copied at most once."""
    pieces = [blocks[index] for index in sorted(blocks)]
    if out is PIECES:
        return pieces
    if out is not None:
        position = 0
        for piece in pieces:
            out[position:position + len(piece)] = piece
            position += len(piece)
        return position
    if len(pieces) == 1 and isinstance(pieces[0], bytes):
        return pieces[0]
    return b"".join(pieces)


def _lock_directory(directory: Path):
    """Hold an exclusive lock on the cache directory for this process's lifetime."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / "lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise CacheDirInUse(f"cache directory {directory} is in use by another process (pid {owner})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
