"""The memory tier: immutable block bytes in a dict, bounded by bytes and by blocks (LRU)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

#: What one block costs beyond its bytes, measured with tracemalloc over
#: 100,000 blocks: 105 bytes for its slot in the tier's ordered dict, 41 for
#: the ``bytes`` object's header and 112 for its key (a ``BlockKey`` and its
#: index, shared with the policy).
ENTRY_OVERHEAD = 256


class MemoryTier:
    """Holds the hottest blocks in process memory, least recently used out first.

    Two bounds: the blocks' bytes never exceed ``capacity``, and neither do
    their overheads, ``ENTRY_OVERHEAD`` a block (so at most ``capacity //
    ENTRY_OVERHEAD`` blocks): a million tiny blocks cannot take more memory than
    a few large ones, and blocks that fill ``capacity`` exactly still fit.

    ``on_evict(keys)``, if given, is called (under the caller's lock) with the
    blocks the bounds pushed out, including one too big to enter at all.
    """

    def __init__(self, capacity: int, on_evict: Callable[[list[Hashable]], None] | None = None) -> None:
        self.capacity = capacity
        self.max_blocks = capacity // ENTRY_OVERHEAD
        self._data: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._on_evict = on_evict

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def get(self, key: Hashable) -> bytes | None:
        data = self._data.get(key)
        if data is not None:
            self._data.move_to_end(key)
        return data

    def put(self, key: Hashable, data: bytes) -> None:
        """Keep ``data``, dropping least recently used blocks to stay in bounds."""
        self.discard(key)
        if len(data) > self.capacity or not self.max_blocks:
            self._evicted([key])
            return
        victims = []
        while self._bytes + len(data) > self.capacity or len(self._data) >= self.max_blocks:
            victim, block = self._data.popitem(last=False)
            self._bytes -= len(block)
            victims.append(victim)
        self._data[key] = data
        self._bytes += len(data)
        self._evicted(victims)

    def keys(self) -> list[Hashable]:
        return list(self._data)

    def discard(self, key: Hashable) -> None:
        data = self._data.pop(key, None)
        if data is not None:
            self._bytes -= len(data)

    def _evicted(self, keys: list[Hashable]) -> None:
        if keys and self._on_evict is not None:
            self._on_evict(keys)
