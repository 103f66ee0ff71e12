"""Belady's MIN, the offline optimum: evict the block needed farthest in the future.

It needs the future, so it only runs in trace replay: build a
:class:`FutureOracle` from the block keys in the order the replay will request
them. The policy advances the oracle in :meth:`Belady.observe`, which the
Residency driver calls for every read, so the oracle always knows which
request comes next. Fetching is on demand (every missed block is cached);
with equal-sized blocks this is optimal, with mixed sizes it is the usual
"farthest next use" heuristic.
"""

from __future__ import annotations

import heapq
import itertools
import math
from array import array
from typing import Hashable, Iterable

from .base import Access, BlockKey, Insertion, Policy


class FutureOracle:
    """Next-use positions over a known sequence of block requests."""

    def __init__(self, keys: Iterable[Hashable]) -> None:
        self._keys = list(keys)
        self._next = array("q", bytes(8 * len(self._keys)))  # next position of the same key, -1 if none
        upcoming: dict[Hashable, int] = {}
        for i in range(len(self._keys) - 1, -1, -1):
            key = self._keys[i]
            self._next[i] = upcoming.get(key, -1)
            upcoming[key] = i
        self._upcoming = upcoming  # key -> position of its next request
        self.position = 0

    def __len__(self) -> int:
        return len(self._keys)

    def advance(self, key: Hashable) -> None:
        """Consume the next request, which must be for ``key``."""
        i = self.position
        if i >= len(self._keys) or self._keys[i] != key:
            expected = self._keys[i] if i < len(self._keys) else "the end of the trace"
            raise ValueError(f"oracle out of step at request {i}: expected {expected!r}, got {key!r}")
        nxt = self._next[i]
        if nxt < 0:
            del self._upcoming[key]
        else:
            self._upcoming[key] = nxt
        self.position = i + 1

    def next_use(self, key: Hashable) -> float:
        """Position of the next request for ``key``; ``math.inf`` if never again."""
        return self._upcoming.get(key, math.inf)


class Belady(Policy):
    """Offline optimal eviction; ``oracle`` is required (replay only)."""

    name = "belady"
    needs_oracle = True

    def __init__(self, capacity: int, oracle: FutureOracle | None = None) -> None:
        if oracle is None:
            raise ValueError(
                "belady needs future knowledge: it only runs in trace replay "
                "(construct Belady(capacity, oracle=FutureOracle(keys)))"
            )
        super().__init__(capacity)
        self.oracle = oracle
        self._due: dict[Hashable, float] = {}  # resident key -> next use
        self._heap: list[tuple[float, int, Hashable]] = []  # (-next use, tiebreak, key)
        self._tiebreak = itertools.count()

    def observe(self, access: Access) -> None:
        for index in access.blocks:
            key = BlockKey(access.path, access.version, index)
            self.oracle.advance(key)
            if key in self._due:
                self._schedule(key)

    def touch(self, key: Hashable) -> None:
        pass  # observe() has already rescheduled every block of the read

    def _victim(self, incoming: Insertion) -> Hashable:
        heap = self._heap
        while True:
            neg_due, _, key = heap[0]
            if self._due.get(key) == -neg_due:
                return key
            heapq.heappop(heap)

    def _on_insert(self, incoming: Insertion) -> None:
        self._schedule(incoming.key)

    def _on_remove(self, key: Hashable) -> None:
        del self._due[key]

    def _schedule(self, key: Hashable) -> None:
        due = self.oracle.next_use(key)
        self._due[key] = due
        heapq.heappush(self._heap, (-due, next(self._tiebreak), key))
        if len(self._heap) > 2 * len(self._due) + 64:
            self._heap = [(-d, next(self._tiebreak), k) for k, d in self._due.items()]
            heapq.heapify(self._heap)
