"""The operations the daemon offers, validated once for both protocols.

Every argument that arrives on the socket is checked here before it reaches a
``Cache``: the remote must be one this daemon serves, a path may not leave its
remote's root, offsets and sizes must be integers in range, and no read may
return more than ``max_read`` bytes.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

from igtcache import Cache
from igtcache.errors import BadRequest, UnknownRemote
from igtcache.remote import normalize_path

MAX_PATH = 4096
MAX_JOB = 256
MAX_HINT = 64


class Service:
    """One ``Cache`` per named remote, behind checked operations."""

    def __init__(self, caches: dict[str, Cache], max_read: int) -> None:
        self.caches = caches
        self.max_read = max_read
        self.started = time.time()
        self.connections = 0
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    # -------------------------------------------------------------- operations

    def read(self, remote: Any, path: Any, offset: Any = 0, size: Any = -1, job: Any = None,
             hint: Any = None, *, peer_job: str) -> list[bytes | memoryview]:
        """Bytes of ``path`` on ``remote``, tagged with the client's ``job`` (if it names none, the
        connected process's, ``peer_job``), as pieces to send in order (views of the cached blocks:
        ``Cache.read_pieces``)."""
        cache = self._cache(remote)
        path = _path(path)
        offset = _int(offset, "offset", 0, (1 << 63) - 1)
        size = _int(size, "size", -1, (1 << 63) - 1)
        job = _text(job, "job", MAX_JOB) or peer_job
        hint = _text(hint, "hint", MAX_HINT) or None
        if size == -1:
            size = max(0, cache.info(path)["size"] - offset)
        if size > self.max_read:
            raise BadRequest(f"read of {size} bytes is more than this daemon's --max-read of {self.max_read}; "
                             "read in smaller ranges")
        return cache.read_pieces(path, offset, size, job=job, hint=hint)

    def call(self, op: str, args: dict[str, Any]) -> Any:
        """Any operation but ``read``, with JSON-able arguments and result."""
        if op == "health":
            return {"status": "ok", "pid": os.getpid(), "uptime_s": time.time() - self.started,
                    "remotes": sorted(self.caches)}
        if op == "remotes":
            return [{**_describe(name, cache), "max_read": self.max_read} for name, cache in self.caches.items()]
        if op == "stats":
            if args.get("remote") is None:
                return self.stats()
            return self._cache(args["remote"]).stats()
        cache = self._cache(args.get("remote"))
        path = _path(args.get("path", ""))
        if op == "info":
            return cache.info(path)
        if op == "ls":
            return cache.ls(path)
        if op == "invalidate":
            cache.invalidate(path)
            return None
        if op == "prefetch":
            offset = _int(args.get("offset", 0), "offset", 0, (1 << 63) - 1)
            size = _int(args.get("size", -1), "size", -1, (1 << 63) - 1)
            return cache.prefetch(path, offset, size)
        raise BadRequest(f"unknown operation {op!r}")

    def stats(self) -> dict[str, Any]:
        """The daemon's own counters and every remote's ``Cache.stats()``."""
        with self._lock:
            daemon = {"pid": os.getpid(), "uptime_s": time.time() - self.started, "connections": self.connections,
                      "requests": dict(self.requests), "errors": dict(self.errors)}
        return {"daemon": daemon, "remotes": {name: cache.stats() for name, cache in self.caches.items()}}

    # -------------------------------------------------------------- bookkeeping

    def count(self, op: str, error: BaseException | None = None) -> None:
        with self._lock:
            self.requests[op] += 1
            if error is not None:
                self.errors[type(error).__name__] += 1

    def connection(self, delta: int) -> None:
        with self._lock:
            self.connections += delta

    def _cache(self, name: Any) -> Cache:
        if isinstance(name, str) and name in self.caches:
            return self.caches[name]
        if name is None and len(self.caches) == 1:
            return next(iter(self.caches.values()))
        raise UnknownRemote(f"unknown remote {name!r}; this daemon serves {sorted(self.caches)}")


def _describe(name: str, cache: Cache) -> dict[str, Any]:
    protocol = cache.remote.fs.protocol
    protocols = [protocol] if isinstance(protocol, str) else list(protocol)
    return {"name": name, "url": cache.remote.url, "protocols": protocols, "root": cache.remote.root.strip("/"),
            "block_size": cache.block_size}


def _path(value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"path must be a string, not {type(value).__name__}")
    if len(value) > MAX_PATH:
        raise BadRequest(f"path is longer than {MAX_PATH} characters")
    return normalize_path(value)  # ValueError for a path that escapes the remote root


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, not {value!r}"[:200])
    if not lo <= value <= hi:
        raise BadRequest(f"{name} {value} is out of range [{lo}, {hi}]")
    return value


def _text(value: Any, name: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise BadRequest(f"{name} must be a string of at most {limit} characters")
    return value
