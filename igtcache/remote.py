"""The remote side of the cache: an fsspec filesystem under a root prefix.

Adds what a cache needs on top of fsspec: one place that maps errors (missing,
denied, timed out, failing), bounded retries with backoff, an object version
for every stat, and block fetches that return futures and can be pinned to a
version (S3 ``If-Match``; elsewhere a stat before and after the read). Async
filesystems (s3fs) are driven on their own event loop (``fs.loop``);
synchronous ones (``file://``, ``memory://``) on a small thread pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import posixpath
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

import fsspec
from fsspec.asyn import AsyncFileSystem

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


@dataclass(frozen=True)
class ObjectInfo:
    """What the cache knows of one remote object."""

    path: str
    size: int
    version: str
    fetched_at: float  # wall-clock time of the stat, for TTL revalidation


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


class Remote:
    """An fsspec filesystem rooted at ``root``, with retries and clear errors."""

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
        self.root = root.rstrip("/")
        self.retries = max(1, retries)
        self.backoff = backoff
        self.timeout = timeout
        self.is_async = isinstance(fs, AsyncFileSystem) and not fs.asynchronous
        self._pool = None if self.is_async else concurrent.futures.ThreadPoolExecutor(threads, "igtcache-remote")

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
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        root = self.fs._strip_protocol(self.root).rstrip("/") if self.root else ""
        identity = f"{protocol}://{root}"
        endpoint = getattr(self.fs, "endpoint_url", None) or (getattr(self.fs, "client_kwargs", None) or {}).get("endpoint_url")
        if endpoint:
            parts = urllib.parse.urlsplit(str(endpoint))
            host = parts.netloc.rpartition("@")[2]
            identity += f" at {urllib.parse.urlunsplit((parts.scheme, host, parts.path, '', ''))}"
        return identity

    def full_path(self, path: str) -> str:
        rel = normalize_path(path)
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
        """Stat one object. ``IsADirectoryError`` for a directory."""
        full = self.full_path(path)
        self.fs.invalidate_cache(full)  # revalidation must reach the remote, not fsspec's listing cache
        info = self._call(path, lambda: self.fs.info(full), lambda: self.fs._info(full))
        if info.get("type") == "directory":
            raise IsADirectoryError(f"{path!r} is a directory on {self.url}")
        return ObjectInfo(path=normalize_path(path), size=int(info["size"]), version=object_version(info), fetched_at=time.time())

    def ls(self, prefix: str = "") -> list[dict[str, Any]]:
        """List a directory: ``name`` (relative to the root), ``size``, ``type``, ``mtime`` (or ``None``),
        ``version`` (as :meth:`info` has it)."""
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
            call = functools.partial(self.fs.cat_file, full, start=start, end=end)
        else:
            call = functools.partial(self._stat_checked, path, full, start, end, version)
        return self._pool.submit(self._retrying, path, call)

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
        self._check_version(path, version, self._fresh_info(full))
        data = self.fs.cat_file(full, start=start, end=end)
        self._check_version(path, version, self._fresh_info(full))
        return data

    async def _stat_checked_async(self, path: str, full: str, start: int, end: int, version: str) -> bytes:
        self.fs.invalidate_cache(full)
        self._check_version(path, version, await self.fs._info(full))
        data = await self.fs._cat_file(full, start=start, end=end)
        self.fs.invalidate_cache(full)
        self._check_version(path, version, await self.fs._info(full))
        return data

    def _fresh_info(self, full: str) -> dict[str, Any]:
        self.fs.invalidate_cache(full)
        return self.fs.info(full)

    @staticmethod
    def _check_version(path: str, expected: str, info: dict[str, Any]) -> None:
        found = object_version(info)
        if found != expected:
            raise VersionChanged(path, expected, found)

    def _call(self, path: str, sync_call: Callable[[], Any], async_call: Callable[[], Any]) -> Any:
        """One remote call with retries; on an async filesystem each attempt is bounded by ``timeout``."""
        if self.is_async:
            return asyncio.run_coroutine_threadsafe(self._retrying_async(path, async_call), self.fs.loop).result()
        return self._retrying(path, sync_call)

    async def _retrying_async(self, path: str, make_call: Callable[[], Any]) -> Any:
        for attempt in range(1, self.retries + 1):
            try:
                return await asyncio.wait_for(make_call(), self.timeout)
            except Exception as exc:  # noqa: BLE001 - sorted out by _backoff
                await asyncio.sleep(self._backoff(path, exc, attempt))
        raise AssertionError("unreachable")

    def _retrying(self, path: str, call: Callable[[], Any]) -> Any:
        for attempt in range(1, self.retries + 1):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - sorted out by _backoff
                time.sleep(self._backoff(path, exc, attempt))
        raise AssertionError("unreachable")

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
            return TimeoutError(f"{where}: remote timed out after {self.retries} attempts")
        return RemoteError(f"{where}: remote failed after {self.retries} attempts: {exc!r}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
