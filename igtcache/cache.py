"""``igtcache.Cache``: the engine. Serves byte ranges of remote objects from a
bounded block cache with a memory tier and an LMDB disk tier.

Each read goes through the read driver (``igtcache.read_driver``), the code
path the trace replay runs too: it plans the read, names the demand and
readahead fetches, admits blocks when they arrive and counts the outcome.
This module supplies what the replay simulates: the remote, the tiers
(``igtcache.tiered_store``), the metadata and the threads.

Concurrency model: one lock (``_lock``) guards the driver, the policy, the
tiers' indexes and the counters and is never held across I/O. Block fetches
are single-flight (one future per block in flight, shared by every reader
that wants it). Stores are serialized by ``_store_lock`` so that the disk
tier changes in the order the policy decided; a block between that decision
and its LMDB commit is served from the store's ``pending``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import fcntl
import itertools
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable

import fsspec

from igtcache.bench.trace import TraceRow, TraceWriter
from igtcache.cluster_tier import ClusterTier
from igtcache.disk_tier import DiskFull, DiskTier
from igtcache.fetch_sources import ClusterSource, Fetched, RemoteSource
from igtcache.jobs import resolve_job
from igtcache.memory_tier import MemoryTier
from igtcache.meta_table import DEFAULT_UNPINNED, MetaTable, parent
from igtcache.policies import BlockKey, Policy, make_policy
from igtcache.quotas import Quotas
from igtcache.read_driver import Fetch, ReadDriver, ReadPlan
from igtcache.remote import ObjectInfo, Remote, VersionChanged, check_range, normalize_path
from igtcache.residency import AccessBatch, block_span
from igtcache.stats import CacheStats
from igtcache.tiered_store import PIECES, TieredStore, join, slice_block

log = logging.getLogger(__name__)

#: When this many entries of a directory are past half their TTL, one listing revalidates them all.
BATCH_REVALIDATION = 16

MiB = 1 << 20
GiB = 1 << 30
READ_MANY_THREADS = 16  # ranges of one read_many read at once


class CacheDirInUse(RuntimeError):
    """Another process holds the cache directory."""


class _ObjectChanged(Exception):
    """A fetched block's length disagrees with the object's known size."""


class InvariantViolation(AssertionError):
    """The cache's accounts disagree (:meth:`Cache.check_invariants`)."""


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
    ``cluster`` (``redis://HOST:PORT[,HOST:PORT...]``, ``rediss://`` for TLS,
    ``redis://user:password@...`` for ACL, or a ``ClusterTier``) adds a tier
    shared by every node between the node tiers and the remote: misses look
    there first, and what this node fetches from the remote is published
    there when the policy finds it worth sharing; ``cluster_prefix`` keeps
    several deployments on one Redis apart.
    ``trace_path`` records every read and explicit prefetch as a trace CSV
    (``igtcache bench replay`` reads it), so a live run can be replayed
    against other policies. ``clock`` (seconds, default ``time.monotonic``, so
    a stepped wall clock cannot stretch a TTL) times TTLs and accesses; tests
    inject their own. Metadata kept on disk is due for revalidation at its
    first use after a restart: its age cannot be told across processes.
    Memory stays bounded however many objects pass: the memory tier counts a
    per-block overhead against ``memory_bytes``, the metadata of objects with
    no cached block is kept for at most ``meta_entries`` of them (least
    recently used first out), and ``stats()`` lists at most ``stats_jobs``
    jobs (the most active; the rest summed as ``"(other)"``).
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
        clock: Callable[[], float] = time.monotonic,
        cluster: str | ClusterTier | None = None,
        cluster_prefix: str = "igtcache",
        meta_entries: int = DEFAULT_UNPINNED,
        stats_jobs: int = 1000,
        quotas: dict[str, int] | None = None,
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
        self._clock = clock
        self._lock = threading.RLock()
        self._store_lock = threading.Lock()
        self._dir_lock = None
        self.disk: DiskTier | None = None
        if cache_dir is not None:
            self._dir_lock = _lock_directory(Path(cache_dir))
            self.disk = DiskTier(cache_dir, disk_bytes, block_size=block_size, remote_id=self.remote.identity)
        capacity = disk_bytes if self.disk is not None else memory_bytes
        self.policy = make_policy(policy, capacity) if isinstance(policy, str) else policy
        if self.policy.capacity > capacity:
            raise ValueError(f"policy capacity {self.policy.capacity} exceeds the tier it governs ({capacity} bytes)")
        # Without a disk tier the policy governs memory: what the memory bound pushes out leaves the policy too.
        self.memory = MemoryTier(memory_bytes, on_evict=self._pushed_out if self.disk is None else None)
        self.store = TieredStore(self.memory, self.disk, self._lock)
        self.stats_counters = CacheStats(stats_jobs)
        self.driver = ReadDriver(self.policy, block_size, self.stats_counters)
        self.source = self._source(cluster, cluster_prefix)
        self._meta = MetaTable(meta_entries)
        self._listing: set[str] = set()  # directories being revalidated by a listing
        self._revalidator = concurrent.futures.ThreadPoolExecutor(1, "igtcache-revalidate")
        self._by_path: dict[str, set[BlockKey]] = {}
        self.quotas = Quotas(quotas or {})
        self._inflight: dict[BlockKey, concurrent.futures.Future] = {}  # the driver's fetches in flight
        self._store_pool = concurrent.futures.ThreadPoolExecutor(2, "igtcache-store")
        self._readers = concurrent.futures.ThreadPoolExecutor(READ_MANY_THREADS, "igtcache-read-many")
        self._warned_disk_full = False
        self._closed = False
        self._started = clock()
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
        job = resolve_job(job)
        for attempt in range(2):
            info = self._info(path, refresh=attempt > 0)
            length = info.size - offset if size == -1 else size
            try:
                return self._read_blocks(info, offset, max(0, length), job, hint, out)
            except (_ObjectChanged, VersionChanged):
                if attempt:
                    raise OSError(f"{path!r} on {self.remote.url} keeps changing while being read") from None
                self.invalidate(path)
        raise AssertionError("unreachable")

    def read_many(self, reads: list[tuple[str, int, int]], *, job: str | None = None) -> list[bytes]:
        """The bytes of each ``(path, offset, size)`` range, in order (as ``DaemonClient.read_many``).

        The ranges are read concurrently, so the misses of all of them are fetched at once
        (a Parquet reader's column chunks); the first failure is raised once all are done.
        """
        if len(reads) <= 1:
            return [self.read(path, offset, size, job=job) for path, offset, size in reads]
        futures = [self._readers.submit(self.read, path, offset, size, job=job) for path, offset, size in reads]
        concurrent.futures.wait(futures)
        return [future.result() for future in futures]

    def info(self, path: str) -> dict[str, Any]:
        """Size and version of an object (revalidated after ``ttl``)."""
        self._check_open()
        info = self._info(path)
        return {"name": info.path, "size": info.size, "type": "file", "version": info.version}

    def ls(self, prefix: str = "") -> list[dict[str, Any]]:
        """List a directory of the remote: ``name``, ``size``, ``type`` per entry."""
        self._check_open()
        return self.remote.ls(prefix)

    def residency(self, path: str) -> dict[str, Any]:
        """How much of ``path``'s current version each node tier holds: ``{"name", "size",
        "version", "memory", "disk"}`` (bytes; the memory tier is a subset of the disk tier's
        blocks when there is one)."""
        self._check_open()
        info = self._info(path)
        held = {"memory": 0, "disk": 0}
        with self._lock:
            keys = [k for k in self._by_path.get(info.path, ()) if k.version == info.version]
            for key in keys:
                length = min(self.block_size, info.size - key.index * self.block_size)
                if key in self.memory or key in self.store.pending:
                    held["memory"] += length
                if self.disk is not None and key in self.disk:
                    held["disk"] += length
        return {"name": info.path, "size": info.size, "version": info.version, **held}

    def invalidate(self, path: str) -> None:
        """Forget everything cached about ``path``: metadata and blocks."""
        self._check_open()
        path = normalize_path(path)
        with self._store_lock:
            with self._lock:
                self._meta.pop(path)
                keys = list(self._by_path.get(path, ()))
                self._forget_all(keys)
            self._delete_from_disk(keys)
            if self.disk is not None:
                self.disk.delete_meta(path)

    def prefetch(self, path: str, offset: int = 0, size: int = -1, *, job: str | None = None) -> int:
        """Start fetching a range in the background; returns the number of blocks started.

        Blocks already cached or in flight are not fetched again.
        """
        self._check_open()
        check_range(offset, size)
        job = resolve_job(job)
        info = self._info(path)
        size = info.size - offset if size == -1 else min(size, max(0, info.size - offset))
        first, last = block_span(offset, size, info.size, self.block_size)
        with self._lock:
            fetches = self.driver.prefetch(job=job, path=info.path, version=info.version,
                                           object_size=info.size, first=first, last=last)
            if self._trace is not None and last >= first:
                self._trace.write(TraceRow(self._clock() - self._started, job, info.path, offset, size,
                                           info.size, "prefetch", ""))
            self._register(fetches)
        self._start(fetches)
        return len(fetches)

    def record_hits(self, batch: AccessBatch) -> int:
        """Account reads that clients served from this cache's disk tier in their own process
        (``igtcache.short_circuit``), in the order served: each is a hit for the stats, the
        access stream tree and the policy. Starts the readahead the policy wants after them;
        returns the number of blocks started."""
        self._check_open()
        with self._lock:
            fetches = self.driver.record_hits(batch)
            if self._trace is not None:
                for i in range(len(batch.ts)):
                    obj = batch.objects[batch.obj[i]]
                    self._trace.write(TraceRow(float(batch.ts[i]) - self._started, batch.jobs[batch.job[i]], obj.path,
                                               int(batch.offset[i]), int(batch.size[i]), obj.size, "read", obj.hint or ""))
            self._register(fetches)
        self._start(fetches)
        return len(fetches)

    def stats(self) -> dict[str, Any]:
        """Hits, misses, ratios, remote traffic, tiers, evictions, corruptions, per job (the
        ``stats_jobs`` most active, the rest as ``"(other)"``), and the most recently active
        access streams with their patterns.

        The engine's lock is held only to copy the counters and read the tiers' sizes
        and the streams; reads go on while the rest is built.
        """
        with self._lock:
            counters = self.stats_counters.copy()
            tiers = {
                "memory": {"bytes": self.memory.bytes, "blocks": len(self.memory), "capacity": self.memory.capacity},
            }
            if self.disk is not None:
                tiers["disk"] = {"bytes": self.disk.bytes, "blocks": len(self.disk), "capacity": self.disk.capacity}
            streams = self.driver.streams.streams(limit=self.STATS_STREAMS)
            quotas = self.quotas.report()
        out = counters.as_dict()
        out["policy"] = getattr(self.policy, "name", type(self.policy).__name__)
        out["block_size"] = self.block_size
        out["tiers"] = tiers
        if quotas:
            out["quotas"] = quotas
        if isinstance(self.source, ClusterSource):
            out["cluster"] = cluster_state(self.source.cluster.stats())
        out["streams"] = streams
        return out

    def check_invariants(self) -> None:
        """Check that every account of residency agrees and every bound holds.

        The policy's blocks, its own structures (``Policy.violations``), the
        read driver's in-flight and unread-prefetch sets, the by-path index and
        the tiers must agree; ``InvariantViolation`` lists where they do not.
        Call it when the cache is quiet (after :meth:`flush`).
        """
        with self._store_lock, self._lock:
            resident = set(self.policy.keys())
            problems = list(self.policy.violations())
            problems += self.driver.violations()
            problems += self.store.violations(resident)
            indexed = {key for keys in self._by_path.values() for key in keys}
            if indexed != resident:
                problems.append(f"by-path index has {len(indexed - resident)} blocks the policy does not and "
                                f"lacks {len(resident - indexed)} it has")
            if set(self._inflight) != set(self.driver.inflight):
                problems.append("fetch futures and the driver's in-flight set disagree")
            for prefix, quota in self.quotas.report().items():
                if quota["used"] > quota["limit"]:
                    problems.append(f"quota {prefix!r} holds {quota['used']} bytes, over its {quota['limit']}")
        if problems:
            raise InvariantViolation("; ".join(problems))

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
        if self._trace_file is not None:
            with self._lock:
                self._trace_file.flush()

    def close(self) -> None:
        """Finish in-flight fetches and stores and close the disk tier intact."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._readers.shutdown(wait=True)
        self._store_pool.shutdown(wait=True)
        self._revalidator.shutdown(wait=True, cancel_futures=True)
        self.source.close()
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
        size = min(size, max(0, info.size - offset))
        with self._lock:
            ts = self._clock()
            plan = self.driver.plan(ts=ts, job=job, path=info.path, version=info.version,
                                    offset=offset, size=size, object_size=info.size, hint=hint)
            if self._trace is not None and plan.access.last_block >= plan.access.first_block:
                self._trace.write(TraceRow(ts - self._started, job, info.path, offset, size, info.size,
                                           "read", hint or ""))
            self._register(plan.fetches)
            if self.quotas:
                for key in plan.resident:
                    self.quotas.touch(key)
            waits = {key.index: self._inflight[key] for key in plan.demand}
        self._start(plan.fetches)
        for key in plan.waiting:  # readahead this read now waits for: no longer behind other readahead
            self.source.promote(key)
        return self._gather(plan, info, waits, out)

    def _gather(self, plan: ReadPlan, info: ObjectInfo, waits: dict, out) -> bytes | int:
        """Collect a planned read's bytes from the tiers and its fetches, then count it."""
        spans = _spans(plan.access.offset, plan.access.size, info.size, self.block_size)
        pieces: dict[int, bytes | memoryview] = {}
        on_disk: list[BlockKey] = []
        refetched: list[BlockKey] = []
        for key in plan.resident:
            with self._lock:
                block = self.store.from_memory(key)
            if block is not None:
                pieces[key.index] = slice_block(block, *spans[key.index])
            elif self.disk is not None:
                on_disk.append(key)
            else:
                refetched.append(key)
        for index, future in waits.items():
            pieces[index] = slice_block(future.result(), *spans[index])
        data = None
        if on_disk:
            data, corrupt, lost = self.store.join_with_disk(on_disk, pieces, spans, out, self._resident)
            self._damaged(corrupt)
            refetched += corrupt + lost
        if refetched:
            for key in refetched:
                pieces[key.index] = slice_block(self._fetch_again(key, info, plan.access.job).result(), *spans[key.index])
            data = None
        if data is None:
            data = join(pieces, out)
        with self._lock:
            self.driver.finish(plan, refetched)
        return data

    def _resident(self, key: BlockKey) -> bool:
        return key in self.policy

    def _damaged(self, corrupt: list[BlockKey]) -> None:
        """Blocks that failed their checksum: counted and dropped (fetched again by their reader)."""
        if not corrupt:
            return
        for key in corrupt:
            log.warning("block %d of %r failed its checksum; dropping it and fetching it again", key.index, key.path)
        with self._lock:
            self.stats_counters.corruptions += len(corrupt)
        self._drop_blocks(corrupt)

    def _fetch_again(self, key: BlockKey, info: ObjectInfo, job: str) -> concurrent.futures.Future:
        """Fetch a block the read planned as resident but no tier could give (lost or damaged).

        A lost block is forgotten first, unless it came back meanwhile --
        dropping a re-stored block would leave its bytes on disk outside the
        policy's account.
        """
        with self._store_lock, self._lock:
            if key in self.policy and not self.store.holds(key):
                self.stats_counters.lost_blocks += 1
                self._forget_all([key])
            future = self._inflight.get(key)
            if future is not None:
                return future
            block = self.store.from_memory(key) if key in self.policy else None
            if block is not None:
                future = concurrent.futures.Future()
                future.set_result(block)
                return future
            fetches = self.driver.fetch_again(key, info.size, job)
            self._register(fetches)
            future = self._inflight[key]
        self._start(fetches)
        return future

    def _info(self, path: str, refresh: bool = False) -> ObjectInfo:
        path = normalize_path(path)
        with self._lock:
            cached = self._meta.get(path)
        if cached and not refresh and self._clock() - cached.fetched_at < self.ttl:
            return cached
        info = None if refresh else self._shared_info(path)
        if info is None:
            info = dataclasses.replace(self.remote.info(path), fetched_at=self._clock())
            self._share_info(info)
        self._validated(info, cached)
        if cached is not None:
            self._revalidate_directory_soon(parent(path))
        return info

    def _shared_info(self, path: str) -> ObjectInfo | None:
        """Another node's stat of ``path`` from the cluster tier, if one is younger than the TTL.

        It stands for a stat of our own: every byte is still fetched pinned to
        its version, and it is never older than a stat of ours could be.
        """
        if not isinstance(self.source, ClusterSource):
            return None
        found = self.source.cluster.fetch_meta(path).result()
        if found is None:
            return None
        payload, age = found
        try:
            shared = json.loads(payload)
            info = ObjectInfo(path, int(shared["size"]), str(shared["version"]), self._clock() - age)
        except (ValueError, KeyError, TypeError):
            return None
        return info if age < self.ttl else None

    def _share_info(self, info: ObjectInfo) -> None:
        if isinstance(self.source, ClusterSource):
            payload = json.dumps({"size": info.size, "version": info.version}).encode()
            self.source.cluster.publish_meta(info.path, payload, self.ttl)

    def _validated(self, info: ObjectInfo, cached: ObjectInfo | None) -> None:
        """Keep ``info``, just read from the remote; drop ``cached``'s blocks if the object changed."""
        changed = cached is None or cached.version != info.version
        if cached is not None and changed:
            self.invalidate(info.path)
        with self._lock:
            self._meta.put(info)
        if self.disk is not None:
            # Every check is written, not just changes: clients reading the disk tier in their own
            # process (igtcache.short_circuit) trust a version only as long as this check vouches for it.
            fresh_for = self.ttl - (self._clock() - info.fetched_at)
            try:
                self.disk.save_meta(info, time.monotonic() + max(0.0, fresh_for))
            except DiskFull as exc:
                self._warn_disk_full(exc)

    def _revalidate_directory_soon(self, directory: str) -> None:
        """List ``directory`` in the background if enough of its entries are past half their TTL."""
        due_before = self._clock() - self.ttl / 2
        with self._lock:
            if self._closed or directory in self._listing:
                return
            due = itertools.islice(self._meta.fetched_before(directory, due_before), BATCH_REVALIDATION)
            if len(list(due)) < BATCH_REVALIDATION:
                return
            self._listing.add(directory)
        self._revalidator.submit(self._revalidate_directory, directory)

    def _revalidate_directory(self, directory: str) -> None:
        started = self._clock()
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

    def _register(self, fetches: list[Fetch]) -> None:
        """A future for each fetch the driver issued, for its readers to wait on (lock held)."""
        for fetch in fetches:
            self._inflight[fetch.key] = concurrent.futures.Future()

    def _start(self, fetches: list[Fetch]) -> None:
        """Start the driver's fetches on the remote (readahead yields the link to demand fetches);
        each is stored when it arrives."""
        for fetch in fetches:
            start = fetch.key.index * self.block_size
            started = time.monotonic()
            remote_future = self.source.fetch(fetch.key, start, start + fetch.length, readahead=fetch.prefetched)
            remote_future.add_done_callback(
                lambda done, fetch=fetch, started=started: self._store_pool.submit(
                    self._arrived, fetch, done, time.monotonic() - started
                )
            )

    def _arrived(self, fetch: Fetch, done: concurrent.futures.Future, seconds: float) -> None:
        key = fetch.key
        with self._lock:
            future = self._inflight[key]
        try:
            fetched: Fetched = done.result()
            if len(fetched.data) != fetch.length:
                raise _ObjectChanged(key.path)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            with self._lock:
                self.driver.failed(key)
                del self._inflight[key]
                if isinstance(exc, (_ObjectChanged, VersionChanged)):
                    self.stats_counters.version_changes += 1
                else:
                    self.stats_counters.remote_errors += 1
            future.set_exception(exc)
            return
        self._store(key, fetched, seconds, future)

    def _store(self, key: BlockKey, fetched: Fetched, seconds: float, future: concurrent.futures.Future) -> None:
        """Let the policy place an arrived block, hand it to its waiters, then write it to
        disk: readers need not wait for the disk write, since the block is in the
        store's ``pending`` until it is committed."""
        evicted = None
        placed = False
        data = fetched.data
        with self._store_lock:
            try:
                with self._lock:
                    self.stats_counters.remote_seconds += seconds
                    current = self._meta.get(key.path)
                    changed = current is not None and current.version != key.version
                    evicted = self.driver.arrived(key, len(data), seconds, admit=not changed, source=fetched.source)
                    del self._inflight[key]
                    if evicted is not None:
                        self._forget_all(evicted, left_policy=True)
                        self._index(key, len(data))
                        over = self.quotas.over(key)
                        self._forget_all(over)
                        self.stats_counters.evictions += len(evicted) + len(over)
                        evicted += [k for k in over if k != key]
                        placed = key not in over  # else its prefix is full of blocks read more recently
                        if placed:
                            self.store.place(key, data)
            finally:
                future.set_result(data)
            if placed:
                try:
                    self.store.commit(key, data, evicted)
                except DiskFull as exc:
                    self._warn_disk_full(exc)
                    self._delete_from_disk(evicted)
            elif evicted:
                self._delete_from_disk(evicted)

    def _drop_blocks(self, keys: list[BlockKey]) -> None:
        with self._store_lock:
            with self._lock:
                self._forget_all(keys)
            self._delete_from_disk(keys)

    def _delete_from_disk(self, keys: list[BlockKey]) -> None:
        """Remove blocks from the disk tier (store lock held); a failure only warns."""
        try:
            self.store.delete(keys)
        except DiskFull as exc:
            self._warn_disk_full(exc)

    def _forget_all(self, keys: list[BlockKey], *, left_policy: bool = False) -> None:
        """Drop blocks from the policy (unless they already ``left_policy``), the memory
        tier and the indexes (lock held); their disk copies are the caller's to delete."""
        if not left_policy:
            self.driver.drop(keys)
        for key in keys:
            self.store.evict(key)
            self._unindex(key)

    def _pushed_out(self, keys: list[BlockKey]) -> None:
        """Without a disk tier: blocks the memory tier's bound pushed out leave the policy
        and the indexes too, so that both keep the same blocks (lock held)."""
        self.driver.drop(keys)
        for key in keys:
            self._unindex(key)
        self.stats_counters.evictions += len(keys)

    def _index(self, key: BlockKey, size: int) -> None:
        """A block became resident: index it by path and quota; its object's metadata stays while it has blocks."""
        self.quotas.add(key, size)
        siblings = self._by_path.get(key.path)
        if siblings is None:
            siblings = self._by_path[key.path] = set()
            self._meta.pin(key.path)
        siblings.add(key)

    def _unindex(self, key: BlockKey) -> None:
        self.quotas.remove(key)
        siblings = self._by_path.get(key.path)
        if siblings is not None:
            siblings.discard(key)
            if not siblings:
                del self._by_path[key.path]
                self._meta.unpin(key.path)

    def _source(self, cluster: str | ClusterTier | None, prefix: str) -> RemoteSource | ClusterSource:
        """The fetch backend: the remote, behind the cluster tier where one is configured."""
        origin = RemoteSource(self.remote)
        if cluster is None:
            return origin
        if isinstance(cluster, str):
            cluster = ClusterTier(cluster, remote_id=self.remote.identity, block_size=self.block_size, prefix=prefix)
        elif cluster.block_size != self.block_size:
            raise ValueError(f"cluster tier block size {cluster.block_size} differs from the cache's {self.block_size}")
        return ClusterSource(cluster, origin, self._worth_sharing, wait_s=cluster.lease_ms / 1000)

    def _worth_sharing(self, key: BlockKey) -> bool:
        with self._lock:
            return self.policy.worth_sharing(key)

    def _restore_from_disk(self) -> None:
        """Re-admit the blocks the disk tier kept across a restart, oldest first, then their
        metadata, due for revalidation at first use: how long ago another process stat'ed
        an object cannot be told on this process's clock (nor trusted on the wall clock)."""
        surplus: list[BlockKey] = []
        for key, size in self.disk.entries():
            evicted = self.driver.residency.admit(key, size) or []
            surplus.extend(evicted)
            self._forget_all(evicted, left_policy=True)
            if key in self.policy:
                self._index(key, size)
                over = self.quotas.over(key)  # a quota lowered since the blocks were stored
                self._forget_all(over)
                surplus.extend(over)
        self._delete_from_disk(surplus)
        self._meta.update(self.disk.load_meta().values())

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


def cluster_state(stats: dict[str, Any]) -> dict[str, Any]:
    """The cluster tier's counters with its state: ``up`` (every circuit closed),
    ``down`` (every circuit open) or ``degraded`` (some open or probing)."""
    states = list(stats["circuit"].values())
    closed = sum(state == "closed" for state in states)
    state = "up" if closed == len(states) else "down" if all(s == "open" for s in states) else "degraded"
    return {"state": state, **stats}


def _lock_directory(directory: Path):
    """Hold an exclusive lock on the cache directory for this process's lifetime.

    The lock file is opened without following a link and truncated only once
    locked; it must be a regular file of this user with one name, else
    ``PermissionError``: a link (or hard link) planted there would otherwise
    have this process -- root, for a daemon -- write its pid into its target.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionError(f"lock file {path} is a symbolic link; refusing to follow it") from None
        raise
    handle = os.fdopen(fd, "r+")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise PermissionError(
                f"lock file {path} must be a regular file owned by uid {os.geteuid()} with one name; it is "
                f"{stat.filemode(st.st_mode)}, uid {st.st_uid}, {st.st_nlink} names. Remove it to use this directory")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise CacheDirInUse(f"cache directory {directory} is in use by another process (pid {owner}); stop it "
                            f"(kill -TERM {owner}) or give this one another cache_dir (--cache-dir)") from None
    except BaseException:
        handle.close()
        raise
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
