"""The read driver: plan -> demand fetch -> readahead -> admit on arrival -> accounting.

One sequence for the live engine (``igtcache.Cache``) and the trace replay
(``igtcache.bench.replay``), so the replay measures what the live cache does.
The caller owns the bytes, the locks, the clock and the fetch backend (the
real remote, or the replay's simulated link); the driver owns the decisions
and the counts:

1. :meth:`ReadDriver.plan` records a read in the access-stream tree, tells the
   policy, and splits the read's blocks into *resident* (served from the
   tiers), *waiting* (already in flight: the read joins that fetch) and
   *demand* fetches; the policy's readahead is issued in the same call,
   at the read's time, after the demand fetches.
2. The caller starts every :class:`Fetch` of the plan. When a block's bytes
   arrive, :meth:`arrived` offers it to the policy (admission happens on
   arrival, never at issue) and returns the victims; :meth:`failed` forgets a
   fetch that brought nothing.
3. :meth:`finish` counts the read: a hit when every block was resident at
   plan time; its hit bytes are the requested bytes in those blocks.

Hits that clients served themselves reach :meth:`ReadDriver.record_hits` in
batches: the tree, the policy and the counts see them as they see planned
hits, grouped per batch, and the policy's readahead is issued after each
reader's last read.

Prefetch accounting: a prefetched block read while resident is *used*; one a
read needed while it was still in flight is *late* (and used); one evicted or
declined before any read is *wasted*. Remote bytes and prefetch figures are
charged to the job whose read caused the fetch.

Invariant: a block is never both resident (in the policy) and in flight.
Not thread-safe: the engine calls it under its own lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from igtcache.policies import Access, BlockKey, Policy
from igtcache.residency import AccessBatch, Residency, block_length
from igtcache.stats import JobCounters
from igtcache.stream_tree import AccessStreamTree, Groups

#: The hint of a warm-up's reads (``igtcache warm``): their blocks are cached only into free room.
WARM = "warm"


@dataclass(frozen=True)
class Fetch:
    """One block to fetch from the backend; ``length`` is its size in bytes."""

    key: BlockKey
    length: int
    prefetched: bool
    job: str


@dataclass
class ReadPlan:
    """What one read needs, as decided when it was planned."""

    access: Access
    resident: list[BlockKey] = field(default_factory=list)
    waiting: list[BlockKey] = field(default_factory=list)
    fetches: list[Fetch] = field(default_factory=list)

    @property
    def demand(self) -> list[BlockKey]:
        """Blocks the read itself must wait for: in flight already, or fetched for it."""
        return self.waiting + [f.key for f in self.fetches if not f.prefetched]


@dataclass
class _InFlight:
    job: str
    length: int
    prefetched: bool
    read: bool = False  # a read has needed it (a late prefetch is used, not wasted)
    warm: bool = False  # fetched for a warm-up: cached only into free room


class ReadDriver:
    """Drives a :class:`Policy` through reads, fetches and arrivals, and counts the outcome.

    ``counters`` (a :class:`JobCounters`) receives the read, remote and
    prefetch figures overall and per job.
    """

    def __init__(self, policy: Policy, block_size: int, counters: JobCounters | None = None,
                 streams: AccessStreamTree | None = None) -> None:
        self.residency = Residency(policy, block_size, streams)
        self.policy = policy
        self.block_size = block_size
        self.counters = counters if counters is not None else JobCounters()
        self.inflight: dict[BlockKey, _InFlight] = {}
        self.unread: dict[BlockKey, tuple[str, int]] = {}  # prefetched, resident, not yet read: (job, bytes)

    @property
    def streams(self) -> AccessStreamTree:
        return self.residency.streams

    def plan(self, *, ts: float, job: str, path: str, version: str, offset: int, size: int,
             object_size: int, hint: str | None = None, readahead: bool = True) -> ReadPlan:
        """Plan one read (``size`` already clipped to the object) and issue its fetches."""
        placed = self.residency.plan(ts=ts, job=job, path=path, version=version, offset=offset,
                                     size=size, object_size=object_size, hint=hint)
        plan = ReadPlan(placed.access, placed.resident)
        for key in placed.resident:
            self._read_resident(key)
        for key in placed.missing:
            flight = self.inflight.get(key)
            if flight is None:
                plan.fetches.append(self._issue(key, object_size, job, prefetched=False, warm=hint == WARM))
                continue
            plan.waiting.append(key)
            if flight.prefetched and not flight.read:
                self.counters.count(flight.job, "prefetch_late")
                self.counters.count(flight.job, "prefetch_used")
            flight.read = True
        if readahead:
            plan.fetches += self.readahead(placed.access)
        return plan

    def record_hits(self, batch: AccessBatch, *, readahead: bool = True) -> list[Fetch]:
        """Account reads that a client served from the cache itself, in the order served.

        Each counts as a hit, as a planned read whose blocks were all resident
        would; a block that has left the cache since is not fetched again.
        Returns the readahead the policy wants after each reader's (object
        and job's) last read in the batch (``readahead=False``: none), for
        the caller to start.
        """
        blocks = self.residency.observe_batch(batch)
        touched = blocks.last >= blocks.first
        reads = np.bincount(batch.job[touched], minlength=len(batch.jobs)).tolist()
        nbytes = np.bincount(batch.job[touched], weights=batch.size[touched], minlength=len(batch.jobs))
        for job, n, b in zip(batch.jobs, reads, nbytes.astype(np.int64).tolist()):
            if n:
                for name, value in (("reads", n), ("hits", n), ("bytes_requested", b), ("bytes_from_cache", b)):
                    self.counters.count(job, name, value)
        if self.unread:
            for key in blocks.keys:
                self._read_resident(key)
        if not readahead:
            return []
        fetches = []
        readers = Groups(batch.obj * len(batch.jobs) + batch.job)
        for i in np.sort(readers.lasts).tolist():
            if batch.objects[batch.obj[i]].size > self.block_size:  # a one-block object has nothing ahead
                fetches += self.readahead(self.residency.batch_access(batch, blocks, i))
        return fetches

    def readahead(self, access: Access) -> list[Fetch]:
        """Issue the blocks the policy wants fetched ahead of ``access``."""
        keys = [k for k in self.residency.prefetch(access) if k not in self.inflight]
        return [self._issue(k, access.object_size, access.job, prefetched=True, warm=access.hint == WARM)
                for k in keys]

    def prefetch(self, *, job: str, path: str, version: str, object_size: int,
                 first: int, last: int) -> list[Fetch]:
        """Issue an explicit prefetch of blocks ``first..last`` (those neither resident nor in flight)."""
        keys = (BlockKey(path, version, i) for i in range(first, last + 1))
        return [self._issue(k, object_size, job, prefetched=True)
                for k in keys if k not in self.policy and k not in self.inflight]

    def fetch_again(self, key: BlockKey, object_size: int, job: str) -> list[Fetch]:
        """Issue a demand fetch of a block a planned read found lost or damaged
        (the caller has dropped it); nothing if it is resident or in flight again."""
        if key in self.policy or key in self.inflight:
            return []
        return [self._issue(key, object_size, job, prefetched=False)]

    def finish(self, plan: ReadPlan, refetched: Iterable[BlockKey] = ()) -> None:
        """Count a read. ``refetched``: resident blocks that turned out lost or damaged
        and were fetched again (the read is then a miss for them)."""
        access = plan.access
        if access.last_block < access.first_block:
            return  # touched no block: neither a hit nor a miss
        refetched = set(refetched)
        end = access.offset + access.size
        hit_bytes = 0
        for key in plan.resident:
            if key not in refetched:
                start = key.index * self.block_size
                hit_bytes += min(end, start + self.block_size) - max(access.offset, start)
        count = self.counters.count
        count(access.job, "reads")
        count(access.job, "hits", not plan.demand and not refetched)
        count(access.job, "bytes_requested", access.size)
        count(access.job, "bytes_from_cache", hit_bytes)

    def arrived(self, key: BlockKey, length: int, seconds: float, *, admit: bool = True,
                source: str = "remote") -> list[BlockKey] | None:
        """A fetched block's bytes arrived after ``seconds`` from ``source`` (``"remote"``
        or ``"cluster"``): offer it to the policy.

        Returns the keys evicted for it, or ``None`` when it is not cached
        (declined by the policy, or ``admit=False``: its object changed).
        """
        flight = self.inflight.pop(key, None)
        if flight is None:  # fetched outside the driver's account (e.g. after a drop); count nothing
            flight = _InFlight(job="", length=length, prefetched=False, read=True)
        else:
            self.counters.count(flight.job, f"{source}_bytes", length)
            self.counters.count(flight.job, f"{source}_fetches")
            if flight.prefetched:
                self.counters.count(flight.job, "prefetch_bytes", length)
        self.policy.observe_fetch(length, seconds)
        if flight.warm and self.policy.used + length > self.policy.capacity:
            admit = False  # a warm-up never evicts: what reads have shown to be worth keeping stays
        unread = flight.prefetched and not flight.read
        evicted = self.residency.admit(key, length, prefetched=unread) if admit else None
        if evicted is None:
            if unread:
                self.counters.count(flight.job, "prefetch_wasted_bytes", length)
            return None
        self._left(evicted)
        if unread:
            self.unread[key] = (flight.job, length)
        return evicted

    def failed(self, key: BlockKey) -> None:
        """A fetch brought nothing (an error, or the object changed under it)."""
        self.inflight.pop(key, None)

    def drop(self, keys: Iterable[BlockKey]) -> None:
        """Blocks left the cache outside the policy's choice (invalidated, corrupt, lost)."""
        keys = list(keys)
        for key in keys:
            self.residency.drop(key)
        self._left(keys)

    def _issue(self, key: BlockKey, object_size: int, job: str, *, prefetched: bool, warm: bool = False) -> Fetch:
        length = block_length(key.index, object_size, self.block_size)
        self.inflight[key] = _InFlight(job, length, prefetched, warm=warm)
        if prefetched:
            self.counters.count(job, "prefetch_issued")
        return Fetch(key, length, prefetched, job)

    def _read_resident(self, key: BlockKey) -> None:
        unread = self.unread.pop(key, None)
        if unread is not None:
            self.counters.count(unread[0], "prefetch_used")

    def _left(self, keys: Iterable[BlockKey]) -> None:
        for key in keys:
            unread = self.unread.pop(key, None)
            if unread is not None:
                self.counters.count(unread[0], "prefetch_wasted_bytes", unread[1])

    def violations(self) -> list[str]:
        """Disagreements between the driver's account and the policy's (empty when consistent)."""
        out = [f"{key} is both resident and in flight" for key in self.inflight if key in self.policy]
        out += [f"unread prefetch {key} is not resident" for key in self.unread if key not in self.policy]
        return out
