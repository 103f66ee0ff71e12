"""One job of the end-to-end benchmark: a process that really reads its data through one contender.

A job gets its whole read sequence up front (``JobSpec``), builds the
contender's filesystem, waits at the start barrier, then reads every file
(whole, or in chunks), checks each read's CRC-32 against the generated data,
and reports how long it took.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import fsspec

MiB = 1 << 20
CONTENDERS = ("s3fs", "blockcache", "simplecache", "igtcache-lru", "igtcache-igt", "igtcache-igt-fuse",
              "rclone-fuse", "s3fs-fuse")
#: The job that reads through the mount in ``igtcache-igt-fuse`` (the others use the plugin); in a peer's
#: ``-fuse`` contender every job reads through its mount.
FUSE_JOB = "train"


@dataclass
class JobSpec:
    """What one job reads and through what.

    ``reads`` is ``(key, chunk)`` in order (``chunk`` 0: the whole file in one
    read); ``crcs`` the expected CRC-32 of each key. ``budget`` bounds a
    per-process fsspec cache (whole files, least recently used dropped first);
    ``socket`` is the igtcache daemon's; ``mountpoint``, if set, is a FUSE mount of the bucket (``igtcache mount``
    or a peer's) that the job reads through instead, as training code that only knows paths does.
    """

    name: str
    contender: str
    endpoint: str
    bucket: str
    reads: list[tuple[str, int]]
    crcs: dict[str, int]
    sizes: dict[str, int]
    cache_dir: str | None = None
    budget: int = 0
    socket: str | None = None
    mountpoint: str | None = None


def s3_options(endpoint: str) -> dict[str, Any]:
    """s3fs options for the benchmark's server (dummy credentials, 1 MiB blocks)."""
    return {
        "key": "testing", "secret": "testing", "skip_instance_cache": True, "default_block_size": MiB,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


def make_filesystem(spec: JobSpec) -> fsspec.AbstractFileSystem:
    """The contender's filesystem: plain s3fs, an fsspec cache over it, or the igtcache plugin attached
    to the shared daemon."""
    options = s3_options(spec.endpoint)
    if spec.contender == "s3fs":
        return fsspec.filesystem("s3", **options)
    if spec.contender in ("blockcache", "simplecache"):
        return fsspec.filesystem(spec.contender, target_protocol="s3", target_options=options,
                                 cache_storage=spec.cache_dir, skip_instance_cache=True)
    return fsspec.filesystem("igtcache", target_protocol="s3", target_options=options, mode="attach",
                             socket=spec.socket, job=spec.name, skip_instance_cache=True)


class _Budget:
    """Keeps a per-process fsspec cache within ``budget`` bytes by dropping least recently read files."""

    def __init__(self, fs: fsspec.AbstractFileSystem, contender: str, budget: int) -> None:
        self.fs = fs
        self.contender = contender
        self.budget = budget
        self.files: OrderedDict[str, int] = OrderedDict()
        self.bytes = 0

    def touch(self, path: str, size: int) -> None:
        if self.contender not in ("blockcache", "simplecache"):
            return
        if path in self.files:
            self.files.move_to_end(path)
            return
        self.files[path] = size
        self.bytes += size
        while self.bytes > self.budget and len(self.files) > 1:
            victim, victim_size = self.files.popitem(last=False)
            self.bytes -= victim_size
            if self.contender == "simplecache":
                local = self.fs._check_file(victim)  # simplecache keeps no metadata to pop
                if local:
                    os.remove(local)
            else:
                self.fs.pop_from_cache(victim)


def run_job(spec: JobSpec, barrier, progress, results) -> None:
    """Process entry point: read ``spec.reads`` after ``barrier``; put a result dict on ``results``.

    ``progress`` (a shared integer) counts reads done. The result has ``name``,
    ``seconds``, ``reads``, ``bytes``, ``bad`` (reads whose bytes were wrong)
    and ``error`` (None, or why the job failed).
    """
    result = {"name": spec.name, "pid": os.getpid(), "seconds": None, "reads": 0, "bytes": 0, "bad": 0,
              "error": None}
    try:
        fs = None if spec.mountpoint else make_filesystem(spec)
        budget = _Budget(fs, spec.contender, spec.budget)
        barrier.wait()
        started = time.perf_counter()
        for key, chunk in spec.reads:
            path = f"{spec.bucket}/{key}"
            if spec.mountpoint:
                crc, nbytes = _read_mounted(os.path.join(spec.mountpoint, key), chunk, spec.sizes[key])
            else:
                crc, nbytes = _read(fs, path, chunk, spec.sizes[key])
            result["bad"] += crc != spec.crcs[key] or nbytes != spec.sizes[key]
            result["reads"] += 1
            result["bytes"] += nbytes
            budget.touch(path, spec.sizes[key])
            progress.value += 1
        result["seconds"] = time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        result["error"] = f"{type(exc).__name__}: {exc}"
        barrier.abort()
    results.put(result)


def _read(fs: fsspec.AbstractFileSystem, path: str, chunk: int, size: int) -> tuple[int, int]:
    """CRC-32 and length of one file of ``size`` bytes read through ``fs``."""
    with fs.open(path, "rb") as f:
        return _checksum(f, chunk, size)


def _read_mounted(path: str, chunk: int, size: int) -> tuple[int, int]:
    """CRC-32 and length of one file of ``size`` bytes read through the mount.

    The file's pages are dropped from the kernel's page cache first, so every
    read reaches igtcache and only the cache's capacity is measured.
    """
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return _checksum(f, chunk, size)


def _checksum(f, chunk: int, size: int) -> tuple[int, int]:
    """CRC-32 and length of an open file of ``size`` bytes read whole (``chunk`` 0) or ``chunk`` bytes at a time."""
    if not chunk:
        data = f.read()
        return zlib.crc32(data), len(data)
    crc = nbytes = 0
    # never read at the end of the file: fsspec's blockcache then asks for a range past it (416)
    while nbytes < size and (data := f.read(min(chunk, size - nbytes))):
        crc = zlib.crc32(data, crc)
        nbytes += len(data)
    return crc, nbytes
