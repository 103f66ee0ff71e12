"""First in, first out: evict the block cached longest ago, whatever its use."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from .base import Policy


class FIFO(Policy):
    """Insertion-ordered eviction over blocks of any size; hits change nothing."""

    name = "fifo"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def touch(self, key: Hashable) -> None:
        pass

    def _victim(self, incoming: Hashable) -> Hashable:
        return next(iter(self._order))

    def _on_insert(self, key: Hashable, size: int, prefetched: bool) -> None:
        self._order[key] = None

    def _on_remove(self, key: Hashable) -> None:
        del self._order[key]
