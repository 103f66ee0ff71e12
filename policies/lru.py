"""Least recently used: evict the block unused for the longest time."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from .base import Insertion, Policy


class LRU(Policy):
    """Classic LRU over blocks of any size."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def _victim(self, incoming: Insertion) -> Hashable:
        return next(iter(self._order))

    def _on_insert(self, incoming: Insertion) -> None:
        self._order[incoming.key] = None

    def _on_remove(self, key: Hashable) -> None:
        del self._order[key]
