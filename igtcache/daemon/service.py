"""The operations the daemon offers, validated once for both protocols.

Every argument that arrives on the socket is checked here before it reaches a
``Cache``: the remote must be one this daemon serves, a path may not leave its
remote's root, offsets and sizes must be integers in range, no read or
prefetch may ask for more than ``max_read`` bytes, and a read's bytes count
against the daemon's ``ResponseBudget`` until its response has left.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any, Callable

from igtcache import Cache
from igtcache.daemon.budget import Grant, ResponseBudget
from igtcache.daemon.protocol import LENGTHS
from igtcache.errors import BadRequest, UnknownRemote
from igtcache.hit_report import decode_report
from igtcache.remote import normalize_path
from igtcache.remote_identity import credentials_identity

MAX_PATH = 4096
MAX_JOB = 256
MAX_HINT = 64


class Reply:
    """A read's bytes, as pieces to send in order, holding their share of the response budget
    until closed (``with reply: send(reply.pieces)``)."""

    def __init__(self, pieces: list[bytes | memoryview], grant: Grant) -> None:
        self.pieces = pieces
        self.size = sum(map(len, pieces))
        self._grant = grant
        grant.shrink(self.size)

    def close(self) -> None:
        self._grant.release()

    def __enter__(self) -> "Reply":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Service:
    """One ``Cache`` per named remote, behind checked operations.

    ``connections`` reports the connections open and the most allowed (the server counts them).
    """

    def __init__(self, caches: dict[str, Cache], max_read: int, budget: ResponseBudget,
                 connections: Callable[[], tuple[int, int]]) -> None:
        self.caches = caches
        self.max_read = max_read
        self.budget = budget
        self.connections = connections
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.hits_dropped = 0  # hits clients served but could not report (their log was full)

    # -------------------------------------------------------------- operations

    def read(self, remote: Any, path: Any, offset: Any = 0, size: Any = -1, job: Any = None,
             hint: Any = None, *, peer_job: str) -> Reply:
        """Bytes of ``path`` on ``remote``, tagged with the client's ``job`` (if it names none, the
        connected process's, ``peer_job``), as pieces to send in order (views of the cached blocks:
        ``Cache.read_pieces``). Waits for room in the response budget first (``TimeoutError``)."""
        cache = self._cache(remote)
        path, offset, size = self._range(cache, path, offset, size)
        job = _text(job, "job", MAX_JOB) or peer_job
        hint = _text(hint, "hint", MAX_HINT) or None
        return self._reply(size, lambda: cache.read_pieces(path, offset, size, job=job, hint=hint))

    def read_many(self, args: dict[str, Any], *, peer_job: str) -> Reply:
        """The bytes of several ranges (``args["reads"]``: ``[path, offset, size]`` each) in one
        reply: each range's length (u64), then every range's bytes in order. Fails as a whole
        if any range fails (the client then reads them one by one to tell which)."""
        cache = self._cache(args.get("remote"))
        reads = args.get("reads")
        if not isinstance(reads, list) or not all(isinstance(r, list) and len(r) == 3 for r in reads):
            raise BadRequest("reads must be a list of [path, offset, size]")
        job = _text(args.get("job"), "job", MAX_JOB) or peer_job
        ranges = [self._range(cache, *read) for read in reads]
        total = sum(size for *_, size in ranges)
        if total > self.max_read:
            raise BadRequest(f"a read of {total} bytes in {len(ranges)} ranges is more than this daemon's "
                             f"--max-read of {self.max_read}; read in smaller batches")

        def read() -> list[bytes]:
            pieces = cache.read_many(ranges, job=job)
            return [b"".join(LENGTHS.pack(len(p)) for p in pieces), *pieces]

        return self._reply(total, read)

    def report(self, payload: bytes | bytearray) -> int:
        """Account hits a client served itself (an ``OP_REPORT`` payload); the number of blocks
        of readahead they started."""
        report = decode_report(payload)
        cache = self._cache(report.remote)
        for obj in report.batch.objects:
            if _path(obj.path) != obj.path:
                raise BadRequest(f"report names {obj.path!r}, not a normalized path")
        with self._lock:
            self.hits_dropped += report.dropped
        return cache.record_hits(report.batch)

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
        if op == "residency":
            return cache.residency(path)
        if op == "ls":
            return cache.ls(path)
        if op == "invalidate":
            cache.invalidate(path)
            return None
        if op == "prefetch":
            return cache.prefetch(*self._range(cache, path, args.get("offset", 0), args.get("size", -1), "prefetch"))
        raise BadRequest(f"unknown operation {op!r}")

    def stats(self) -> dict[str, Any]:
        """The daemon's own counters and every remote's ``Cache.stats()``."""
        connections, max_connections = self.connections()
        with self._lock:
            daemon = {"pid": os.getpid(), "uptime_s": time.time() - self.started,
                      "connections": connections, "max_connections": max_connections,
                      "inflight_bytes": self.budget.used, "max_inflight_bytes": self.budget.limit,
                      "requests": dict(self.requests), "errors": dict(self.errors),
                      "reported_hits_dropped": self.hits_dropped}
        return {"daemon": daemon, "remotes": {name: cache.stats() for name, cache in self.caches.items()}}

    # -------------------------------------------------------------- bookkeeping

    def count(self, op: str, error: BaseException | None = None) -> None:
        with self._lock:
            self.requests[op] += 1
            if error is not None:
                self.errors[type(error).__name__] += 1

    def _range(self, cache: Cache, path: Any, offset: Any, size: Any, what: str = "read") -> tuple[str, int, int]:
        """A read's (or prefetch's) checked path, offset and size (``-1``: to the end of the object)."""
        path = _path(path)
        offset = _int(offset, "offset", 0, (1 << 63) - 1)
        return path, offset, self._size(cache, path, offset, _int(size, "size", -1, (1 << 63) - 1), what)

    def _reply(self, size: int, read: Callable[[], list[bytes | memoryview]]) -> Reply:
        """``read()``'s pieces, ``size`` bytes of the response budget held for them until the reply
        is closed; waits for that room first (``TimeoutError``)."""
        grant = self.budget.acquire(size)
        try:
            pieces = read()
        except BaseException:
            grant.release()
            raise
        return Reply(pieces, grant)

    def _size(self, cache: Cache, path: str, offset: int, size: int, what: str) -> int:
        """A request's size (``-1``: to the end of the object), refused over ``max_read``."""
        if size == -1:
            size = max(0, cache.info(path)["size"] - offset)
        if size > self.max_read:
            raise BadRequest(f"{what} of {size} bytes is more than this daemon's --max-read of {self.max_read}; "
                             f"{what} in smaller ranges")
        return size

    def _cache(self, name: Any) -> Cache:
        if isinstance(name, str) and name in self.caches:
            return self.caches[name]
        if name is None and len(self.caches) == 1:
            return next(iter(self.caches.values()))
        raise UnknownRemote(f"unknown remote {name!r}; this daemon serves {sorted(self.caches)}")


def _describe(name: str, cache: Cache) -> dict[str, Any]:
    """What a client needs to know whether this remote is the one it means: ``identity`` (protocol,
    root, endpoint) and ``credentials`` (a digest of who the daemon reads it as, no secret)."""
    protocol = cache.remote.fs.protocol
    protocols = [protocol] if isinstance(protocol, str) else list(protocol)
    return {"name": name, "url": cache.remote.url, "protocols": protocols, "root": cache.remote.root.strip("/"),
            "identity": cache.remote.identity, "credentials": credentials_identity(cache.remote.fs),
            "block_size": cache.block_size,
            "disk_tier": str(cache.disk.directory.resolve()) if cache.disk is not None else None}


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
