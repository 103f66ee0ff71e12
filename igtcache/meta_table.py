"""The cache's object metadata, indexed by directory so a directory's entries can be revalidated together."""

from __future__ import annotations

from typing import Iterable, Iterator

from igtcache.remote import ObjectInfo


def parent(path: str) -> str:
    """The directory of a normalized path (``""`` at the root)."""
    return path.rpartition("/")[0]


class MetaTable:
    """``path -> ObjectInfo``, with the paths of each directory at hand. Not thread-safe."""

    def __init__(self) -> None:
        self._infos: dict[str, ObjectInfo] = {}
        self._dirs: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._infos)

    def get(self, path: str) -> ObjectInfo | None:
        return self._infos.get(path)

    def put(self, info: ObjectInfo) -> None:
        self._infos[info.path] = info
        self._dirs.setdefault(parent(info.path), set()).add(info.path)

    def update(self, infos: Iterable[ObjectInfo]) -> None:
        for info in infos:
            self.put(info)

    def pop(self, path: str) -> None:
        if self._infos.pop(path, None) is not None:
            siblings = self._dirs[parent(path)]
            siblings.discard(path)
            if not siblings:
                del self._dirs[parent(path)]

    def fetched_before(self, directory: str, when: float) -> Iterator[ObjectInfo]:
        """The entries of ``directory`` last validated before ``when``."""
        for path in self._dirs.get(directory, ()):
            info = self._infos[path]
            if info.fetched_at < when:
                yield info
