"""The cache's object metadata, indexed by directory so a directory's entries can be revalidated together."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Iterator

from igtcache.remote import ObjectInfo

#: Entries kept for objects with no cached block: about 400 bytes each (the
#: ``ObjectInfo``, its path and version strings, the slots in this table's
#: dicts and directory sets; measured with tracemalloc), so ~26 MiB at most.
DEFAULT_UNPINNED = 65_536


def parent(path: str) -> str:
    """The directory of a normalized path (``""`` at the root)."""
    return path.rpartition("/")[0]


class MetaTable:
    """``path -> ObjectInfo``, with the paths of each directory at hand. Not thread-safe.

    Bounded: an object with cached blocks is *pinned* (``pin``/``unpin``) and
    its entry kept; of the others at most ``max_unpinned`` are kept, the least
    recently used dropped first. A dropped entry costs one stat when its object
    is next read, and such a read fetches from the remote anyway.
    """

    def __init__(self, max_unpinned: int = DEFAULT_UNPINNED) -> None:
        self.max_unpinned = max_unpinned
        self._infos: dict[str, ObjectInfo] = {}
        self._dirs: dict[str, set[str]] = {}
        self._pinned: set[str] = set()
        self._unpinned: OrderedDict[str, None] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._infos)

    def get(self, path: str) -> ObjectInfo | None:
        info = self._infos.get(path)
        if info is not None and path in self._unpinned:
            self._unpinned.move_to_end(path)
        return info

    def put(self, info: ObjectInfo) -> None:
        path = info.path
        self._infos[path] = info
        self._dirs.setdefault(parent(path), set()).add(path)
        if path not in self._pinned:
            self._unpinned[path] = None
            self._unpinned.move_to_end(path)
            self._trim()

    def update(self, infos: Iterable[ObjectInfo]) -> None:
        for info in infos:
            self.put(info)

    def pop(self, path: str) -> None:
        if self._infos.pop(path, None) is not None:
            self._unpinned.pop(path, None)
            siblings = self._dirs[parent(path)]
            siblings.discard(path)
            if not siblings:
                del self._dirs[parent(path)]

    def pin(self, path: str) -> None:
        """``path`` has cached blocks: keep its entry whatever the bound."""
        self._pinned.add(path)
        self._unpinned.pop(path, None)

    def unpin(self, path: str) -> None:
        """``path``'s last cached block is gone: its entry counts against the bound again."""
        self._pinned.discard(path)
        if path in self._infos:
            self._unpinned[path] = None
            self._trim()

    def fetched_before(self, directory: str, when: float) -> Iterator[ObjectInfo]:
        """The entries of ``directory`` last validated before ``when``."""
        for path in self._dirs.get(directory, ()):
            info = self._infos[path]
            if info.fetched_at < when:
                yield info

    def _trim(self) -> None:
        while len(self._unpinned) > self.max_unpinned:
            self.pop(next(iter(self._unpinned)))
