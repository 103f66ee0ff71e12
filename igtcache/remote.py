"""The remote side of the cache: an fsspec filesystem under a root prefix.

Adds what a cache needs on top of fsspec: one place that maps errors (missing,
denied, timed out, failing), bounded retries with backoff, an object version
for every stat, and block fetches that return futures and can be pinned to a
version (S3 ``If-Match``; elsewhere a stat before and after the read). Async
filesystems (s3fs) are driven on their own event loop (``fs.loop``);
synchronous ones (``file://``, ``memory://``) on daemon threads, each call
bounded by the per-attempt timeout. A local root (``file://``) is confined:
nothing outside it is read, whatever symbolic links the tree holds.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import functools
import logging
import os
import posixpath
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)


class RemoteError(OSError):
    """The remote failed for an object after all retries."""


class VersionChanged(OSError):
    """A fetch pinned to a version found the object at another one; never retried.

    ``found`` is ``None`` where the remote only said that the version no longer
    matches (S3 answers a failed ``If-Match`` with 412 and no ETag).
    """

    def __init__(self, path: str, expected: str, found: str | None) -> None:
        super().__init__(f"{path!r} changed: expected version {expected}, found {found or 'another (If-Match failed)'}")
        self.path = path
        self.expected = expected
        self.found = found

    def __reduce__(self):
        return type(self), (self.path, self.expected, self.found)


# Errors that retrying cannot fix.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, VersionChanged)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the cache knows of one remote object."""

    path: str
    size: int
    version: str
    fetched_at: float  # when the cache last validated it (its clock), for TTL revalidation


def modification_time(info: dict[str, Any]) -> float | None:
    """Seconds since the epoch of an fsspec info entry's last change, if it has one."""
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if hasattr(mtime, "timestamp"):
        return mtime.timestamp()
    return float(mtime) if isinstance(mtime, (int, float)) else None


def object_version(info: dict[str, Any]) -> str:
    """ETag where the remote has one, else size and modification time."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    return f"{info.get('size')}:{modification_time(info)}"


def local_version(st: os.stat_result) -> str:
    """The version of a local file: size and mtime, which a writer can set, plus the
    change time in nanoseconds and the inode, which it cannot (the kernel sets the
    ctime on every write, and a file replaced by a rename has another inode)."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def check_range(offset: int, size: int) -> None:
    """Reject what no read can mean: non-integers, a negative offset, a size below -1 ("to the end")."""
    if not isinstance(offset, int) or not isinstance(size, int):
        raise TypeError("offset and size must be integers")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if size < -1:
        raise ValueError(f"size must be >= 0 (or -1 for 'to the end'), got {size}")


def normalize_path(path: str) -> str:
    """A relative path inside the remote root; ``ValueError`` if it escapes it."""
    if not isinstance(path, str):
        raise TypeError(f"path must be str, not {type(path).__name__}")
    if "\x00" in path:
        raise ValueError(f"path {path!r} contains a NUL byte")
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"path {path!r} escapes the remote root")
    return "/".join(parts)


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 error (botocore's, or s3fs's translation of it) is a failed precondition (412)."""
    for error in (exc, exc.__cause__):
        response = getattr(error, "response", None)
        if isinstance(response, dict) and (
            response.get("Error", {}).get("Code") == "PreconditionFailed"
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412
        ):
            return True
    return False


def _check_version(path: str, expected: str, found: str) -> None:
    if found != expected:
        raise VersionChanged(path, expected, found)


# Opens a directory on the way down: only to walk through, never following a link.
_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LocalTree:
    """A local directory as a remote root that no path leaves, whatever links it holds.

    A path is opened one component at a time from the root without
    following links (``O_NOFOLLOW``). Where a component is a link, the path
    is resolved (``os.path.realpath``) and must stay under the root, else
    ``PermissionError``; its real path is then opened the same way, so links
    that stay inside keep working and a link swapped in after the check is
    refused, never followed. Only regular files are objects: a FIFO would
    block its reader, and other kinds are refused too. Listings leave out
    entries that lead outside the root and entries that are neither regular
    files nor directories.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._prefix = self.root.rstrip("/") + "/"

    def resolve(self, rel: str) -> str:
        """The real path of ``rel`` (normalized, relative to the root); ``PermissionError`` outside the root."""
        real = os.path.realpath(os.path.join(self.root, rel))
        if real != self.root and not real.startswith(self._prefix):
            raise PermissionError(f"{rel!r} leads outside the remote root {self.root} (symbolic link)")
        return real

    def info(self, rel: str) -> dict[str, Any]:
        """``name``, ``size``, ``type`` (``file``, ``directory`` or ``other``), ``mtime``, ``version``."""
        fd = self._open(rel, os.O_PATH)
        try:
            return _local_entry(rel, os.fstat(fd))
        finally:
            os.close(fd)

    def read(self, rel: str, start: int, end: int, version: str | None = None) -> bytes:
        """Bytes ``[start, end)`` of a regular file; with ``version``, stat'ed before and after the read
        on the descriptor read from, so the bytes are of that version or ``VersionChanged``."""
        fd = self._open(rel, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(f"{rel!r} is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise PermissionError(f"{rel!r} is not a regular file")
            if version is not None:
                _check_version(rel, version, local_version(st))
            chunks = []
            while start < end:
                chunk = os.pread(fd, end - start, start)
                if not chunk:
                    break
                chunks.append(chunk)
                start += len(chunk)
            if version is not None:
                _check_version(rel, version, local_version(os.fstat(fd)))
            return b"".join(chunks)
        finally:
            os.close(fd)

    def ls(self, rel: str) -> list[dict[str, Any]]:
        """A directory's regular files and directories inside the root (a file: itself)."""
        entry = self.info(rel)
        if entry["type"] != "directory":
            return [entry] if entry["type"] == "file" else []
        fd = self._open(rel, os.O_RDONLY | os.O_DIRECTORY)
        out = []
        try:
            with os.scandir(fd) as listing:
                for item in listing:
                    name = posixpath.join(rel, item.name) if rel else item.name
                    try:
                        if item.is_symlink():
                            target = os.path.realpath(os.path.join(self.root, name))
                            if target != self.root and not target.startswith(self._prefix):
                                continue
                            st = os.stat(target)
                        else:
                            st = item.stat(follow_symlinks=False)
                    except FileNotFoundError:  # gone meanwhile, or a dangling link
                        continue
                    found = _local_entry(name, st)
                    if found["type"] != "other":
                        out.append(found)
        finally:
            os.close(fd)
        return out

    def _open(self, rel: str, flags: int) -> int:
        """Open ``rel`` with ``flags``, following no link: directly where no component is
        a link, else along its real path, which must stay inside the root."""
        try:
            return self._walk(rel, flags)
        except _Link:
            pass
        real = self.resolve(rel)
        try:
            return self._walk(real[len(self._prefix):] if real != self.root else "", flags)
        except _Link:
            raise PermissionError(f"{rel!r} turned into a symbolic link while being opened") from None

    def _walk(self, rel: str, flags: int) -> int:
        """Open ``rel`` from the root one component at a time; ``_Link`` at a symbolic link."""
        parts = rel.split("/") if rel else []
        fd = os.open(self.root, _WALK if parts else flags | os.O_CLOEXEC)
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                try:
                    inner = os.open(part, flags | os.O_NOFOLLOW | os.O_CLOEXEC if last else _WALK, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                        raise _Link from None
                    raise
                os.close(fd)
                fd = inner
            if flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH | O_NOFOLLOW opens a link itself
                raise _Link
        except BaseException:
            os.close(fd)
            raise
        return fd


class _Link(Exception):
    """A symbolic link on the way down a path."""


def _local_entry(name: str, st: os.stat_result) -> dict[str, Any]:
    kind = "file" if stat.S_ISREG(st.st_mode) else "directory" if stat.S_ISDIR(st.st_mode) else "other"
    return {"name": name, "size": st.st_size if kind == "file" else 0, "type": kind, "mtime": st.st_mtime,
            "version": local_version(st)}


class _Calls:
    """Blocking calls on daemon threads, each given up at its deadline.

    ``submit`` returns a future that a thread completes with the call's
    outcome, or a watcher fails with ``TimeoutError`` once the deadline has
    passed. A call past its deadline cannot be stopped: its thread stays with
    it until it returns (a daemon thread, so it never holds up the process's
    exit). Up to ``spare`` threads beyond ``threads`` replace stuck ones; while
    ``spare`` calls are stuck, every new call fails at once.
    """

    def __init__(self, threads: int, spare: int) -> None:
        self._limit = threads + spare
        self._spare = spare
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # threads wait here for calls
        self._wake = threading.Condition(self._lock)  # the watcher waits here for the next deadline
        self._queue: collections.deque = collections.deque()  # (call, future, deadline), oldest first
        self._running: dict[concurrent.futures.Future, float] = {}  # future -> deadline, while its call runs
        self._threads = 0
        self._waiting = 0  # threads waiting for a call
        self._watcher: threading.Thread | None = None
        self._watch_until = 0.0  # when the watcher wakes next
        self._timeout = 0.0  # the latest call's
        self._closed = False
        self.stuck = 0

    def submit(self, call: Callable[[], Any], timeout: float) -> concurrent.futures.Future:
        """A future of ``call()``'s result, failed with ``TimeoutError`` if there is none within ``timeout`` s."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        deadline = time.monotonic() + timeout
        with self._lock:
            if self.stuck >= self._spare:
                future.set_exception(TimeoutError(f"{self.stuck} earlier calls are stuck past their deadline"))
                return future
            self._queue.append((call, future, deadline))
            if len(self._queue) > self._waiting and self._threads < self._limit:
                self._threads += 1
                threading.Thread(target=self._serve, name="igtcache-remote", daemon=True).start()
            else:
                self._work.notify()
            self._timeout = timeout
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="igtcache-deadlines", daemon=True)
                self._watcher.start()
            elif deadline < self._watch_until:
                self._wake.notify()
        return future

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._waiting += 1
                    self._work.wait()
                    self._waiting -= 1
                if not self._queue:
                    self._threads -= 1
                    return
                call, future, deadline = self._queue.popleft()
                self._running[future] = deadline
            try:
                result, error = call(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result, error = None, exc
            with self._lock:
                ours = self._running.pop(future, None) is not None  # else the watcher gave up on it
                if not ours:
                    self.stuck -= 1
            if ours and error is None:
                future.set_result(result)
            elif ours:
                future.set_exception(error)

    def _watch(self) -> None:
        """Fail the futures of calls, running or waiting for a thread, whose deadline has passed."""
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                late = [future for future, deadline in self._running.items() if deadline <= now]
                for future in late:
                    del self._running[future]
                self.stuck += len(late)
                while self._queue and self._queue[0][2] <= now:
                    late.append(self._queue.popleft()[1])
                if late:
                    self._lock.release()
                    try:
                        for future in late:
                            future.set_exception(TimeoutError("no answer within the deadline"))
                    finally:
                        self._lock.acquire()
                    continue
                # With nothing to watch, sleep (at least) one timeout: a call submitted meanwhile
                # is due after it, so submit() need not wake the watcher (a wake-up per call costs).
                due = list(self._running.values())
                if self._queue:
                    due.append(self._queue[0][2])
                self._watch_until = min(due, default=now + max(self._timeout, 1.0))
                self._wake.wait(self._watch_until - now)

    def close(self) -> None:
        """Let idle threads and the watcher end; busy threads end when their call returns."""
        with self._lock:
            self._closed = True
            self._work.notify_all()
            self._wake.notify()


class Remote:
    """An fsspec filesystem rooted at ``root``, with retries and clear errors.

    On a local filesystem the root is its real path (``file:///`` is ``/``)
    and no path leaves it (:class:`LocalTree`). Every attempt is given up
    after ``timeout`` seconds. On a synchronous filesystem attempts run on
    ``threads`` daemon threads; up to ``threads`` more replace threads stuck
    in calls that never return, and while that many are stuck every call
    fails at once (``TimeoutError`` after the retries' backoff).
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str = "",
        *,
        retries: int = 3,
        backoff: float = 0.1,
        timeout: float = 30.0,
        threads: int = 8,
    ) -> None:
        self.fs = fs
        self._tree = LocalTree(fs._strip_protocol(root)) if isinstance(fs, LocalFileSystem) else None
        self.root = self._tree.root if self._tree is not None else root.rstrip("/")
        self.retries = max(1, retries)
        self.backoff = backoff
        self.timeout = timeout
        self.is_async = isinstance(fs, AsyncFileSystem) and not fs.asynchronous
        self._calls = None if self.is_async else _Calls(threads, spare=threads)

    @classmethod
    def from_url(cls, url: str, storage_options: dict | None = None, **kwargs) -> "Remote":
        """Build from ``s3://bucket/prefix``, ``file:///data``, ``memory://x`` ..."""
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return cls(fs, root, **kwargs)

    @property
    def url(self) -> str:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{self.root}"

    @property
    def identity(self) -> str:
        """Which remote this is, for a disk tier to tell whose bytes it holds:
        ``protocol://root``, plus ``at <endpoint>`` where an S3 endpoint is set.
        Never holds credentials (user info and query are dropped from the endpoint)."""
        if self._tree is not None:
            return self.url
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        root = self.fs._strip_protocol(self.root).rstrip("/") if self.root else ""
        identity = f"{protocol}://{root}"
        endpoint = getattr(self.fs, "endpoint_url", None) or (getattr(self.fs, "client_kwargs", None) or {}).get("endpoint_url")
        if endpoint:
            parts = urllib.parse.urlsplit(str(endpoint))
            host = parts.netloc.rpartition("@")[2]
            identity += f" at {urllib.parse.urlunsplit((parts.scheme, host, parts.path, '', ''))}"
        return identity

    @property
    def stuck_calls(self) -> int:
        """Calls past their deadline that have not returned yet (synchronous filesystems)."""
        return self._calls.stuck if self._calls is not None else 0

    def full_path(self, path: str) -> str:
        """Where ``path`` is in the filesystem. On a local root: its real path,
        ``PermissionError`` if a link leads it outside the root."""
        rel = normalize_path(path)
        if self._tree is not None:
            return self._tree.resolve(rel)
        if not self.root:
            return rel
        return posixpath.join(self.root, rel) if rel else self.root

    def relative(self, full: str) -> str:
        full = full.rstrip("/")
        root = self.fs._strip_protocol(self.root).rstrip("/") if self.root else ""
        if root and full.startswith(root):
            full = full[len(root):]
        return full.lstrip("/")

    def info(self, path: str) -> ObjectInfo:
        """Stat one object. ``IsADirectoryError`` for a directory; on a local root
        ``PermissionError`` for what is not a regular file."""
        if self._tree is not None:
            info = self._call(path, functools.partial(self._tree.info, normalize_path(path)), None)
        else:
            full = self.full_path(path)
            self.fs.invalidate_cache(full)  # revalidation must reach the remote, not fsspec's listing cache
            info = self._call(path, lambda: self.fs.info(full), lambda: self.fs._info(full))
            info = {**info, "version": object_version(info)}
        if info.get("type") == "directory":
            raise IsADirectoryError(f"{path!r} is a directory on {self.url}")
        if self._tree is not None and info["type"] != "file":
            raise PermissionError(f"{path!r} on {self.url} is not a regular file")
        return ObjectInfo(path=normalize_path(path), size=int(info["size"]), version=info["version"],
                          fetched_at=time.monotonic())

    def ls(self, prefix: str = "") -> list[dict[str, Any]]:
        """List a directory: ``name`` (relative to the root), ``size``, ``type``, ``mtime`` (or ``None``),
        ``version`` (as :meth:`info` has it). On a local root, entries that lead outside
        it, and entries that are neither files nor directories, are left out."""
        if self._tree is not None:
            return self._call(prefix, functools.partial(self._tree.ls, normalize_path(prefix)), None)
        full = self.full_path(prefix)
        self.fs.invalidate_cache(full)
        entries = self._call(prefix, lambda: self.fs.ls(full, detail=True), lambda: self.fs._ls(full, detail=True))
        return [
            {"name": self.relative(e["name"]), "size": int(e.get("size") or 0), "type": e.get("type", "file"),
             "mtime": modification_time(e), "version": object_version(e)}
            for e in entries
        ]

    def fetch(self, path: str, start: int, end: int, version: str | None = None) -> concurrent.futures.Future:
        """Start fetching bytes ``[start, end)`` of ``path``; a future of ``bytes``.

        With ``version`` (as :meth:`info` gives it) the bytes are proven to be of
        that version or the future fails with :class:`VersionChanged`, not retried.
        """
        if self._tree is not None:
            return self._retrying(path, functools.partial(self._tree.read, normalize_path(path), start, end, version))
        full = self.full_path(path)
        if self.is_async:
            if version is None:
                make_call = functools.partial(self.fs._cat_file, full, start=start, end=end)
            elif hasattr(self.fs, "_call_s3"):
                make_call = functools.partial(self._s3_range, path, full, start, end, version)
            else:
                make_call = functools.partial(self._stat_checked_async, path, full, start, end, version)
            return asyncio.run_coroutine_threadsafe(self._retrying_async(path, make_call), self.fs.loop)
        if version is None:
            return self._retrying(path, functools.partial(self.fs.cat_file, full, start=start, end=end))
        return self._retrying(path, functools.partial(self._stat_checked, path, full, start, end, version))

    async def _s3_range(self, path: str, full: str, start: int, end: int, version: str) -> bytes:
        """One ranged GET with ``If-Match``: S3 serves the range only from that ETag."""
        if end <= start:
            return b""
        bucket, key, version_id = self.fs.split_path(full)
        try:
            response = await self.fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=f'"{version}"',
                **({"VersionId": version_id} if version_id else {}),
            )
        except OSError as exc:
            if _precondition_failed(exc):
                raise VersionChanged(path, version, None) from exc
            raise
        body = response["Body"]
        try:
            # A server that ignores If-Match still names what it served.
            found = str(response.get("ETag") or "").strip('"')
            if found and found != version:
                raise VersionChanged(path, version, found)
            return await body.read()
        finally:
            body.close()

    def _stat_checked(self, path: str, full: str, start: int, end: int, version: str) -> bytes:
        """A read between two stats that both show ``version`` (size and mtime, or an ETag)."""
        _check_version(path, version, object_version(self._fresh_info(full)))
        data = self.fs.cat_file(full, start=start, end=end)
        _check_version(path, version, object_version(self._fresh_info(full)))
        return data

    async def _stat_checked_async(self, path: str, full: str, start: int, end: int, version: str) -> bytes:
        self.fs.invalidate_cache(full)
        _check_version(path, version, object_version(await self.fs._info(full)))
        data = await self.fs._cat_file(full, start=start, end=end)
        self.fs.invalidate_cache(full)
        _check_version(path, version, object_version(await self.fs._info(full)))
        return data

    def _fresh_info(self, full: str) -> dict[str, Any]:
        self.fs.invalidate_cache(full)
        return self.fs.info(full)

    def _call(self, path: str, sync_call: Callable[[], Any], async_call: Callable[[], Any] | None) -> Any:
        """One remote call with retries, each attempt bounded by ``timeout``."""
        if self.is_async:
            return asyncio.run_coroutine_threadsafe(self._retrying_async(path, async_call), self.fs.loop).result()
        return self._retrying(path, sync_call).result()

    async def _retrying_async(self, path: str, make_call: Callable[[], Any]) -> Any:
        for attempt in range(1, self.retries + 1):
            try:
                return await asyncio.wait_for(make_call(), self.timeout)
            except Exception as exc:  # noqa: BLE001 - sorted out by _backoff
                await asyncio.sleep(self._backoff(path, exc, attempt))
        raise AssertionError("unreachable")

    def _retrying(self, path: str, call: Callable[[], Any]) -> concurrent.futures.Future:
        """A future of ``call()`` on a synchronous filesystem, retried with backoff; no thread
        waits for an attempt, and the one running it completes the future."""
        out: concurrent.futures.Future = concurrent.futures.Future()

        def attempt(number: int) -> None:
            self._calls.submit(call, self.timeout).add_done_callback(lambda done: settle(done, number))

        def settle(done: concurrent.futures.Future, number: int) -> None:
            error = done.exception()
            if error is None:
                out.set_result(done.result())
                return
            try:
                delay = self._backoff(path, error, number)
            except BaseException as final:  # noqa: BLE001 - the fetch's outcome
                out.set_exception(final)
                return
            retry = threading.Timer(delay, attempt, (number + 1,))
            retry.daemon = True
            retry.start()

        attempt(1)
        return out

    def _backoff(self, path: str, exc: Exception, attempt: int) -> float:
        """Seconds to wait before the next attempt; raises what retrying cannot fix,
        and the final error after the last attempt."""
        if isinstance(exc, _PERMANENT):
            raise exc
        if attempt == self.retries:
            raise self._final_error(path, exc) from exc
        log.debug("retrying %s after %r", path, exc)
        return self.backoff * 2 ** (attempt - 1)

    def _final_error(self, path: str, exc: BaseException) -> OSError:
        where = f"{path!r} on {self.url}"
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            detail = f" ({exc})" if str(exc) else ""
            return TimeoutError(f"{where}: remote timed out after {self.retries} attempts{detail}")
        return RemoteError(f"{where}: remote failed after {self.retries} attempts: {exc!r}")

    def close(self) -> None:
        """Let the call threads go (a stuck one when its call returns)."""
        if self._calls is not None:
            self._calls.close()
