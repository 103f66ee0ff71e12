"""Remotes for engine tests: one writable place, three kinds of fsspec filesystem."""

from __future__ import annotations

import uuid

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
