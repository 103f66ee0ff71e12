"""Applies a policy to block accesses, under the read driver
(``igtcache.read_driver``) that the live cache and the trace replay share.

The caller supplies bytes and clocks; this module only decides. It is not
thread-safe: the engine calls it under its own lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from igtcache.policies import Access, BlockKey, Policy
from igtcache.stream_tree import AccessStreamTree


@dataclass
class Plan:
    """What a read needs: which of its blocks are resident, which to fetch."""

    access: Access
    resident: list[BlockKey] = field(default_factory=list)
    missing: list[BlockKey] = field(default_factory=list)


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
