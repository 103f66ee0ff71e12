"""Reads through ``igtcache mount`` on cached data, next to the same reads on a local file.

One run: a file of ``--size`` random bytes on local disk is the remote
(``file://``) and, read from the page cache, the baseline. It is mounted twice
(an embedded cache whose memory tier holds it all): with the default buffered
I/O, and with ``--direct-io``. Each mount reads the file once to fill the
cache; after that every figure is of cache hits (checked: the cache fetched
each byte from the remote once). Next to each, the same mount code over a
backend whose reads do nothing (``NullBackend``): the ceiling that mfusepy,
libfuse and the kernel leave to any cache behind them. Figures, each the
median of ``--rounds``:

- sequential: ``readv`` of 1 MiB into one page-aligned buffer, start to end;
  before each pass the mounted file's kernel page cache is dropped
  (``POSIX_FADV_DONTNEED``) so the bytes come from igtcache, not the kernel;
- random: ``--random-reads`` 4 KiB ``pread`` calls at random aligned offsets
  (``POSIX_FADV_RANDOM``, page cache dropped before each pass);
- the buffered mount re-reading with the kernel's page cache kept (what a
  second epoch over an unchanged file gets).

Targets (issue 6): cached sequential >= 500 MB/s and >= 25% of the local file.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from igtcache.bench.files import write_random_file
from igtcache.sizes import format_size, size_argument

MiB = 1 << 20
PAGE = 4096
TARGET_BYTES_PER_S = 500e6
TARGET_RATIO = 0.25


class NullBackend:
    """One file, ``data.bin`` of ``size`` bytes, whose reads cost nothing: the
    reply buffer goes back as it is (its bytes are not meaningful)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def info(self, path: str) -> dict[str, Any]:
        if path != "data.bin":
            raise FileNotFoundError(path)
        return {"name": path, "size": self.size, "type": "file", "version": "0"}

    def ls(self, prefix: str = "") -> list[dict[str, Any]]:
        return [] if prefix else [{"name": "data.bin", "size": self.size, "type": "file"}]

    def readinto(self, path: str, offset: int, buffer, *, job: str | None = None) -> int:
        return max(0, min(len(buffer), self.size - offset))

    def read(self, path: str, offset: int = 0, size: int = -1, *, job: str | None = None,
             hint: str | None = None) -> bytes:
        return bytes(max(0, min(self.size - offset, self.size if size < 0 else size)))

    def invalidate(self, path: str) -> None:
        pass


def _serve_null(mountpoint: str, size: int, direct_io: bool) -> None:
    """Serve ``NullBackend`` at ``mountpoint`` as ``igtcache mount`` serves a cache; "ready" on stdout."""
    from igtcache.fuse.mount import CacheFS
    from igtcache.fuse.runner import serve

    ops = CacheFS(NullBackend(size), ttl=3600, direct_io=direct_io)
    serve(ops, mountpoint, on_ready=lambda: print("ready", flush=True))


def _start_null(mountpoint: str, size: int, direct_io: bool) -> subprocess.Popen:
    """A process serving ``NullBackend`` at ``mountpoint``, once it is mounted."""
    child = subprocess.Popen(
        [sys.executable, "-m", "igtcache.bench.fuse", "--serve-null", mountpoint, "--size", str(size),
         *(["--direct-io"] if direct_io else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    if child.stdout.readline() != b"ready\n":
        child.kill()
        raise RuntimeError(f"the no-op mount failed: {child.communicate()[1].decode(errors='replace')}")
    return child


def _sequential(path: str, drop_page_cache: bool) -> float:
    """Bytes/s of one start-to-end pass of 1 MiB reads."""
    buffer = mmap.mmap(-1, MiB)  # page-aligned, reused: the file system is measured, not malloc
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop_page_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        total, started = 0, time.perf_counter()
        while n := os.readv(fd, [buffer]):
            total += n
        return total / (time.perf_counter() - started)
    finally:
        os.close(fd)
        buffer.close()


def _random(path: str, offsets: list[int], drop_page_cache: bool) -> float:
    """4 KiB reads/s at ``offsets``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if drop_page_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        started = time.perf_counter()
        for offset in offsets:
            os.pread(fd, PAGE, offset)
        return len(offsets) / (time.perf_counter() - started)
    finally:
        os.close(fd)


def run(size: int, rounds: int, random_reads: int, block_size: int, seed: int = 0) -> list[dict]:
    """Measure every path; one dict per row. Each round measures every path in
    turn, so that they all see the same load on the machine."""
    from igtcache.fuse.cli import start_background
    from igtcache.fuse.unmount import unmount

    rng = random.Random(seed)
    offsets = [rng.randrange(size // PAGE) * PAGE for _ in range(random_reads)]
    with tempfile.TemporaryDirectory(prefix="igtcache-bench-fuse-") as scratch:
        remote = os.path.join(scratch, "remote")
        os.mkdir(remote)
        local = os.path.join(remote, "data.bin")
        write_random_file(local, size)
        mounts = {}
        try:
            for name, extra in {"buffered": [], "direct-io": ["--direct-io"]}.items():
                mountpoint = os.path.join(scratch, f"mnt-{name}")
                os.mkdir(mountpoint)
                mounts[mountpoint] = start_background([
                    f"file://{remote}", mountpoint, "--embedded", "--memory", str(size + 64 * MiB),
                    "--block-size", str(block_size), "--ttl", "3600", *extra,
                ])
            cached = list(mounts)
            for name in ("buffered", "direct-io"):
                mountpoint = os.path.join(scratch, f"null-{name}")
                os.mkdir(mountpoint)
                mounts[mountpoint] = _start_null(mountpoint, size, name == "direct-io")
            buffered, direct, null_buffered, null_direct = (os.path.join(m, "data.bin") for m in mounts)
            # (row, file, drop the kernel's page cache first, counts against the target)
            paths = [
                ("local file (page cache)", local, False, False),
                ("mount, buffered: igtcache hits", buffered, True, True),
                ("mount, buffered: no-op backend", null_buffered, True, False),
                ("mount, buffered: kernel page cache", buffered, False, False),
                ("mount, direct-io: igtcache hits", direct, True, True),
                ("mount, direct-io: no-op backend", null_direct, True, False),
            ]
            for path in (local, buffered, direct):
                _sequential(path, drop_page_cache=False)  # fills igtcache (and the page cache)
            seq: dict[str, list[float]] = {row: [] for row, *_ in paths}
            rand: dict[str, list[float]] = {row: [] for row, *_ in paths}
            for _ in range(rounds):
                for row, path, drop, _target in paths:
                    seq[row].append(_sequential(path, drop))
                for row, path, drop, _target in reversed(paths):  # the buffered mount's page cache is still warm
                    rand[row].append(_random(path, offsets, drop))
            for mountpoint in cached:
                stats = json.loads(os.getxattr(mountpoint, "user.igtcache.stats"))
                assert stats["remote_bytes"] == size, f"a benchmark read missed the cache: {stats['remote_bytes']}"
        finally:
            for mountpoint, process in mounts.items():
                unmount(mountpoint)
                process.wait(timeout=60)
    rows = [{"path": row, "seq_bytes_per_s": statistics.median(seq[row]),
             "random_reads_per_s": statistics.median(rand[row]), "target": target} for row, _p, _d, target in paths]
    baseline = rows[0]
    for row in rows:
        row["seq_ratio"] = row["seq_bytes_per_s"] / baseline["seq_bytes_per_s"]
        row["random_ratio"] = row["random_reads_per_s"] / baseline["random_reads_per_s"]
        if row.pop("target"):
            row["meets_target"] = row["seq_bytes_per_s"] >= TARGET_BYTES_PER_S and row["seq_ratio"] >= TARGET_RATIO
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="igtcache bench fuse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", type=size_argument, default="256MiB", help="size of the file read (default 256MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per figure; the median is reported (default 5)")
    parser.add_argument("--random-reads", type=int, default=20000, help="4 KiB reads per random round (default 20000)")
    parser.add_argument("--block-size", type=size_argument, default="4MiB", help="cache block size (default 4MiB)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--serve-null", metavar="MOUNTPOINT", help=argparse.SUPPRESS)  # a no-op mount's process
    parser.add_argument("--direct-io", action="store_true", help=argparse.SUPPRESS)  # with --serve-null
    args = parser.parse_args(argv)
    if args.serve_null:
        _serve_null(args.serve_null, args.size, args.direct_io)
        return 0
    if args.size < MiB or args.rounds < 1 or args.random_reads < 1:
        parser.error("--size must be at least 1MiB, --rounds and --random-reads at least 1")
    rows = run(args.size, args.rounds, args.random_reads, args.block_size)
    if args.json:
        print(json.dumps({"size": args.size, "block_size": args.block_size, "results": rows}, indent=2))
        return 0
    print(f"{format_size(args.size)} file, cache blocks of {format_size(args.block_size)}, "
          f"median of {args.rounds} rounds; target: sequential >= {TARGET_BYTES_PER_S / 1e6:.0f} MB/s "
          f"and >= {TARGET_RATIO:.0%} of the local file")
    print(f"{'path':<36}{'seq 1MiB GB/s':>14}{'vs local':>9}{'rand 4KiB/s':>13}{'vs local':>9}  target")
    for row in rows:
        verdict = {True: "met", False: "MISSED", None: ""}[row.get("meets_target")]
        print(f"{row['path']:<36}{row['seq_bytes_per_s'] / 1e9:>14.2f}{row['seq_ratio']:>9.0%}"
              f"{row['random_reads_per_s']:>13,.0f}{row['random_ratio']:>9.1%}  {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
