"""S3-FIFO (Yang et al., SOSP'23): three static FIFO queues, measured in bytes.

New blocks enter a small FIFO S (10% of capacity). Leaving S, a block used
at least twice while there moves to the main FIFO M; any other goes to the
ghost FIFO G, which remembers keys only (bounded by M's 90% of capacity in
bytes). A miss on a ghost key goes straight to M. M is a 2-bit CLOCK: a block
at its tail with a nonzero count is reinserted with the count decremented.
Counts are capped at 3 and reset when a block moves from S to M. We evict
from S while M is within its share, as libCacheSim's reference does.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from .base import Insertion, Policy

SMALL_SHARE = 0.1
MAX_FREQ = 3
PROMOTE_AT = 2  # uses in S needed to move to M (the paper's "freq > 1")


class S3FIFO(Policy):
    """S3-FIFO over blocks of any size, ``capacity`` bytes resident at most."""

    name = "s3fifo"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._main_target = capacity - int(capacity * SMALL_SHARE)
        # key -> size, oldest first (OrderedDict: a plain dict slows down when
        # popped from the front).
        self._small: OrderedDict[Hashable, int] = OrderedDict()
        self._main: OrderedDict[Hashable, int] = OrderedDict()
        self._ghost: OrderedDict[Hashable, int] = OrderedDict()
        self._main_bytes = self._ghost_bytes = 0
        self._freq: dict[Hashable, int] = {}

    def _arriving(self, key: Hashable, size: int, prefetched: bool) -> Insertion:
        """A ghost goes to M (``origin`` True), anything else to S."""
        ghost_size = self._ghost.pop(key, None)
        if ghost_size is not None:
            self._ghost_bytes -= ghost_size
        return Insertion(key, size, prefetched, origin=ghost_size is not None)

    def touch(self, key: Hashable) -> None:
        freq = self._freq.get(key)
        if freq is not None and freq < MAX_FREQ:
            self._freq[key] = freq + 1

    def _victim(self, incoming: Insertion) -> Hashable:
        while True:
            if self._small and self._main_bytes <= self._main_target:
                key = next(iter(self._small))
                if self._freq[key] < PROMOTE_AT:
                    self._remember(key, self._small[key])
                    return key
                size = self._small.pop(key)
                self._main[key] = size
                self._main_bytes += size
                self._freq[key] = 0
            else:
                key = next(iter(self._main))
                if self._freq[key] == 0:
                    return key
                self._freq[key] -= 1
                self._main.move_to_end(key)

    def _on_insert(self, incoming: Insertion) -> None:
        key, size = incoming.key, incoming.size
        self._freq[key] = 0
        if incoming.origin:
            self._main[key] = size
            self._main_bytes += size
        else:
            self._small[key] = size

    def _on_remove(self, key: Hashable) -> None:
        del self._freq[key]
        if key in self._small:
            del self._small[key]
        else:
            self._main_bytes -= self._main.pop(key)

    def _remember(self, key: Hashable, size: int) -> None:
        self._ghost[key] = size
        self._ghost_bytes += size
        while self._ghost_bytes > self._main_target:
            self._ghost_bytes -= self._ghost.popitem(last=False)[1]
