"""Test helpers: remotes for engine tests (one writable place, three kinds of fsspec
filesystem), and running work on several threads at once."""

from __future__ import annotations

import socket
import threading
import uuid
from typing import Callable

import fsspec


class Remote:
    """Where a test puts objects, and how a Cache reaches them."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def put(self, path: str, data: bytes) -> None:
        full = f"{self.root}/{path}"
        if self.fs.protocol == "file" or "file" in self.fs.protocol:
            self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(full, data)

    def cache_args(self) -> dict:
        return {"remote": self.fs, "root": self.root}


def memory_remote() -> Remote:
    return Remote(fsspec.filesystem("memory"), f"/igt-{uuid.uuid4().hex}")


def file_remote(tmp_path) -> Remote:
    root = tmp_path / "remote"
    root.mkdir()
    return Remote(fsspec.filesystem("file"), str(root))


class ManualClock:
    """A clock for ``Cache(clock=...)`` that moves only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def in_threads(work: Callable[[int], None], count: int, timeout: float | None = None) -> list[BaseException]:
    """Run ``work(0)`` ... ``work(count - 1)`` at once, one thread each; return what they raised."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return errors


class IndexedMemoryFileSystem(fsspec.get_filesystem_class("memory")):
    """``memory://`` with a store of its own and a constant-time ``info`` for files.

    fsspec's ``info`` scans the whole store, which is shared by every
    ``MemoryFileSystem`` in the process, on every stat: 100,000 objects would
    take hours. Everything else is fsspec's own code.
    """

    cachable = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.store = {}
        self.pseudo_dirs = [""]

    def info(self, path: str, **kwargs) -> dict:
        stripped = self._strip_protocol(path)
        found = self.store.get(stripped)
        if found is None:
            return super().info(path, **kwargs)
        return {"name": stripped, "size": found.size, "type": "file", "created": getattr(found, "created", None)}


def need_redis() -> None:
    """Skip a test that needs redis-server where it is not installed; on CI, where
    `make setup` installs it, its absence is a failure."""
    import os
    import shutil

    import pytest

    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing on CI (make setup installs it)")
        pytest.skip("redis-server is not installed (apt-get install redis-server; `make setup` does it as root)")


def unix_connection(path: str) -> socket.socket:
    """A connection to the daemon's socket at ``path``, each wait bounded by 30 s."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(path)
    return conn


def binary_connection(path: str) -> socket.socket:
    """A connection to the daemon at ``path`` that has done the binary protocol's handshake."""
    from igtcache.daemon.protocol import MAGIC

    conn = unix_connection(path)
    conn.sendall(MAGIC)
    assert conn.recv(len(MAGIC), socket.MSG_WAITALL) == MAGIC
    return conn
