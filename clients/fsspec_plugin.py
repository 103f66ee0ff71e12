"""The ``igtcache`` fsspec protocol: reads through the node daemon, or an embedded engine.

Chained like fsspec's own caches::

    fsspec.open("igtcache::s3://bucket/key", s3={"anon": False})
    fs = fsspec.filesystem("igtcache", target_protocol="s3", target_options={...})

Each path goes to the daemon when one answers on the socket (``socket=``,
else ``$IGTCACHE_SOCKET``, else the default) and serves a remote whose root
covers the path and that is this filesystem's own remote: the same
``Remote.identity`` (protocol, root, S3 endpoint) and the same credentials'
identity (``igtcache.remote_identity``). Every other path is read through an
engine embedded in this process (one ``Cache`` per bucket or top-level
directory, memory-only unless ``cache_dir`` is given), and the log says once,
at INFO, which remotes attach and why the others do not. Whether a daemon
answers is decided once per filesystem instance, at its first call (fsspec
caches instances by their arguments: pass ``skip_instance_cache=True`` for a
fresh look). ``mode="attach"`` refuses to run embedded, ``mode="embedded"``
never attaches.

Reads carry the job id (``job=``, else ``$IGTCACHE_JOB``, else the process
id). Writes go to the target filesystem and then drop the object's cached
blocks. The filesystem pickles by its arguments and re-opens its connections
or engines after a fork, so it works in DataLoader workers (fork or spawn).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading
import weakref
from typing import Any

import fsspec
from fsspec.implementations.chained import ChainedFileSystem
from fsspec.spec import AbstractBufferedFile
from fsspec.utils import tokenize

from igtcache import Cache, CacheDirInUse
from igtcache.daemon.config import default_socket_path
from igtcache.daemon_client import DaemonClient, DaemonUnavailable
from igtcache.remote import Remote, modification_time, object_version
from igtcache.remote_identity import credentials_identity, mismatch
from igtcache.sizes import parse_size

log = logging.getLogger(__name__)

MODES = ("auto", "attach", "embedded")
TARGET_INFOS = 4096  # target infos kept per filesystem (one per object version seen)
ROUTES = 1 << 16  # paths whose backend a filesystem remembers, for the hit path


class IgtcacheFileSystem(ChainedFileSystem):
    """An fsspec filesystem that reads ``target_protocol`` (or ``fs``) through igtcache.

    Options: ``socket`` (the daemon's), ``mode`` (``auto``/``attach``/
    ``embedded``), ``job``; for the embedded engine ``cache_dir``,
    ``memory``, ``disk``, ``block_size`` (sizes as ``"512MiB"`` or bytes),
    ``ttl``, ``policy``.
    """

    protocol = "igtcache"
    _strip_tokenize_options = ("fo",)

    def __init__(
        self,
        target_protocol: str | None = None,
        target_options: dict | None = None,
        fs: fsspec.AbstractFileSystem | None = None,
        socket: str | None = None,
        mode: str = "auto",
        job: str | None = None,
        cache_dir: str | None = None,
        memory: str | int = "512MiB",
        disk: str | int = "10GiB",
        block_size: str | int = "4MiB",
        ttl: float = 30.0,
        policy: str = "igt",
        fo: str | None = None,  # the chained URL's path, which fsspec passes along; paths come with each call
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if (fs is None) == (target_protocol is None):
            raise ValueError("give exactly one of target_protocol (with target_options) and fs")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.target_protocol = target_protocol or (fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0])
        self.target_options = _without_repeated_hop(self.target_protocol, dict(target_options or {}))
        self.socket = socket or default_socket_path()
        self.mode = mode
        self.job = job
        self._engine_options = dict(
            memory_bytes=parse_size(memory), disk_bytes=parse_size(disk), block_size=parse_size(block_size),
            ttl=ttl, policy=policy,
        )
        self._cache_dir = cache_dir
        self._given_fs = fs
        target_cls = type(fs) if fs is not None else fsspec.get_filesystem_class(self.target_protocol)
        protocols = target_cls.protocol
        self._target_protocols = {protocols} if isinstance(protocols, str) else set(protocols)
        cls = type(self)
        self._strip_protocol = lambda path: target_cls._strip_protocol(cls._strip_protocol(path))
        self._pid = os.getpid()
        self._target_fs: fsspec.AbstractFileSystem | None = fs
        self._engine_fs: fsspec.AbstractFileSystem | None = None
        self._daemon: list[tuple[str, DaemonClient]] | None = None  # (root, client), longest root first
        self._not_attached: list[str] = []  # why the daemon's remotes of this protocol are not this one
        self._engines: dict[str, Cache] = {}
        self._routes: dict[str, tuple[Any, str, str]] = {}  # paths as given -> _route's answer, in this process
        self._target_infos: dict[str, tuple[str, dict]] = {}  # path -> (cache's version, target's info), oldest first
        self._target_infos_lock = threading.Lock()
        self._inherited: list[Cache] = []  # a parent's engines: never closed in a forked child
        weakref.finalize(self, _close_engines, self._engines, self._pid)

    # ------------------------------------------------------------------ routing

    def _route(self, path: str) -> tuple[Any, str, str]:
        """``(backend, path inside it, backend root)`` for a full target path."""
        self._after_fork()
        routed = self._routes.get(path)
        if routed is None:
            routed = self._find_route(path)
            if len(self._routes) >= ROUTES:
                self._routes.clear()
            self._routes[path] = routed
        return routed

    def _find_route(self, path: str) -> tuple[Any, str, str]:
        path = self._strip_protocol(path)
        key = path.strip("/")
        for root, client in self._daemon_remotes():
            if not root or key == root or key.startswith(root + "/"):
                return client, key[len(root):].strip("/"), root
        if self.mode == "attach":
            why = "".join(f"; {reason}" for reason in self._not_attached)
            raise DaemonUnavailable(f"no remote of the igtcache daemon at {self.socket} serves "
                                    f"{self.target_protocol}://{path} (mode='attach'){why}")
        root = _top_level(path)
        return self._engine(root), path[len(root):].strip("/"), root

    def _daemon_remotes(self) -> list[tuple[str, DaemonClient]]:
        if self.mode == "embedded":
            return []
        if self._daemon is None:
            try:
                client = DaemonClient(self.socket, job=self.job)
            except DaemonUnavailable as exc:
                if self.mode == "attach":
                    raise
                log.info("%s; reading through an embedded engine", exc)
                self._daemon = []
                return self._daemon
            self._daemon = self._same_remotes(client)
        return self._daemon

    def _same_remotes(self, client: DaemonClient) -> list[tuple[str, DaemonClient]]:
        """``(root, client)`` for each of the daemon's remotes that is this filesystem's remote (same
        identity and credentials), longest root first; the others of its protocol logged once, with why."""
        target = self._target()
        credentials = credentials_identity(target)
        attached = []
        for served in client.remotes.values():
            if not self._target_protocols & set(served["protocols"]):
                continue
            identity = Remote(target, target.root_marker + served["root"]).identity
            reason = mismatch(served, identity, credentials)
            if reason is None:
                log.info("reading %s through the igtcache daemon at %s (its remote %r)",
                         identity, self.socket, served["name"])
                attached.append((served["root"], client.for_remote(served["name"])))
            else:
                self._not_attached.append(f"remote {served['name']!r}: {reason}")
                log.info("not reading %s through the igtcache daemon at %s: %s; an embedded engine reads it",
                         identity, self.socket, reason)
        return sorted(attached, key=lambda item: -len(item[0]))

    def _after_fork(self) -> None:
        """In a forked child: leave the parent's engines and target alone and build our own when needed.

        Daemon clients re-open their connections by themselves.
        """
        if self._pid == os.getpid():
            return
        self._inherited += self._engines.values()
        self._engines = {}
        self._routes = {}
        self._pid = os.getpid()
        self._target_fs = self._given_fs
        self._engine_fs = None
        self._target_infos_lock = threading.Lock()  # another thread of the parent may have held it
        weakref.finalize(self, _close_engines, self._engines, self._pid)

    def _engine(self, root: str) -> Cache:
        """The embedded engine for one bucket or top-level directory."""
        engine = self._engines.get(root)
        if engine is None:
            engine = self._engines[root] = self._new_engine(root)
        return engine

    def _new_engine(self, root: str) -> Cache:
        cache_dir = None
        if self._cache_dir is not None:
            cache_dir = os.path.join(self._cache_dir, re.sub(r"[^A-Za-z0-9._-]+", "-", root).strip("-") or "root")
        remote = self._given_fs or self._engine_target()
        try:
            return Cache(remote, root=root, cache_dir=cache_dir, **self._engine_options)
        except CacheDirInUse as exc:
            log.warning("%s; this process caches in memory only (run `igtcache serve` to share one cache)", exc)
            return Cache(remote, root=root, **self._engine_options)

    def _engine_target(self) -> fsspec.AbstractFileSystem:
        """The target filesystem for embedded engines: an instance of their own, since an engine's
        revalidation drops the target's listing cache around the object, which this filesystem's
        listings and directory checks answer from."""
        if self._engine_fs is None:
            self._engine_fs = fsspec.filesystem(self.target_protocol, **{**self.target_options, "skip_instance_cache": True})
        return self._engine_fs

    def _target(self) -> fsspec.AbstractFileSystem:
        self._after_fork()
        if self._target_fs is None:
            self._target_fs = fsspec.filesystem(self.target_protocol, **self.target_options)
        return self._target_fs

    def _job(self) -> str | None:
        return self.job or os.environ.get("IGTCACHE_JOB")

    # ------------------------------------------------------------------ reading

    def _range(self, path: str, start: int | None, end: int | None) -> tuple[Any, str, int, int]:
        """``(backend, path inside it, offset, size)`` of bytes ``[start, end)`` of ``path``;
        negative positions count from the object's end, ``end=None`` is its end (size -1)."""
        backend, rel, _root = self._route(path)
        start = start or 0
        if start < 0 or (end is not None and end < 0):
            size = backend.info(rel)["size"]
            start = max(0, size + start) if start < 0 else start
            end = max(0, size + end) if end is not None and end < 0 else end
        return backend, rel, start, -1 if end is None else max(0, end - start)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs) -> bytes:
        """Bytes ``[start, end)`` of one object; negative positions count from its end."""
        backend, rel, offset, size = self._range(path, start, end)
        return backend.read(rel, offset, size, job=self._job())

    def cat_ranges(self, paths: list[str], starts: int | list[int | None] | None, ends: int | list[int | None] | None,
                   max_gap: int | None = None, on_error: str = "return", **kwargs) -> list:
        """Bytes ``[start, end)`` of each ``(path, start, end)``, as :meth:`cat_file` gives them.

        The ranges of each backend go in one ``read_many`` (attached: one daemon round trip per
        ``--max-read`` of bytes). ``max_gap`` is accepted and ignored: ranges are served from the
        cache's blocks, so merging nearby ranges would save no fetch. With ``on_error="return"``
        a failed range's exception takes its place in the list; otherwise the first failure is raised.
        """
        if not isinstance(paths, list):
            raise TypeError(f"paths must be a list, not {type(paths).__name__}")
        starts, ends = _per_path(starts, len(paths)), _per_path(ends, len(paths))
        outcomes: list[bytes | Exception | None] = [None] * len(paths)
        groups: dict[int, tuple[Any, list[int], list[tuple[str, int, int]]]] = {}  # id(backend) -> its ranges
        for i, request in enumerate(zip(paths, starts, ends)):
            try:
                backend, *read = self._range(*request)
            except Exception as exc:  # noqa: BLE001 - handed to the caller as on_error says
                outcomes[i] = exc
                continue
            _backend, indexes, reads = groups.setdefault(id(backend), (backend, [], []))
            indexes.append(i)
            reads.append(tuple(read))
        for backend, indexes, reads in groups.values():
            for i, outcome in zip(indexes, self._read_many(backend, reads)):
                outcomes[i] = outcome
        if on_error != "return":
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    raise outcome
        return outcomes

    def _read_many(self, backend: Any, reads: list[tuple[str, int, int]]) -> list[bytes | Exception]:
        """The bytes of each read; ``read_many`` fails as a whole, so then each is read alone to
        tell which failed and with what."""
        job = self._job()
        try:
            return backend.read_many(reads, job=job)
        except Exception:  # noqa: BLE001 - each read below raises its own
            return [_read_or_error(backend, read, job) for read in reads]

    def _cached_info(self, path: str) -> dict[str, Any]:
        """``name``, ``size``, ``type`` and ``version`` as the cache serves the object (no remote
        call while its metadata is fresh); a directory is ``{"name", "size": 0, "type": "directory"}``."""
        backend, rel, _root = self._route(path)
        name = self._strip_protocol(path)
        try:
            return {**backend.info(rel), "name": name}
        except IsADirectoryError:
            return {"name": name, "size": 0, "type": "directory"}

    def info(self, path: str, **kwargs) -> dict[str, Any]:
        """The target filesystem's fields for ``path`` (``LastModified``, ``mtime``, ``ETag``...),
        with ``size`` and ``version`` of the version the cache serves.

        The target is asked once per object version this filesystem sees, not at every call.
        """
        cached = self._cached_info(path)
        if cached["type"] == "directory":
            return {**self._target().info(cached["name"]), "name": cached["name"]}
        return {**self._target_info(cached["name"], cached["version"]), **cached}

    def _target_info(self, name: str, version: str) -> dict[str, Any]:
        """The target's info of ``name``, fetched again once the cache serves another version."""
        known = self._target_infos.get(name)
        if known is not None and known[0] == version:
            return known[1]
        target = self._target()
        info = target.info(name)
        if object_version(info) != version:  # a listing cached by the target may be older than the cache's version
            target.invalidate_cache(name)
            info = target.info(name)
        with self._target_infos_lock:
            self._target_infos.pop(name, None)
            self._target_infos[name] = (version, info)
            while len(self._target_infos) > TARGET_INFOS:
                self._target_infos.pop(next(iter(self._target_infos)))
        return info

    def size(self, path: str) -> int:
        """Size in bytes of the version the cache serves."""
        return self._cached_info(path)["size"]

    def exists(self, path: str, **kwargs) -> bool:
        try:
            self._cached_info(path)
        except FileNotFoundError:
            return False
        return True

    def isfile(self, path: str) -> bool:
        try:
            return self._cached_info(path)["type"] == "file"
        except (FileNotFoundError, PermissionError):
            return False

    def isdir(self, path: str) -> bool:
        """Asked of the target, whose listing cache answers it; the cache keeps no directories."""
        return self._target().isdir(self._strip_protocol(path))

    def modified(self, path: str) -> datetime.datetime:
        """When the object's version was last modified, from the target's info (S3 ``LastModified``,
        a local file's ``mtime``), as an aware datetime in UTC."""
        return _utc(modification_time(self.info(path)), "modification time", path, self.target_protocol)

    def created(self, path: str) -> datetime.datetime:
        """When the object was created, from the target's info; where the target has no creation
        time (S3), its last modification, since such an object is written whole."""
        info = self.info(path)
        when = info.get("created")
        if hasattr(when, "timestamp"):
            when = when.timestamp()
        return _utc(when if isinstance(when, (int, float)) else modification_time(info),
                    "creation time", path, self.target_protocol)

    def ukey(self, path: str) -> str:
        """A key that changes exactly when the object's version (ETag, or size and times) does."""
        return tokenize(self._strip_protocol(path), self._cached_info(path).get("version"))

    def checksum(self, path: str) -> int:
        """:meth:`ukey` as an integer: equal checksums mean the same version, so the same bytes."""
        return int(self.ukey(path), 16)

    def ls(self, path: str, detail: bool = True, **kwargs) -> list:
        backend, rel, root = self._route(path)
        if isinstance(backend, DaemonClient):
            lead = "/" if self._strip_protocol(path).startswith("/") else ""
            entries = [{**e, "name": lead + "/".join(filter(None, [root, e["name"]]))} for e in backend.ls(rel)]
        else:
            entries = self._target().ls(self._strip_protocol(path), detail=True, **kwargs)
        return entries if detail else [e["name"] for e in entries]

    def _open(self, path: str, mode: str = "rb", block_size="default", autocommit=True, cache_options=None, **kwargs):
        path = self._strip_protocol(path)
        if "r" in mode:
            return IgtcacheFile(self, path, mode=mode, block_size=block_size, cache_options=cache_options, **kwargs)
        if "x" in mode and self._target().exists(path):
            raise FileExistsError(path)  # at open, as for a local file; the target may only refuse at close (S3)
        if block_size != "default":
            kwargs["block_size"] = block_size
        return _WriteThrough(self._target().open(path, mode, **kwargs), lambda: self.invalidate(path))

    # ------------------------------------------------------------------ writing (through to the target)

    def invalidate(self, path: str) -> None:
        """Drop the cached blocks and metadata of ``path``."""
        backend, rel, _root = self._route(path)
        backend.invalidate(rel)

    def pipe_file(self, path: str, value: bytes, **kwargs) -> None:
        self._target().pipe_file(self._strip_protocol(path), value, **kwargs)
        self.invalidate(path)

    def put_file(self, lpath: str, rpath: str, **kwargs) -> None:
        self._target().put_file(lpath, self._strip_protocol(rpath), **kwargs)
        self.invalidate(rpath)

    def cp_file(self, path1: str, path2: str, **kwargs) -> None:
        self._target().cp_file(self._strip_protocol(path1), self._strip_protocol(path2), **kwargs)
        self.invalidate(path2)

    def touch(self, path: str, truncate: bool = True, **kwargs) -> None:
        self._target().touch(self._strip_protocol(path), truncate=truncate, **kwargs)
        self.invalidate(path)

    def rm_file(self, path: str) -> None:
        self._target().rm_file(self._strip_protocol(path))
        self.invalidate(path)

    def rm(self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None) -> None:
        """Remove files (and, with ``recursive``, directories) on the target; drop what was cached of them."""
        target = self._target()
        paths = [self._strip_protocol(p) for p in ([path] if isinstance(path, str) else path)]
        removed = target.expand_path(paths, recursive=recursive, maxdepth=maxdepth)
        target.rm(paths, recursive=recursive, maxdepth=maxdepth)
        for p in removed:
            self.invalidate(p)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs) -> None:
        self._target().mkdir(self._strip_protocol(path), create_parents=create_parents, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._target().makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def rmdir(self, path: str) -> None:
        self._target().rmdir(self._strip_protocol(path))


class IgtcacheFile(AbstractBufferedFile):
    """A read-only file whose every read goes to the cache.

    No client-side buffer by default (``cache_type="none"``); any of fsspec's
    cache types and block sizes may be asked for. The backend (daemon or
    embedded engine) and the object's size are taken once, at open.
    """

    def __init__(self, fs: IgtcacheFileSystem, path: str, mode: str = "rb", cache_type: str = "none", **kwargs) -> None:
        if mode != "rb":
            raise ValueError(f"igtcache files open for reading with mode 'rb', not {mode!r}")
        self._backend, self._rel, _root = fs._route(path)
        self._job = fs._job()
        if kwargs.get("size") is None:
            kwargs["size"] = self._backend.info(self._rel)["size"]
        super().__init__(fs, path, mode=mode, cache_type=cache_type, **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self._backend.read(self._rel, start, end - start, job=self._job)

    def readinto(self, b) -> int:
        """Read into a buffer; without a client-side cache and attached to the daemon, straight
        from the socket into it."""
        if self.cache.name != "none":
            return super().readinto(b)
        if self.closed:
            raise ValueError("I/O operation on closed file")
        out = memoryview(b).cast("B")
        want = max(0, min(out.nbytes, self.size - self.loc))
        if not want:
            return 0
        if isinstance(self._backend, DaemonClient):
            n = self._backend.readinto(self._rel, self.loc, out[:want], job=self._job)
        else:
            data = self._backend.read(self._rel, self.loc, want, job=self._job)
            n = len(data)
            out[:n] = data
        self.loc += n
        return n


class _WriteThrough:
    """A target file open for writing; closing it drops the object's cached blocks."""

    def __init__(self, f, on_close) -> None:
        self._f = f
        self._on_close = on_close
        self._done = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def write(self, data) -> int:
        return self._f.write(data)

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._f.close()
        finally:
            self._on_close()

    def __enter__(self) -> "_WriteThrough":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_or_error(backend: Any, read: tuple[str, int, int], job: str | None) -> bytes | Exception:
    try:
        return backend.read(*read, job=job)
    except Exception as exc:  # noqa: BLE001 - handed to the caller in the read's place
        return exc


def _per_path(value: int | None | list[int | None], count: int) -> list[int | None]:
    """``value`` for each of ``count`` paths: a list of that length as given, or one value repeated."""
    if not isinstance(value, list):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{len(value)} starts or ends for {count} paths")
    return value


def _without_repeated_hop(protocol: str, options: dict) -> dict:
    """Target options less a hop that repeats the target. Hugging Face ``datasets`` names each file
    that a chained pattern ``igtcache::s3://b/*.parquet`` matched ``igtcache::s3://b/x.parquet::s3://b/*.parquet``,
    and fsspec hands the last hop to the target as chaining options that it cannot take."""
    if options.get("target_protocol") == protocol and "target_options" in options:
        return dict(options["target_options"])
    return options


def _utc(timestamp: float | None, what: str, path: str, protocol: str) -> datetime.datetime:
    if timestamp is None:
        raise NotImplementedError(f"{protocol} gives no {what} for {path!r}")
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)


def _top_level(path: str) -> str:
    """The bucket or top-level directory of a path, with its leading ``/`` if it has one."""
    lead = "/" if path.startswith("/") else ""
    return lead + path.lstrip("/").split("/", 1)[0]


def _close_engines(engines: dict[str, Cache], pid: int) -> None:
    if os.getpid() != pid:
        return
    for engine in engines.values():
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - closing at exit must not raise
            pass
