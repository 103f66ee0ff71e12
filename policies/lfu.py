"""Least frequently used: evict the block used fewest times while cached.

Ties go to the least recently used. A heap of ``(uses, last use, key)`` with
lazy deletion gives O(log n) eviction; stale entries (the key was used again,
or left) are skipped when they surface and purged when they pile up.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Hashable

from .base import Insertion, Policy


class LFU(Policy):
    """In-cache LFU: a block's count starts when it is cached and ends when it leaves."""

    name = "lfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._clock = itertools.count()
        self._rank: dict[Hashable, tuple[int, int]] = {}  # key -> (uses, last use)
        self._heap: list[tuple[int, int, Hashable]] = []

    def touch(self, key: Hashable) -> None:
        if key in self._rank:
            self._push(key, self._rank[key][0] + 1)

    def _victim(self, incoming: Insertion) -> Hashable:
        heap = self._heap
        while True:
            uses, tick, key = heap[0]
            if self._rank.get(key) == (uses, tick):
                return key
            heapq.heappop(heap)

    def _on_insert(self, incoming: Insertion) -> None:
        # A prefetched block has not been used yet; a demand-fetched one has, once.
        self._push(incoming.key, 0 if incoming.prefetched else 1)

    def _on_remove(self, key: Hashable) -> None:
        del self._rank[key]

    def _push(self, key: Hashable, uses: int) -> None:
        tick = next(self._clock)
        self._rank[key] = (uses, tick)
        heapq.heappush(self._heap, (uses, tick, key))
        if len(self._heap) > 2 * len(self._rank) + 64:
            self._heap = [(u, t, k) for k, (u, t) in self._rank.items()]
            heapq.heapify(self._heap)
