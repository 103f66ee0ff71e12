"""The memory tier: immutable block bytes in a dict, bounded by bytes (LRU)."""

from __future__ import annotations

from typing import Hashable

from igtcache.policies import LRU


class MemoryTier:
    """Holds the hottest blocks in process memory, never more than ``capacity`` bytes."""

    def __init__(self, capacity: int) -> None:
        self._order = LRU(capacity)
        self._data: dict[Hashable, bytes] = {}

    @property
    def capacity(self) -> int:
        return self._order.capacity

    @property
    def bytes(self) -> int:
        return self._order.used

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def get(self, key: Hashable) -> bytes | None:
        data = self._data.get(key)
        if data is not None:
            self._order.touch(key)
        return data

    def put(self, key: Hashable, data: bytes) -> None:
        """Keep ``data``, dropping least recently used blocks to stay in bounds."""
        if len(data) > self.capacity:
            return
        for victim in self._order.insert(key, len(data)):
            del self._data[victim]
        self._data[key] = data

    def keys(self) -> list[Hashable]:
        return list(self._data)

    def discard(self, key: Hashable) -> None:
        if self._data.pop(key, None) is not None:
            self._order.remove(key)
