"""Applies a policy to block accesses, under the read driver
(``igtcache.read_driver``) that the live cache and the trace replay share.

The caller supplies bytes and clocks; this module only decides. It is not
thread-safe: the engine calls it under its own lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from igtcache.policies import Access, BlockKey, Policy
from igtcache.stream_tree import AccessStreamTree, Groups


@dataclass
class Plan:
    """What a read needs: which of its blocks are resident, which to fetch."""

    access: Access
    resident: list[BlockKey] = field(default_factory=list)
    missing: list[BlockKey] = field(default_factory=list)


class BatchObject(NamedTuple):
    """An object that reads of an :class:`AccessBatch` name."""

    path: str
    version: str
    size: int
    hint: str | None = None


@dataclass(frozen=True)
class AccessBatch:
    """Reads in the order they were served, as columns: the batch form of
    :class:`Access`, e.g. hits that clients served themselves and report.

    Read ``i`` is ``size[i]`` bytes (clipped to the object) at ``offset[i]`` of
    ``objects[obj[i]]``, by ``jobs[job[i]]`` at time ``ts[i]``.
    """

    jobs: Sequence[str]
    objects: Sequence[BatchObject]
    job: np.ndarray
    obj: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    ts: np.ndarray

    @classmethod
    def of_reads(cls, reads: Iterable[tuple[str, BatchObject, int, int, float]]) -> AccessBatch:
        """A batch from ``(job, object, offset, size, ts)`` tuples, in that order."""
        jobs: dict[str, int] = {}
        objects: dict[BatchObject, int] = {}
        rows = [(jobs.setdefault(job, len(jobs)), objects.setdefault(o, len(objects)), offset, size, ts)
                for job, o, offset, size, ts in reads]
        job, obj, offset, size, ts = zip(*rows) if rows else ((),) * 5
        return cls(list(jobs), list(objects), np.array(job, dtype=np.intp), np.array(obj, dtype=np.intp),
                   np.array(offset, dtype=np.int64), np.array(size, dtype=np.int64),
                   np.array(ts, dtype=np.float64))

    @classmethod
    def merge(cls, batches: Sequence[AccessBatch]) -> AccessBatch:
        """The reads of ``batches`` in one batch, in time order (stably).

        Observing several clients' reports merged keeps the reads of
        different jobs interleaved as they happened: the policy's clock
        counts reads, and a job whose reads came in one long run would look
        idle between its runs.
        """
        if not batches:
            return cls.of_reads(())
        jobs: dict[str, int] = {}
        objects: dict[BatchObject, int] = {}
        job = [np.array([jobs.setdefault(j, len(jobs)) for j in b.jobs], dtype=np.intp)[b.job] for b in batches]
        obj = [np.array([objects.setdefault(o, len(objects)) for o in b.objects], dtype=np.intp)[b.obj]
               for b in batches]
        ts = np.concatenate([b.ts for b in batches])
        order = np.argsort(ts, kind="stable")
        return cls(list(jobs), list(objects), np.concatenate(job)[order], np.concatenate(obj)[order],
                   np.concatenate([b.offset for b in batches])[order],
                   np.concatenate([b.size for b in batches])[order], ts[order])

    def __len__(self) -> int:
        return len(self.obj)


@dataclass(frozen=True)
class BatchBlocks:
    """The blocks the reads of an :class:`AccessBatch` touch.

    Per read: ``first``..``last`` (``(0, -1)``: none), ``end``, where the
    read stops in its object, and ``object_size``. Per (read, block) *pair*,
    in read order: ``pair_read`` and ``pair_key``, an index into ``keys``, the
    distinct blocks, whose lengths are ``length``.
    """

    block_size: int
    first: np.ndarray
    last: np.ndarray
    end: np.ndarray
    object_size: np.ndarray
    pair_read: np.ndarray
    pair_key: np.ndarray
    keys: list[BlockKey]
    length: np.ndarray

    @classmethod
    def of(cls, batch: AccessBatch, block_size: int) -> BatchBlocks:
        """The blocks of ``block_size`` bytes that ``batch`` touches."""
        sizes = np.array([o.size for o in batch.objects], dtype=np.int64)
        object_size = sizes[batch.obj]
        end = np.minimum(batch.offset + batch.size, object_size)
        touched = (batch.size > 0) & (batch.offset < end)  # as block_span: (0, -1) for none
        first = np.where(touched, batch.offset // block_size, 0)
        last = np.where(touched, (end - 1) // block_size, -1)
        count = last - first + 1
        pair_read = np.repeat(np.arange(len(batch)), count)
        index = first[pair_read] + np.arange(len(pair_read)) - np.repeat(np.cumsum(count) - count, count)
        span = int(index.max(initial=0)) + 1
        distinct = Groups(batch.obj[pair_read] * span + index)
        key_obj, key_index = distinct.ids // span, distinct.ids % span
        paths, versions = [o.path for o in batch.objects], [o.version for o in batch.objects]
        owner = key_obj.tolist()
        keys = list(map(BlockKey._make, zip([paths[o] for o in owner], [versions[o] for o in owner],
                                             key_index.tolist())))
        length = np.minimum(block_size, sizes[key_obj] - key_index * block_size)
        return cls(block_size, first, last, end, object_size, pair_read, distinct.of, keys, length)


def block_span(offset: int, size: int, object_size: int, block_size: int) -> tuple[int, int]:
    """First and last block index touched by ``[offset, offset+size)`` clipped to the object.

    An empty or out-of-range read touches nothing and returns ``(0, -1)``.
    """
    end = min(offset + size, object_size)
    if size <= 0 or offset >= end:
        return 0, -1
    return offset // block_size, (end - 1) // block_size


def block_length(index: int, object_size: int, block_size: int) -> int:
    """Bytes in block ``index`` of an object (the last block may be short)."""
    return max(0, min(block_size, object_size - index * block_size))


class Residency:
    """Applies a :class:`Policy` to reads, fetches and removals.

    Every read lands in ``streams`` (an :class:`AccessStreamTree`) before the
    policy sees it; the policy is bound to the same tree, so pattern-driven
    policies read the labels the cache reports.
    """

    def __init__(self, policy: Policy, block_size: int, streams: AccessStreamTree | None = None) -> None:
        self.policy = policy
        self.block_size = block_size
        self.streams = streams if streams is not None else AccessStreamTree(block_size=block_size)
        policy.bind_streams(self.streams)

    def plan(
        self,
        *,
        ts: float,
        job: str,
        path: str,
        version: str,
        offset: int,
        size: int,
        object_size: int,
        hint: str | None = None,
    ) -> Plan:
        """Split a read into resident and missing blocks and tell the policy."""
        self.streams.record(path, offset, size, job, ts)
        first, last = block_span(offset, size, object_size, self.block_size)
        keys = [BlockKey(path, version, i) for i in range(first, last + 1)]
        resident = [k for k in keys if k in self.policy]
        missing = [k for k in keys if k not in self.policy]
        access = Access(
            ts=ts, job=job, path=path, version=version, offset=offset, size=size,
            object_size=object_size, block_size=self.block_size,
            first_block=first, last_block=last, hit=not missing, hint=hint,
        )
        self.policy.observe(access)
        for key in resident:
            self.policy.touch(key)
        return Plan(access, resident, missing)

    def observe_batch(self, batch: AccessBatch) -> BatchBlocks:
        """Tell the tree and the policy about a batch of reads already served (hits).

        A policy with ``observe_many(batch, blocks)`` takes the batch whole;
        any other gets ``observe`` per read and ``touch`` per resident block.
        """
        blocks = BatchBlocks.of(batch, self.block_size)
        self.streams.record_many([o.path for o in batch.objects], batch.jobs, batch.obj, batch.job,
                                 batch.offset, batch.size, batch.ts)
        observe_many = getattr(self.policy, "observe_many", None)
        if observe_many is not None:
            observe_many(batch, blocks)
            return blocks
        for i in range(len(batch)):
            access = self.batch_access(batch, blocks, i)
            self.policy.observe(access)
            for index in access.blocks:
                key = BlockKey(access.path, access.version, index)
                if key in self.policy:
                    self.policy.touch(key)
        return blocks

    def batch_access(self, batch: AccessBatch, blocks: BatchBlocks, i: int) -> Access:
        """Read ``i`` of ``batch`` as an :class:`Access` (a hit)."""
        o = batch.objects[batch.obj[i]]
        return Access(
            ts=float(batch.ts[i]), job=batch.jobs[batch.job[i]], path=o.path, version=o.version,
            offset=int(batch.offset[i]), size=int(batch.size[i]), object_size=o.size,
            block_size=self.block_size, first_block=int(blocks.first[i]), last_block=int(blocks.last[i]),
            hit=True, hint=o.hint,
        )

    def admit(self, key: BlockKey, size: int, *, prefetched: bool = False) -> list[BlockKey] | None:
        """Offer a fetched block; ``None`` if declined, else the keys evicted for it."""
        if not self.policy.admit(key, size, prefetched=prefetched):
            return None
        return self.policy.insert(key, size, prefetched=prefetched)

    def prefetch(self, access: Access) -> list[BlockKey]:
        """Non-resident blocks the policy wants fetched ahead of ``access``."""
        nblocks = -(-access.object_size // self.block_size)
        keys = (BlockKey(access.path, access.version, i) for i in self.policy.prefetch(access) if 0 <= i < nblocks)
        return [k for k in keys if k not in self.policy]

    def drop(self, key: BlockKey) -> None:
        """A block left the cache outside the policy's choice (invalidated, corrupt, lost)."""
        self.policy.remove(key)
