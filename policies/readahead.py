"""Readahead as a component that any eviction policy can be paired with.

:class:`ScanReadahead` follows each reader (one job's reads of one object),
and when a reader scans (contiguous reads), asks for the blocks that the
scan will need once a fetch takes as long as the remote's measured fetch
time: the window of :class:`~.igt_readahead.Readahead`, IGT's own depth rule.
:func:`with_readahead` pairs it with an eviction policy: ``lru+readahead``,
``arc+readahead``... in :func:`~igtcache.policies.make_policy`, so the
classical policies can be compared with IGT on equal terms of readahead.
"""

from __future__ import annotations

from collections import OrderedDict

from .base import Access, BlockKey, Policy
from .igt_readahead import Readahead, Reader

#: Readers followed at once (least recently read dropped first).
MAX_READERS = 4096
#: Most blocks one reader may have requested ahead.
MAX_DEPTH = 64


class ScanReadahead:
    """Blocks to read ahead of scanning readers; ``capacity`` bounds a reader's window to an
    eighth of the cache."""

    def __init__(self, capacity: int, max_depth: int = MAX_DEPTH) -> None:
        self.capacity = capacity
        self.depth = Readahead(max_depth)
        self._readers: OrderedDict[tuple[str, str], Reader] = OrderedDict()

    def observe(self, access: Access) -> None:
        """Follow the reader of ``access``."""
        key = (access.path, access.job)
        reader = self._readers.pop(key, None) or Reader()
        self._readers[key] = reader
        if len(self._readers) > MAX_READERS:
            self._readers.popitem(last=False)
        reader.advance(access.offset, access.size, access.ts)
        reader.end = access.offset + access.size

    def observe_fetch(self, seconds: float) -> None:
        self.depth.observe_fetch(seconds)

    def prefetch(self, access: Access, resident: Policy) -> list[int]:
        """Block indices of ``access.path`` to request ahead of it (none resident in ``resident``)."""
        reader = self._readers.get((access.path, access.job))
        if reader is None or reader.run < 2:
            return []
        bs = access.block_size
        cap = max(1, self.capacity // (8 * bs))
        first, depth = self.depth.window(reader.rate, bs, access.last_block - access.first_block + 1, cap)
        stop = min(access.last_block + depth, -(-access.object_size // bs) - 1)
        out = []
        for index in range(max(access.last_block + first, reader.upto + 1), stop + 1):
            reader.upto = index
            if BlockKey(access.path, access.version, index) not in resident:
                out.append(index)
        return out


def with_readahead(policy: type[Policy]) -> type[Policy]:
    """``policy`` paired with :class:`ScanReadahead`: its own eviction, scans read ahead."""

    class Paired(policy):  # type: ignore[misc, valid-type]
        name = f"{policy.name}+readahead"

        def __init__(self, capacity: int, *args, **kwargs) -> None:
            super().__init__(capacity, *args, **kwargs)
            self.readahead = ScanReadahead(capacity)

        def observe(self, access: Access) -> None:
            super().observe(access)
            self.readahead.observe(access)

        def observe_fetch(self, nbytes: int, seconds: float) -> None:
            super().observe_fetch(nbytes, seconds)
            self.readahead.observe_fetch(seconds)

        def prefetch(self, access: Access) -> list[int]:
            return sorted(set(super().prefetch(access)) | set(self.readahead.prefetch(access, self)))

    Paired.__name__ = Paired.__qualname__ = f"{policy.__name__}WithReadahead"
    return Paired
