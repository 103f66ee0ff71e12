"""Directory listings of a backend, cached for a TTL: what ``getattr`` and
``readdir`` answer from, so that a job stat-ing every file of a dataset costs
one listing per directory instead of one remote call per file."""

from __future__ import annotations

import concurrent.futures
import posixpath
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

NAME_MAX = 255  # bytes in one name, as on local file systems

@dataclass(frozen=True)
class Entry:
    """One name in a directory."""

    name: str
    is_dir: bool
    size: int
    mtime: float | None  # seconds since the epoch, where the remote says


def _mtime(entry: dict[str, Any]) -> float | None:
    value = entry.get("mtime", entry.get("LastModified"))
    if hasattr(value, "timestamp"):
        return value.timestamp()
    return float(value) if isinstance(value, (int, float)) else None


def _children(directory: str, listing: list[dict[str, Any]]) -> dict[str, Entry]:
    """Direct children of ``directory`` by name. Names no POSIX directory can
    hold (empty, ``.``, ``..``, longer than ``NAME_MAX``) are left out."""
    prefix = f"{directory}/" if directory else ""
    children = {}
    for item in listing:
        full = item["name"].rstrip("/")
        if not full.startswith(prefix):
            continue
        name = full[len(prefix):]
        if name in ("", ".", "..") or "/" in name or len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
            continue
        is_dir = item.get("type") == "directory"
        children[name] = Entry(name, is_dir, 0 if is_dir else int(item.get("size") or 0), _mtime(item))
    return children


class Listings:
    """Listings from ``ls(directory)`` kept ``ttl`` seconds, at most ``max_dirs``
    directories (least recently used dropped first). Concurrent misses on one
    directory share a single ``ls`` call."""

    def __init__(self, ls: Callable[[str], list[dict[str, Any]]], ttl: float, max_dirs: int = 4096) -> None:
        self._ls = ls
        self.ttl = ttl
        self.max_dirs = max_dirs
        self._lock = threading.Lock()
        self._cached: OrderedDict[str, tuple[float, dict[str, Entry]]] = OrderedDict()
        self._inflight: dict[str, concurrent.futures.Future] = {}

    def children(self, directory: str) -> dict[str, Entry]:
        """Name -> ``Entry`` for ``directory`` ("" is the root). Errors of ``ls``
        (``FileNotFoundError``, remote failures) propagate."""
        with self._lock:
            cached = self._cached.get(directory)
            if cached is not None and time.monotonic() - cached[0] < self.ttl:
                self._cached.move_to_end(directory)
                return cached[1]
            future = self._inflight.get(directory)
            owner = future is None
            if owner:
                future = self._inflight[directory] = concurrent.futures.Future()
        if not owner:
            return future.result()
        try:
            children = _children(directory, self._ls(directory))
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._inflight[directory]
        with self._lock:
            self._cached[directory] = (time.monotonic(), children)
            self._cached.move_to_end(directory)
            while len(self._cached) > self.max_dirs:
                self._cached.popitem(last=False)
        future.set_result(children)
        return children

    def lookup(self, path: str) -> Entry | None:
        """The entry of ``path`` (not the root) from its parent's listing; None if absent."""
        parent, name = posixpath.split(path)
        return self.children(parent).get(name)

    def invalidate(self, directory: str) -> None:
        """Drop a directory's listing so the next look-up asks the backend."""
        with self._lock:
            self._cached.pop(directory, None)
