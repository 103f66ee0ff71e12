"""Reads through ``igtcache mount`` on cached data, next to the same files on local disk and
through the FUSE caches users run today.

One run writes a file of ``--size`` random bytes (``data.bin``) and
``--small-files`` files of ``--small-size`` (``small/``) to local disk, the
baseline (read from the page cache), and puts them in a bucket of a moto S3
server on 127.0.0.1. Mounted over that bucket:

- ``igtcache mount`` with an embedded cache whose memory tier holds it all,
  with the default buffered I/O and with ``--direct-io``;
- ``igtcache mount`` attached to an ``igtcache serve`` daemon (memory and
  disk tier), buffered, as a node runs it;
- ``rclone mount --vfs-cache-mode full`` and s3fs-fuse ``-o use_cache``
  (``bench/fuse_peers.py``), each left out with a note where it is missing.

Each mount reads every file once to fill its cache, checked byte for byte
against the local copy; after that every figure is of cache hits (for
igtcache checked: its cache fetched each byte from the remote once). Every
mount gets the same page-cache policy: a file's pages in the kernel are
dropped (``POSIX_FADV_DONTNEED``) before each pass and each small file, so
the bytes come from the mount's cache, not the kernel's. Next to the
embedded mounts, the same mount code over a backend whose reads do nothing
(``NullBackend``): the ceiling that mfusepy, libfuse and the kernel leave to
any cache behind them. Figures, each the median of ``--rounds``:

- sequential: ``readv`` of 1 MiB into one page-aligned buffer over
  ``data.bin``, start to end;
- random: ``--random-reads`` 4 KiB ``pread`` calls at random aligned offsets
  (``POSIX_FADV_RANDOM``);
- the buffered mount re-reading with the kernel's page cache kept (what a
  second epoch over an unchanged file gets);
- small files: ``--processes`` processes, each opening, reading whole and
  closing its share of ``small/`` in a shuffled order; files/s of all of
  them together.

Target: cached sequential >= 500 MB/s and >= 25% of the local file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from igtcache.bench.files import write_random_file
from igtcache.bench.fuse_peers import LABELS, PEERS, mount_peer, peer_unusable
from igtcache.sizes import format_size, size_argument

MiB = 1 << 20
PAGE = 4096
TARGET_BYTES_PER_S = 500e6
TARGET_RATIO = 0.25
BUCKET = "igtcache-bench-fuse"
REMOTE_NAME = "data"  # the bucket's name on the daemon
DATA = "data.bin"
SMALL = "small"


class NullBackend:
    """One file, ``data.bin`` of ``size`` bytes, whose reads cost nothing: the
    reply buffer goes back as it is (its bytes are not meaningful)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def info(self, path: str) -> dict[str, Any]:
        if path != DATA:
            raise FileNotFoundError(path)
        return {"name": path, "size": self.size, "type": "file", "version": "0"}

    def ls(self, prefix: str = "") -> list[dict[str, Any]]:
        return [] if prefix else [{"name": DATA, "size": self.size, "type": "file"}]

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


_start = None  # in a small-file worker: the barrier that starts the passes together (set by _join_pool)


def _join_pool(start) -> None:
    """A small-file worker's initializer: keep the pool's start barrier."""
    global _start
    _start = start


def _small_pass(paths: list[str], drop_page_cache: bool, buffer_size: int) -> tuple[int, float, float]:
    """Open, read whole and close each of ``paths`` in turn (in a worker, once every worker has its share);
    the bytes read and when the pass started and ended (``perf_counter``: one clock for all processes)."""
    view = memoryview(bytearray(buffer_size))  # larger than a file: one read, then the end
    _start.wait(60)
    total, started = 0, time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            if drop_page_cache:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            while n := os.readv(fd, [view]):
                total += n
        finally:
            os.close(fd)
    return total, started, time.perf_counter()


def _small_pool(processes: int):
    """``processes`` workers for ``_small_files``; a pass waits until each of them has its share."""
    context = multiprocessing.get_context("spawn")
    return context.Pool(processes, initializer=_join_pool, initargs=(context.Barrier(processes),))


def _small_files(pool, processes: int, paths: list[str], drop_page_cache: bool, file_size: int) -> float:
    """Files/s of ``pool``'s ``processes`` reading ``paths``, a share each, all at once."""
    shares = [(paths[i::processes], drop_page_cache, file_size + PAGE) for i in range(processes)]
    passes = pool.starmap(_small_pass, shares, chunksize=1)
    assert sum(p[0] for p in passes) == len(paths) * file_size, "a small-file pass read the wrong number of bytes"
    return len(paths) / (max(p[2] for p in passes) - min(p[1] for p in passes))


@dataclass(frozen=True)
class Row:
    """One way to the files: ``root`` holds ``data.bin`` and, but for the no-op backend, ``small/``.

    ``kind`` is ``local``, ``igtcache``, ``null`` (the no-op backend, whose
    bytes are not meaningful) or ``peer``.
    """

    label: str
    root: str
    kind: Literal["local", "igtcache", "null", "peer"]
    drop: bool = True  # drop the file's pages in the kernel before reading: the mount's own cache is measured
    small: bool = True  # measure the small-file rate through it too
    target: bool = False  # its sequential rate counts against the target


def _write_files(local: Path, size: int, small_files: int, small_size: int) -> list[str]:
    """The data set on local disk; the small files' names under ``small/``."""
    (local / SMALL).mkdir(parents=True)
    write_random_file(str(local / DATA), size)
    names = [f"{i:05d}.bin" for i in range(small_files)]
    for name in names:
        (local / SMALL / name).write_bytes(os.urandom(small_size))
    return names


def _upload(s3, local: Path, names: list[str]) -> None:
    """Put the local data set in the benchmark's bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(BUCKET)
    keys = [DATA, *(f"{SMALL}/{name}" for name in names)]
    def put(key: str) -> None:
        with open(local / key, "rb") as body:
            client.put_object(Bucket=BUCKET, Key=key, Body=body)

    with ThreadPoolExecutor(8) as threads:  # within boto3's 10 pooled connections
        list(threads.map(put, keys))


def _igtcache_mount(stack: contextlib.ExitStack, mountpoint: Path, remote: str, options: list[str]) -> str:
    """``igtcache mount REMOTE MOUNTPOINT OPTIONS``, unmounted when ``stack`` closes."""
    from igtcache.fuse.cli import start_background

    mountpoint.mkdir()
    _unmount_on_close(stack, str(mountpoint), start_background([remote, str(mountpoint), *options]))
    return str(mountpoint)


def _null_mount(stack: contextlib.ExitStack, mountpoint: Path, size: int, direct_io: bool) -> str:
    """``NullBackend`` mounted at ``mountpoint``, unmounted when ``stack`` closes."""
    mountpoint.mkdir()
    _unmount_on_close(stack, str(mountpoint), _start_null(str(mountpoint), size, direct_io))
    return str(mountpoint)


def _unmount_on_close(stack: contextlib.ExitStack, mountpoint: str, process: subprocess.Popen) -> None:
    """When ``stack`` closes: unmount ``mountpoint``, then see its ``process`` exit."""
    from igtcache.fuse.unmount import unmount

    stack.callback(process.wait, 60)
    stack.callback(unmount, mountpoint)


def _mount_all(stack: contextlib.ExitStack, scratch: Path, s3, size: int, data_bytes: int,
               block_size: int) -> tuple[list[Row], dict[str, str]]:
    """Every row's mount, each undone when ``stack`` closes; the rows and the peers left out (why)."""
    from igtcache.daemon.process import DaemonProcess

    storage = json.dumps(s3.storage_options())
    cache = ["--memory", str(data_bytes + 64 * MiB), "--block-size", str(block_size), "--ttl", "3600"]
    url = f"s3://{BUCKET}"
    embedded = ["--embedded", "--storage-options", storage, *cache]
    buffered = _igtcache_mount(stack, scratch / "mnt-buffered", url, embedded)
    direct = _igtcache_mount(stack, scratch / "mnt-direct-io", url, [*embedded, "--direct-io"])
    socket_path = str(scratch / "daemon.sock")
    stack.enter_context(DaemonProcess(socket_path, [
        "--remote", f"{REMOTE_NAME}={url}", "--storage-options", storage, "--cache-dir", str(scratch / "daemon"),
        "--disk", str(2 * data_bytes + 64 * MiB), *cache, "--log-level", "warning"]))
    attached = _igtcache_mount(stack, scratch / "mnt-daemon", REMOTE_NAME, ["--daemon", socket_path, "--ttl", "3600"])
    rows = [
        Row("local file (page cache)", str(scratch / "local"), "local", drop=False),
        Row("mount, buffered: igtcache hits", buffered, "igtcache", target=True),
        Row("mount, buffered: no-op backend", _null_mount(stack, scratch / "null-buffered", size, False), "null",
            small=False),
        Row("mount, buffered: kernel page cache", buffered, "igtcache", drop=False, small=False),
        Row("mount, direct-io: igtcache hits", direct, "igtcache", small=False, target=True),
        Row("mount, direct-io: no-op backend", _null_mount(stack, scratch / "null-direct-io", size, True), "null",
            small=False),
        Row("mount, daemon: igtcache hits", attached, "igtcache"),
    ]
    skipped = {}
    for peer in PEERS:
        if why := peer_unusable(peer):
            skipped[peer] = why
            continue
        mountpoint = scratch / f"mnt-{peer}"
        mountpoint.mkdir()
        stack.enter_context(mount_peer(peer, s3.endpoint, BUCKET, mountpoint, scratch))
        rows.append(Row(f"{LABELS[peer]}: hits", str(mountpoint), "peer"))
    return rows, skipped


def _check_same(path: str, local: str) -> None:
    """Read ``path`` whole (filling its mount's cache); ``AssertionError`` unless it equals ``local``."""
    with open(path, "rb") as mounted, open(local, "rb") as expected:
        while chunk := expected.read(MiB):
            assert mounted.read(len(chunk)) == chunk, f"{path} differs from the bucket's object"
        assert not mounted.read(1), f"{path} is longer than the bucket's object"


def run(size: int, rounds: int, random_reads: int, block_size: int, small_files: int = 0,
        small_size: int = 100_000, processes: int = 8, seed: int = 0) -> dict[str, Any]:
    """Measure every row; the rows' figures (dicts) and the peers left out (why)."""
    from igtcache.local_s3 import LocalS3

    size -= size % MiB  # the file is written in whole MiB
    rng = random.Random(seed)
    offsets = [rng.randrange(size // PAGE) * PAGE for _ in range(random_reads)]
    with tempfile.TemporaryDirectory(prefix="igtcache-bench-fuse-") as tmp, contextlib.ExitStack() as stack:
        scratch = Path(tmp)
        names = _write_files(scratch / "local", size, small_files, small_size)
        data_bytes = size + small_files * small_size
        s3 = stack.enter_context(LocalS3())
        _upload(s3, scratch / "local", names)
        rows, skipped = _mount_all(stack, scratch, s3, size, data_bytes, block_size)
        keys = [DATA, *(f"{SMALL}/{name}" for name in names)]
        for root in {row.root for row in rows if row.kind != "null"}:
            for key in keys:
                _check_same(os.path.join(root, key), str(scratch / "local" / key))
        rng.shuffle(names)
        small_rows = [row for row in rows if row.small] if names else []
        pool = stack.enter_context(_small_pool(processes)) if small_rows else None
        seq, rand, small = _measure(rows, rounds, offsets, small_rows, pool, processes, names, small_size)
        for root in {row.root for row in rows if row.kind == "igtcache"}:
            remote_bytes = json.loads(os.getxattr(root, "user.igtcache.stats"))["remote_bytes"]
            assert remote_bytes == data_bytes, f"a benchmark read missed the cache at {root}: {remote_bytes}"
    return {"results": _figures(rows, seq, rand, small), "skipped": skipped}


def _measure(rows: list[Row], rounds: int, offsets: list[int], small_rows: list[Row], pool, processes: int,
             names: list[str], small_size: int) -> tuple[dict[str, list[float]], ...]:
    """Each row's sequential, random and small-file rates, one per round. Each round measures every row
    in turn, so that they all see the same load on the machine."""
    seq: dict[str, list[float]] = {row.label: [] for row in rows}
    rand: dict[str, list[float]] = {row.label: [] for row in rows}
    small: dict[str, list[float]] = {row.label: [] for row in small_rows}
    for _ in range(rounds):
        for row in rows:
            seq[row.label].append(_sequential(os.path.join(row.root, DATA), row.drop))
        for row in reversed(rows):  # the buffered mount's page cache is still warm
            rand[row.label].append(_random(os.path.join(row.root, DATA), offsets, row.drop))
        for row in small_rows:
            paths = [os.path.join(row.root, SMALL, name) for name in names]
            small[row.label].append(_small_files(pool, processes, paths, row.drop, small_size))
    return seq, rand, small


def _figures(rows: list[Row], seq: dict[str, list[float]], rand: dict[str, list[float]],
             small: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Each row's medians and ratios to the local file's (the first row)."""
    local = rows[0].label
    baselines = {name: statistics.median(rounds[local]) for name, rounds in
                 (("seq", seq), ("random", rand), ("small", small)) if local in rounds}
    figures = []
    for row in rows:
        figure: dict[str, Any] = {"path": row.label, "seq_bytes_per_s": statistics.median(seq[row.label]),
                                  "random_reads_per_s": statistics.median(rand[row.label])}
        figure["seq_ratio"] = figure["seq_bytes_per_s"] / baselines["seq"]
        figure["random_ratio"] = figure["random_reads_per_s"] / baselines["random"]
        if row.label in small:
            figure["small_files_per_s"] = statistics.median(small[row.label])
            figure["small_ratio"] = figure["small_files_per_s"] / baselines["small"]
        if row.target:
            figure["meets_target"] = (figure["seq_bytes_per_s"] >= TARGET_BYTES_PER_S
                                      and figure["seq_ratio"] >= TARGET_RATIO)
        figures.append(figure)
    return figures


def format_report(report: dict[str, Any]) -> str:
    """``main``'s JSON report as two tables (one file; small files), each figure next to the local file's."""
    lines = [f"{format_size(report['size'])} file, cache blocks of {format_size(report['block_size'])}, "
             f"median of {report['rounds']} rounds; target: sequential >= {TARGET_BYTES_PER_S / 1e6:.0f} MB/s "
             f"and >= {TARGET_RATIO:.0%} of the local file",
             f"{'path':<48}{'seq 1MiB GB/s':>14}{'vs local':>9}{'rand 4KiB/s':>13}{'vs local':>9}  target"]
    for row in report["results"]:
        verdict = {True: "met", False: "MISSED", None: ""}[row.get("meets_target")]
        lines.append(f"{row['path']:<48}{row['seq_bytes_per_s'] / 1e9:>14.2f}{row['seq_ratio']:>9.0%}"
                     f"{row['random_reads_per_s']:>13,.0f}{row['random_ratio']:>9.1%}  {verdict}")
    small = [row for row in report["results"] if "small_files_per_s" in row]
    if small:
        lines += ["", f"small files: {report['small_files']:,} of {report['small_size']:,} bytes, "
                  f"{report['processes']} processes each opening, reading whole and closing its share",
                  f"{'path':<48}{'files/s':>10}{'MB/s':>8}{'vs local':>9}"]
        lines += [f"{row['path']:<48}{row['small_files_per_s']:>10,.0f}"
                  f"{row['small_files_per_s'] * report['small_size'] / 1e6:>8.0f}{row['small_ratio']:>9.1%}"
                  for row in small]
    lines += [f"left out {peer}: {why}" for peer, why in report["skipped"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="igtcache bench fuse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", type=size_argument, default="256MiB", help="size of the file read (default 256MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per figure; the median is reported (default 5)")
    parser.add_argument("--random-reads", type=int, default=20000, help="4 KiB reads per random round (default 20000)")
    parser.add_argument("--block-size", type=size_argument, default="4MiB", help="cache block size (default 4MiB)")
    parser.add_argument("--small-files", type=int, default=1024, help="small files read (default 1024; 0: none)")
    parser.add_argument("--small-size", type=size_argument, default="100KB", help="each small file's size "
                        "(default 100KB)")
    parser.add_argument("--processes", type=int, default=8, help="processes reading the small files (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--serve-null", metavar="MOUNTPOINT", help=argparse.SUPPRESS)  # a no-op mount's process
    parser.add_argument("--direct-io", action="store_true", help=argparse.SUPPRESS)  # with --serve-null
    args = parser.parse_args(argv)
    if args.serve_null:
        _serve_null(args.serve_null, args.size, args.direct_io)
        return 0
    if args.size < MiB or args.rounds < 1 or args.random_reads < 1 or args.small_files < 0 or args.processes < 1 \
            or args.small_size < 1:
        parser.error("--size must be at least 1MiB; --rounds, --random-reads, --processes and --small-size "
                     "at least 1; --small-files not negative")
    report = {"size": args.size, "block_size": args.block_size, "rounds": args.rounds,
              "small_files": args.small_files, "small_size": args.small_size, "processes": args.processes,
              **run(args.size, args.rounds, args.random_reads, args.block_size, args.small_files, args.small_size,
                    args.processes)}
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
