"""First in, first out: evict the block cached longest ago, whatever its use."""

from __future__ import annotations

from typing import Hashable

from .lru import LRU


class FIFO(LRU):
    """LRU's insertion order, left as it is: hits change nothing."""

    name = "fifo"

    def touch(self, key: Hashable) -> None:
        pass
