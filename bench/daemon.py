"""The ``igtcache::`` fsspec plugin attached to the node daemon, embedded, and a local file, in one run.

On a local S3 server (moto, on 127.0.0.1) it uploads an object, starts a
daemon (``igtcache serve``, memory and disk tiers larger than the object) and
measures, on the same bytes:

- hit-path throughput of 4 MiB reads (``f.seek`` + ``f.read``) through the
  plugin attached to the daemon, through the plugin running the engine
  embedded, and with ``os.pread`` on a local file already in the page cache
  (the baseline);
- the rate of 4 KiB reads at random offsets on the same three paths;
- both again through the daemon's HTTP API (aiohttp, keep-alive), to show
  what the binary protocol of the attached path saves;
- miss latency: a block-sized read of a block no cache holds yet, attached
  and embedded, against ``s3fs.cat_file`` of the same range alone; and a
  4 KiB read miss, which fetches its whole block.

Each throughput is the median of several rounds in which the paths take
turns, and each ratio to the local file the median of the rounds' ratios,
so that a busy machine slows every path alike. Targets (issue 5): attached
4 MiB hits >= 40% of the local-file figure, embedded >= 60%; attached 4 KiB
hits >= 5,000 reads/s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import tempfile
import time
from typing import Callable

from igtcache.clients.fsspec_plugin import IgtcacheFileSystem
from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import DaemonClient
from igtcache.local_s3 import LocalS3
from igtcache.sizes import format_size, size_argument

MiB = 1 << 20
BUCKET = "igtcache-bench"
TARGETS = {(kind, path): share for kind in ("aligned", "unaligned")
           for path, share in (("attached", 0.4), ("embedded", 0.6))}
SMALL_TARGET = 5000


def _rate(work: Callable[[], int]) -> float:
    """Units (bytes or reads) per second of ``work()``, which returns how many it did."""
    started = time.perf_counter()
    units = work()
    return units / (time.perf_counter() - started)


def _file_reader(f) -> Callable[[int, int], bytes]:
    def read(offset: int, length: int) -> bytes:
        f.seek(offset)
        return f.read(length)
    return read


class _UnixHTTP(http.client.HTTPConnection):
    """A keep-alive HTTP connection to the daemon's socket: the HTTP API's read path, for comparison."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)

    def get(self, url: str) -> bytes:
        self.request("GET", url)
        return self.getresponse().read()


def _latency(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def run(size: int, block: int, small_reads: int, rounds: int, passes: int) -> dict:
    """Every figure of the benchmark, as one dict."""
    rng = random.Random(0)
    data = rng.randbytes(size)
    large_offsets = list(range(0, size - block + 1, block))
    small_offsets = [rng.randrange(size - 4096) for _ in range(small_reads)]
    results: dict = {"size": size, "block": block, "hits": [], "misses": []}
    with LocalS3() as server, tempfile.TemporaryDirectory(prefix="igtcache-bench-") as scratch:
        server.create_bucket(BUCKET)
        s3 = server.filesystem()
        hot, cold = f"{BUCKET}/bench/hot.bin", f"{BUCKET}/bench/cold.bin"
        s3.pipe_file(hot, data)
        s3.pipe_file(cold, data)
        local = os.path.join(scratch, "hot.bin")
        with open(local, "wb") as f:
            f.write(data)
        args = ["--remote", f"bench=s3://{BUCKET}/bench", "--storage-options", json.dumps(server.storage_options()),
                "--cache-dir", os.path.join(scratch, "cache"), "--memory", str(2 * size + 64 * MiB),
                "--disk", str(2 * size + 64 * MiB), "--block-size", str(block), "--ttl", "3600"]
        with DaemonProcess(os.path.join(scratch, "d.sock"), args) as daemon:
            options = dict(target_protocol="s3", target_options=server.storage_options(), skip_instance_cache=True,
                           socket=daemon.socket_path, block_size=block, ttl=3600)
            attached = IgtcacheFileSystem(mode="attach", **options)
            embedded = IgtcacheFileSystem(mode="embedded", memory=2 * size + 64 * MiB, **options)

            # Misses first, while no cache holds a block of the cold object.
            for fs in (attached, embedded):
                fs.info(cold)  # metadata warm: a miss is the block fetch alone
            s3.info(cold)
            paths = {"s3fs alone": lambda o, n: s3.cat_file(cold, start=o, end=o + n),
                     "attached": lambda o, n: attached.cat_file(cold, start=o, end=o + n),
                     "embedded": lambda o, n: embedded.cat_file(cold, start=o, end=o + n)}
            timings: dict[tuple[str, str], list[float]] = {}
            for i, offset in enumerate(large_offsets):
                kind, length = ("block", block) if i % 2 == 0 else ("4 KiB", 4096)
                names = list(paths)
                names = names[i % 3:] + names[:i % 3]  # rotate the order: no path always goes first
                for name in names:
                    timings.setdefault((kind, name), []).append(_latency(lambda: paths[name](offset, length)))
            for (kind, name), samples in timings.items():
                results["misses"].append({"read": kind, "path": name, "median_s": statistics.median(samples),
                                          "samples": len(samples)})

            fd = os.open(local, os.O_RDONLY)
            files = [attached.open(hot, "rb"), embedded.open(hot, "rb")]
            http = _UnixHTTP(daemon.socket_path)
            url = "/v1/remotes/bench/read?path=hot.bin"
            try:
                readers = {"local file": lambda o, n: os.pread(fd, n, o),
                           "attached": _file_reader(files[0]), "embedded": _file_reader(files[1]),
                           "HTTP API": lambda o, n: http.get(f"{url}&offset={o}&size={n}")}
                unaligned = [o + block // 2 for o in large_offsets[:-1]]  # each read joins two blocks
                for read in readers.values():
                    read(0, size)  # warm: every block resident, the local file in the page cache
                kinds = (("aligned", large_offsets * passes, block), ("unaligned", unaligned * passes, block),
                         ("4 KiB", small_offsets, 4096))
                for kind, offsets, length in kinds:
                    per_read = 1 if kind == "4 KiB" else length
                    rates: dict[str, list[float]] = {name: [] for name in readers}
                    for _ in range(rounds):  # paths take turns, so that each round sees the same machine
                        for name, read in readers.items():
                            rates[name].append(_rate(lambda: per_read * sum(
                                1 for o in offsets if len(read(o, length)) == length)))
                    for name, samples in rates.items():
                        results["hits"].append({
                            "read": kind, "path": name, "rate": statistics.median(samples),
                            "ratio": statistics.median(r / b for r, b in zip(samples, rates["local file"])),
                        })
            finally:
                os.close(fd)
                http.close()
                for f in files:
                    f.close()
            with DaemonClient(daemon.socket_path, "bench") as client:
                results["daemon_remote_bytes"] = client.stats()["remote_bytes"]
    for row in results["hits"]:
        if (row["read"], row["path"]) in TARGETS:
            row["target"] = f">= {TARGETS[row['read'], row['path']]:.0%} of local"
            row["met"] = row["ratio"] >= TARGETS[row["read"], row["path"]]
        if row["read"] == "4 KiB" and row["path"] == "attached":
            row["target"] = f">= {SMALL_TARGET} reads/s"
            row["met"] = row["rate"] >= SMALL_TARGET
    alone = {r["read"]: r["median_s"] for r in results["misses"] if r["path"] == "s3fs alone"}
    for row in results["misses"]:
        row["overhead_s"] = row["median_s"] - alone[row["read"]]
    return results


def _print(results: dict, rounds: int) -> None:
    block = format_size(results["block"])
    print(f"object {format_size(results['size'])} on a local S3 server (moto), blocks of {block}; "
          f"hits: median of {rounds} rounds, the paths taking turns; vs local: median of the rounds' ratios")
    print(f"\nhits: {block} reads (aligned to blocks, or shifted by half a block) in GB/s, "
          "4 KiB reads at random offsets in reads/s")
    print(f"{'read':<11}{'path':<12}{'rate':>14}{'vs local':>10}  target")
    for row in sorted(results["hits"], key=lambda r: ["aligned", "unaligned", "4 KiB"].index(r["read"])):
        rate = f"{row['rate']:,.0f} /s" if row["read"] == "4 KiB" else f"{row['rate'] / 1e9:.2f} GB/s"
        verdict = f"{row['target']}: {'met' if row['met'] else 'MISSED'}" if "target" in row else ""
        print(f"{row['read']:<11}{row['path']:<12}{rate:>14}{row['ratio']:>9.0%}  {verdict}")
    print("\nmisses: median latency of a read whose block no cache holds yet (overhead: over s3fs alone)")
    print(f"{'read':<11}{'path':<12}{'latency':>10}{'overhead':>11}")
    for row in sorted(results["misses"], key=lambda r: (r["read"], r["path"] != "s3fs alone", r["path"])):
        print(f"{row['read']:<11}{row['path']:<12}{row['median_s'] * 1e3:>8.1f}ms{row['overhead_s'] * 1e3:>+9.1f}ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="igtcache bench daemon", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", type=size_argument, default="64MiB", help="object size (default 64MiB)")
    parser.add_argument("--block-size", type=size_argument, default="4MiB",
                        help="cache block size and large-read size (default 4MiB)")
    parser.add_argument("--small-reads", type=int, default=5000, help="4 KiB reads per round (default 5000)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds per hit figure; the median is reported (default 5)")
    parser.add_argument("--passes", type=int, default=4,
                        help="passes over the object per round of large reads (default 4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    if args.size < 2 * args.block_size or min(args.rounds, args.small_reads, args.passes) < 1:
        parser.error("--size must hold at least two blocks; --rounds, --small-reads and --passes must be positive")
    results = run(args.size, args.block_size, args.small_reads, args.rounds, args.passes)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
