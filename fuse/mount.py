"""``CacheFS``: the POSIX view of a cache, as mfusepy ``Operations``.

The backend is anything with the ``Cache`` read API (``read``, ``info``,
``ls``, ``invalidate``, optionally ``stats``): the engine embedded in the mount
process, or a client of the node daemon. Every read goes through it tagged
with the reading process's id as the job, so the cache sees each job's
streams.

Errors reach the caller as errno values from ``igtcache.errors``' table: a
missing object is ``ENOENT``, a failing remote or an unreachable daemon
``EIO`` (after the backend's own retries, so promptly), never a hang.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import posixpath
import shutil
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Protocol

from igtcache.errors import error_row
from igtcache.fuse.lib import FuseOSError, Operations, fuse_get_context, keep_thread_state
from igtcache.fuse.listing import NAME_MAX, Entry, Listings
from igtcache.fuse.staging import StagedFile, Uploader

log = logging.getLogger(__name__)

PATH_MAX = 1024  # bytes in a whole path: S3's limit on a key
MAX_READ = 1 << 20  # the largest request libfuse's buffers take
STATS_XATTR = "user.igtcache.stats"
XATTR_SIZE_MAX = 65536  # the kernel's limit on one extended attribute value
_BLOCK = 4096  # statfs unit


class Backend(Protocol):
    """What ``CacheFS`` needs: ``igtcache.Cache`` or the daemon's client."""

    def read(self, path: str, offset: int = 0, size: int = -1, *, job: str | None = None,
             hint: str | None = None) -> bytes: ...

    def info(self, path: str) -> dict[str, Any]: ...

    def ls(self, prefix: str = "") -> list[dict[str, Any]]: ...

    def invalidate(self, path: str) -> None: ...


def errno_of(exc: BaseException) -> int:
    """The errno a file system call should fail with for a backend error."""
    if isinstance(exc, FuseOSError):
        return exc.errno
    return error_row(exc).errno


class _Warnings:
    """Log the first failure, then at most one summary every ``interval`` seconds:
    a remote that is down fails every read, and the log should not drown."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last = -interval
        self._suppressed = 0

    def warn(self, message: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        log.warning("%s%s", message, f" ({suppressed} more failures since the last warning)" if suppressed else "")


def _operation(method: Callable) -> Callable:
    """Turn every exception of an operation into the errno the caller gets."""

    @functools.wraps(method)
    def wrapper(self: "CacheFS", path, *args):
        keep_thread_state()
        try:
            return method(self, path, *args)
        except Exception as exc:  # noqa: BLE001 - each becomes an errno; an escaped one would be EINVAL
            number = errno_of(exc)
            if number == errno.EIO:
                self._warnings.warn(f"{method.__name__} {path!r}: {exc!r}")
            raise FuseOSError(number) from exc

    return wrapper


def relative(path: str, *, creating: bool = False) -> str:
    """The backend path of a mount path. ``..``, names longer than ``NAME_MAX``
    bytes, paths longer than ``PATH_MAX`` and names that are not UTF-8 (the
    kernel passes bytes; object keys are UTF-8) cannot name an object."""
    rel = path.strip("/")
    if not rel:
        return rel
    for name in rel.split("/"):
        if name in ("", ".", ".."):
            raise FuseOSError(errno.EINVAL if creating else errno.ENOENT)
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate: mfusepy's escape for a non-UTF-8 byte
            raise FuseOSError(errno.EILSEQ if creating else errno.ENOENT) from None
        if size > NAME_MAX:
            raise FuseOSError(errno.ENAMETOOLONG)
    if len(rel.encode("utf-8")) > PATH_MAX:
        raise FuseOSError(errno.ENAMETOOLONG)
    return rel


class ProcessIds:
    """Thread id -> process id. FUSE reports the calling thread; a job is its
    process. Cached briefly (thread ids are reused)."""

    def __init__(self, ttl: float = 5.0, max_entries: int = 4096) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._known: dict[int, tuple[float, str]] = {}

    def job(self, tid: int) -> str:
        now = time.monotonic()
        known = self._known.get(tid)
        if known is not None and now - known[0] < self.ttl:
            return known[1]
        pid = str(tid)
        try:
            with open(f"/proc/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        pid = line.split()[1].decode()
                        break
        except OSError:
            pass  # gone already, or another pid namespace: the thread id is the best we have
        if len(self._known) >= self.max_entries:
            self._known.clear()
        self._known[tid] = (now, pid)
        return pid


class CacheFS(Operations):
    """A read-only (or ``writable``) file system over a cache backend.

    Listings are kept ``ttl`` seconds, and the kernel keeps names and
    attributes ``ttl`` more. The kernel keeps a file's pages across opens
    while the object's version is unchanged. ``direct_io`` makes every read reach
    the backend in requests as large as the caller's (up to 1 MiB), without the
    page cache (shared ``mmap`` is then refused by the kernel). ``uploader``
    is required for ``writable``: it sends a closed file to the remote.
    """

    use_ns = True  # mfusepy: timestamps in nanoseconds

    def __init__(
        self,
        backend: Backend,
        *,
        ttl: float = 30.0,
        writable: bool = False,
        uploader: Uploader | None = None,
        staging_dir: str | None = None,
        direct_io: bool = False,
        context: Callable[[], tuple[int, int, int]] = fuse_get_context,
    ) -> None:
        if writable and uploader is None:
            raise ValueError("a writable mount needs an uploader")
        self.backend = backend
        self._readinto = getattr(backend, "readinto", None)
        self.ttl = ttl
        self.writable = writable
        self.direct_io = direct_io
        self.max_read = MAX_READ
        self.listings = Listings(backend.ls, ttl)
        self.initialized = threading.Event()  # set once the kernel has connected
        self._uploader = uploader
        self._own_staging = writable and staging_dir is None
        self._staging_dir = tempfile.mkdtemp(prefix="igtcache-staging-") if self._own_staging else staging_dir
        self._context = context
        self._pids = ProcessIds()
        self._warnings = _Warnings()
        self._mounted_at = time.time_ns()
        self._uid, self._gid = os.getuid(), os.getgid()
        self._lock = threading.Lock()
        self._versions: OrderedDict[str, str] = OrderedDict()  # last version opened, per path
        self._handles: dict[int, StagedFile] = {}
        self._writers: dict[str, StagedFile] = {}  # path -> latest file open for writing
        self._next_handle = itertools.count(1)

    # ------------------------------------------------------------------ lifecycle

    def init_with_config(self, conn, config) -> None:
        conn.max_read = self.max_read  # libfuse wants it here and as the max_read mount option
        if config is not None:
            # The kernel may keep names and attributes as long as we keep listings.
            config.entry_timeout = config.attr_timeout = config.negative_timeout = self.ttl
        self.initialized.set()

    def destroy(self, path: str) -> None:
        with self._lock:
            left = list(self._handles.values())
            self._handles.clear()
            self._writers.clear()
        for staged in left:
            try:
                self._upload(staged)
            except Exception as exc:  # noqa: BLE001 - unmounting must finish
                log.error("upload of %r at unmount failed: %r", staged.path, exc)
            staged.close()
        if self._own_staging:
            shutil.rmtree(self._staging_dir, ignore_errors=True)

    # ------------------------------------------------------------------ names and attributes

    @_operation
    def getattr(self, path: str, fh=None) -> dict[str, Any]:
        rel = relative(path)
        staged = self._writer(rel)
        if staged is not None:
            return self._attrs(Entry(posixpath.basename(rel), False, staged.size, None))
        if not rel:
            return self._attrs(Entry("", True, 0, None))
        entry = self.listings.lookup(rel)
        if entry is None:
            raise FuseOSError(errno.ENOENT)
        return self._attrs(entry)

    @_operation
    def readdir(self, path: str, fh) -> list:
        children = self.listings.children(relative(path))
        mode = {True: stat.S_IFDIR, False: stat.S_IFREG}
        return [".", ".."] + [(name, {"st_mode": mode[e.is_dir]}, 0) for name, e in children.items()]

    @_operation
    def statfs(self, path: str) -> dict[str, int]:
        """Capacity and use of the cache tier that bounds it (disk, else memory)."""
        tiers = self._stats().get("tiers", {})
        tier = tiers.get("disk") or tiers.get("memory") or {"capacity": 0, "bytes": 0}
        free = max(0, tier["capacity"] - tier["bytes"]) // _BLOCK
        return {"f_bsize": _BLOCK, "f_frsize": _BLOCK, "f_blocks": tier["capacity"] // _BLOCK,
                "f_bfree": free, "f_bavail": free, "f_namemax": NAME_MAX}

    @_operation
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        """``user.igtcache.stats`` on the mount's root: the cache's statistics as JSON."""
        if relative(path) or name != STATS_XATTR or not hasattr(self.backend, "stats"):
            raise FuseOSError(errno.ENODATA)
        stats = self._stats()
        value = json.dumps(stats).encode()
        if len(value) > XATTR_SIZE_MAX:  # the per-job table grows with the jobs; totals always fit
            value = json.dumps({k: v for k, v in stats.items() if k != "jobs"}).encode()
        return value

    @_operation
    def listxattr(self, path: str) -> list[str]:
        return [STATS_XATTR] if not relative(path) and hasattr(self.backend, "stats") else []

    # ------------------------------------------------------------------ reading

    @_operation
    def open(self, path: str, fi) -> int:
        rel = relative(path)
        if fi.flags & os.O_ACCMODE != os.O_RDONLY or fi.flags & os.O_TRUNC:
            if not self.writable:
                raise FuseOSError(errno.EROFS)
            truncate = bool(fi.flags & os.O_TRUNC)
            fi.fh = self._stage(rel, None if truncate else self._reader(rel))
            return 0
        version = self.backend.info(rel)["version"]
        with self._lock:
            fi.keep_cache = int(self._versions.get(rel) == version)
            self._versions[rel] = version
            self._versions.move_to_end(rel)
            if len(self._versions) > 65536:
                self._versions.popitem(last=False)
        fi.direct_io = int(self.direct_io)
        fi.fh = 0
        return 0

    @_operation
    def read(self, path: str, size: int, offset: int, fi) -> bytes:
        return self._read(path, size, offset, fi)

    @_operation
    def read_into(self, path: str, buffer: memoryview, offset: int, fi) -> int:
        """``read`` straight into libfuse's reply buffer (see ``igtcache.fuse.lib.FUSE``):
        one copy fewer where the backend has ``readinto``."""
        if not fi.fh and self._readinto is not None:
            return self._readinto(path[1:], offset, buffer, job=self._job())
        data = self._read(path, len(buffer), offset, fi)
        buffer[:len(data)] = data
        return len(data)

    def _read(self, path: str, size: int, offset: int, fi) -> bytes:
        if fi.fh:
            return self._handles[fi.fh].read(size, offset)
        return self.backend.read(path[1:], offset, size, job=self._job())  # the path was checked by open

    # ------------------------------------------------------------------ writing (``writable`` only)

    @_operation
    def create(self, path: str, mode: int, fi) -> int:
        rel = relative(path, creating=True)
        if not self.writable:
            raise FuseOSError(errno.EROFS)
        parent = posixpath.dirname(rel)
        if parent:
            entry = self.listings.lookup(parent)
            if entry is None or not entry.is_dir:
                raise FuseOSError(errno.ENOENT if entry is None else errno.ENOTDIR)
        fi.fh = self._stage(rel, None)
        return 0

    @_operation
    def write(self, path: str, data: bytes, offset: int, fi) -> int:
        return self._handles[fi.fh].write(data, offset)

    @_operation
    def truncate(self, path: str, length: int, fh=None) -> int:
        if fh is not None and fh.fh in self._handles:
            self._handles[fh.fh].truncate(length)
            return 0
        rel = relative(path)
        if not self.writable:
            raise FuseOSError(errno.EROFS)
        staged = StagedFile(rel, self._staging_dir, None if length == 0 else self._reader(rel))
        try:
            staged.truncate(length)
            self._upload(staged)
        finally:
            staged.close()
        return 0

    @_operation
    def flush(self, path: str, fi) -> int:
        """Every ``close()`` of a written file uploads it, so ``close`` reports a failed upload."""
        if fi.fh:
            self._upload(self._handles[fi.fh])
        return 0

    @_operation
    def fsync(self, path: str, datasync: int, fi) -> int:
        return self.flush(path, fi)

    @_operation
    def release(self, path: str, fi) -> int:
        if not fi.fh:
            return 0
        with self._lock:
            staged = self._handles.pop(fi.fh)
            if self._writers.get(staged.path) is staged:
                del self._writers[staged.path]
        try:
            self._upload(staged)  # normally done by flush already
        finally:
            staged.close()
        return 0

    # ------------------------------------------------------------------ helpers

    def _attrs(self, entry: Entry) -> dict[str, Any]:
        mtime = self._mounted_at if entry.mtime is None else int(entry.mtime * 1e9)
        write = 0o200 if self.writable else 0
        if entry.is_dir:
            mode, nlink = stat.S_IFDIR | 0o555 | write, 2
        else:
            mode, nlink = stat.S_IFREG | 0o444 | write, 1
        return {"st_mode": mode, "st_nlink": nlink, "st_size": entry.size, "st_blocks": -(-entry.size // 512),
                "st_uid": self._uid, "st_gid": self._gid,
                "st_mtime": mtime, "st_ctime": mtime, "st_atime": mtime}

    def _stats(self) -> dict[str, Any]:
        stats = getattr(self.backend, "stats", None)
        return stats() if stats is not None else {}

    def _job(self) -> str:
        """The job of the calling request: its process."""
        return self._pids.job(self._context()[2])

    def _reader(self, rel: str) -> Callable[[int, int], bytes]:
        job = self._job()
        return lambda offset, size: self.backend.read(rel, offset, size, job=job)

    def _stage(self, rel: str, initial: Callable[[int, int], bytes] | None) -> int:
        staged = StagedFile(rel, self._staging_dir, initial)
        with self._lock:
            handle = next(self._next_handle)
            self._handles[handle] = staged
            self._writers[rel] = staged
        return handle

    def _writer(self, rel: str) -> StagedFile | None:
        with self._lock:
            return self._writers.get(rel)

    def _upload(self, staged: StagedFile) -> None:
        if staged.upload(self._uploader):
            self.backend.invalidate(staged.path)
            self.listings.invalidate(posixpath.dirname(staged.path))
