"""Adaptive Replacement Cache (Megiddo & Modha, FAST'03), measured in bytes.

Resident blocks live in T1 (used once since cached) or T2 (used again); the
ghost lists B1 and B2 remember keys recently evicted from each. A miss that
hits B1 means T1 was too small, so the byte target ``p`` for T1 grows; a B2
hit shrinks it. The original counts pages; here every quantity is in bytes:
``p`` moves by the incoming block's size times the usual ratio, and the ghost
lists are bounded by ``|T1| + |B1| <= c`` and ``|T1| + |T2| + |B1| + |B2| <= 2c``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from .base import Insertion, Policy


class ARC(Policy):
    """ARC over blocks of any size, ``capacity`` bytes resident at most."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.p = 0.0  # target bytes for T1
        # key -> size, least recently used first; B1/B2 hold evicted keys only.
        self._t1: OrderedDict[Hashable, int] = OrderedDict()
        self._t2: OrderedDict[Hashable, int] = OrderedDict()
        self._b1: OrderedDict[Hashable, int] = OrderedDict()
        self._b2: OrderedDict[Hashable, int] = OrderedDict()
        self._t1_bytes = self._t2_bytes = self._b1_bytes = self._b2_bytes = 0

    def _arriving(self, key: Hashable, size: int, prefetched: bool) -> Insertion:
        """Adapt ``p`` if ``key`` is a ghost; ``origin`` names its ghost list ("b1", "b2" or None)."""
        origin = None
        if key in self._b1:
            ratio = max(self._b2_bytes / self._b1_bytes, 1.0)
            self.p = min(float(self.capacity), self.p + size * ratio)
            self._b1_bytes -= self._b1.pop(key)
            origin = "b1"
        elif key in self._b2:
            ratio = max(self._b1_bytes / self._b2_bytes, 1.0)
            self.p = max(0.0, self.p - size * ratio)
            self._b2_bytes -= self._b2.pop(key)
            origin = "b2"
        return Insertion(key, size, prefetched, origin)

    def touch(self, key: Hashable) -> None:
        if key in self._t1:
            size = self._t1.pop(key)
            self._t1_bytes -= size
            self._t2[key] = size
            self._t2_bytes += size
        elif key in self._t2:
            self._t2.move_to_end(key)

    def peek_victim(self, incoming: Insertion | None = None) -> Hashable:
        """The key the next eviction for ``incoming`` would take (nothing changes)."""
        return self._choose(incoming)[0]

    def _choose(self, incoming: Insertion | None) -> tuple[Hashable, int, bool]:
        """REPLACE: the oldest of T1 while T1 exceeds its target, else of T2: ``(key, size, from T1)``."""
        b2 = incoming is not None and incoming.origin == "b2"
        t1_over = self._t1_bytes > self.p or (b2 and self._t1_bytes >= self.p)
        if self._t1 and (t1_over or not self._t2):
            return *next(iter(self._t1.items())), True
        return *next(iter(self._t2.items())), False

    def _victim(self, incoming: Insertion) -> Hashable:
        key, size, from_t1 = self._choose(incoming)  # its key moves to the matching ghost list
        if from_t1:
            self._b1[key] = size
            self._b1_bytes += size
        else:
            self._b2[key] = size
            self._b2_bytes += size
        return key

    def _on_insert(self, incoming: Insertion) -> None:
        key, size = incoming.key, incoming.size
        if incoming.origin:
            self._t2[key] = size
            self._t2_bytes += size
        else:
            self._t1[key] = size
            self._t1_bytes += size
        self._trim_ghosts()

    def _on_remove(self, key: Hashable) -> None:
        if key in self._t1:
            self._t1_bytes -= self._t1.pop(key)
        else:
            self._t2_bytes -= self._t2.pop(key)

    def _trim_ghosts(self) -> None:
        c = self.capacity
        while self._b1 and self._t1_bytes + self._b1_bytes > c:
            self._b1_bytes -= self._b1.popitem(last=False)[1]
        while self._b2 and self._t1_bytes + self._t2_bytes + self._b1_bytes + self._b2_bytes > 2 * c:
            self._b2_bytes -= self._b2.popitem(last=False)[1]
