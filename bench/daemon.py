"""The ``igtcache::`` fsspec plugin attached to the node daemon, embedded, and a local file, in one run.

On a local S3 server (moto, on 127.0.0.1) it uploads an object and a directory
of small files, starts a daemon (``igtcache serve``, memory and disk tiers
larger than both) and measures, on the same bytes:

- hit-path throughput of block-sized reads (``f.seek`` + ``f.read``, aligned
  to blocks and shifted by half a block) through the plugin attached to the
  daemon (hits served from its disk tier in this process: short-circuit
  reads), through ``DaemonClient`` over the socket alone, through the plugin
  running the engine embedded, through the daemon's HTTP API, and with
  ``os.pread`` on a local file already in the page cache (the baseline);
- the rate of 4 KiB reads at random offsets on the same paths;
- 4 KiB ``cat_file`` at random offsets: on ``igtcache::`` attached, next to
  fsspec's own ``cat_file`` on the local file and a bare ``os.pread``;
- a PyTorch DataLoader with workers reading every small file whole through the
  attached plugin, next to the same loader over a local directory;
- the daemon's CPU per hit that clients served themselves and reported, next
  to its CPU per read served over the socket;
- miss latency: a block-sized read of a block no cache holds yet, attached
  and embedded, against ``s3fs.cat_file`` of the same range alone; and a
  4 KiB read miss, which fetches its whole block.

Each throughput is the median of several rounds in which the paths take
turns, and each ratio the median of the rounds' ratios to the baseline, so
that a busy machine slows every path alike. Targets: attached block-sized
hits >= 80% of the local file; attached 4 KiB ``cat_file`` >= 100% of fsspec's
on the local file and >= 25% of ``os.pread``; the DataLoader >= 80% of the
local directory's samples/s; <= 5 us of daemon CPU per reported hit.
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
TARGETS = {(kind, "attached"): 0.8 for kind in ("aligned", "unaligned")}
CAT_FILE_TARGETS = {"fsspec file://": 1.0, "os.pread": 0.25}
LOADER_TARGET = 0.8
CPU_TARGET_US = 5.0
CPU_READS = 50_000


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


def _turns(readers: dict[str, Callable[[], int]], rounds: int, baseline: str) -> list[dict]:
    """Each reader's median rate over ``rounds`` in which they take turns, and the median of its
    ratios to ``baseline``'s rate in the same rounds."""
    rates: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(rounds):
        for name, work in readers.items():
            rates[name].append(_rate(work))
    return [{"path": name, "rate": statistics.median(samples),
             "ratio": statistics.median(r / b for r, b in zip(samples, rates[baseline]))}
            for name, samples in rates.items()]


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process ``pid`` has used (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Files:
    """Reads every small file whole, one per item: the dataset of the loader rows."""

    def __init__(self, paths: list[str], read: Callable[[str], bytes]) -> None:
        self.paths, self.read = paths, read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> int:
        return len(self.read(self.paths[i]))


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _loader_rate(dataset: _Files, workers: int) -> Callable[[], int]:
    from torch.utils.data import DataLoader

    def epoch() -> int:
        loader = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=workers,
                            collate_fn=lambda batch: sum(batch))
        return sum(1 for _ in loader) and len(dataset)
    return epoch


def run(size: int, block: int, small_reads: int, rounds: int, passes: int, files: int = 1000,
        file_size: int = 100_000, workers: int = 8) -> dict:
    """Every figure of the benchmark, as one dict."""
    rng = random.Random(0)
    data = rng.randbytes(size)
    large_offsets = list(range(0, size - block + 1, block))
    small_offsets = [rng.randrange(size - 4096) for _ in range(small_reads)]
    results: dict = {"size": size, "block": block, "hits": [], "misses": []}
    room = 2 * size + files * file_size + 64 * MiB
    with LocalS3() as server, tempfile.TemporaryDirectory(prefix="igtcache-bench-") as scratch:
        server.create_bucket(BUCKET)
        s3 = server.filesystem()
        hot, cold = f"{BUCKET}/bench/hot.bin", f"{BUCKET}/bench/cold.bin"
        s3.pipe_file(hot, data)
        s3.pipe_file(cold, data)
        local = os.path.join(scratch, "hot.bin")
        with open(local, "wb") as f:
            f.write(data)
        names = [f"small/{i:06d}.bin" for i in range(files)]
        local_dir = os.path.join(scratch, "small")
        os.makedirs(local_dir)
        for name in names:
            content = rng.randbytes(file_size)
            s3.pipe_file(f"{BUCKET}/bench/{name}", content)
            with open(os.path.join(scratch, name), "wb") as f:
                f.write(content)
        args = ["--remote", f"bench=s3://{BUCKET}/bench", "--storage-options", json.dumps(server.storage_options()),
                "--cache-dir", os.path.join(scratch, "cache"), "--memory", str(room), "--disk", str(room),
                "--block-size", str(block), "--ttl", "3600"]
        with DaemonProcess(os.path.join(scratch, "d.sock"), args) as daemon:
            options = dict(target_protocol="s3", target_options=server.storage_options(), skip_instance_cache=True,
                           socket=daemon.socket_path, block_size=block, ttl=3600)
            attached = IgtcacheFileSystem(mode="attach", **options)
            embedded = IgtcacheFileSystem(mode="embedded", memory=room, **options)
            results["misses"] = _misses(s3, cold, attached, embedded, large_offsets, block)
            socket_only = DaemonClient(daemon.socket_path, "bench", short_circuit=False)
            with DaemonClient(daemon.socket_path, "bench") as client:
                results["hits"] = _hits(daemon, client, local, hot, attached, embedded, socket_only, large_offsets,
                                        small_offsets, block, size, rounds, passes)
                results["cat_file"] = _cat_file(local, hot, attached, small_offsets, rounds)
                results["loader"] = _loader(attached, client, scratch, names, workers, rounds)
                results["daemon_cpu"] = _daemon_cpu(daemon, client, socket_only, small_offsets)
                results["daemon_remote_bytes"] = client.stats()["remote_bytes"]
                results["short_circuit"] = client.short_circuited
    for row in results["hits"]:
        if (row["read"], row["path"]) in TARGETS:
            row["target"] = f">= {TARGETS[row['read'], row['path']]:.0%} of local"
            row["met"] = row["ratio"] >= TARGETS[row["read"], row["path"]]
    alone = {r["read"]: r["median_s"] for r in results["misses"] if r["path"] == "s3fs alone"}
    for row in results["misses"]:
        row["overhead_s"] = row["median_s"] - alone[row["read"]]
    return results


def _misses(s3, cold: str, attached, embedded, large_offsets: list[int], block: int) -> list[dict]:
    """Latency of reads no cache holds yet, the paths taking turns, against s3fs alone."""
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
    return [{"read": kind, "path": name, "median_s": statistics.median(samples), "samples": len(samples)}
            for (kind, name), samples in timings.items()]


def _hits(daemon, client: DaemonClient, local: str, hot: str, attached, embedded, socket_only: DaemonClient,
          large_offsets: list[int],
          small_offsets: list[int], block: int, size: int, rounds: int, passes: int) -> list[dict]:
    """Block-sized and 4 KiB hits on every path, against ``os.pread`` of a local file."""
    fd = os.open(local, os.O_RDONLY)
    files = [attached.open(hot, "rb"), embedded.open(hot, "rb")]
    http = _UnixHTTP(daemon.socket_path)
    url = "/v1/remotes/bench/read?path=hot.bin"
    rows = []
    try:
        readers = {"local file": lambda o, n: os.pread(fd, n, o),
                   "attached": _file_reader(files[0]), "socket": lambda o, n: socket_only.read("hot.bin", o, n),
                   "embedded": _file_reader(files[1]),
                   "HTTP API": lambda o, n: http.get(f"{url}&offset={o}&size={n}")}
        unaligned = [o + block // 2 for o in large_offsets[:-1]]  # each read joins two blocks
        for read in readers.values():
            read(0, size)  # warm: every block resident, the local file in the page cache
        _until_on_disk(client, ["hot.bin"])
        kinds = (("aligned", large_offsets * passes, block), ("unaligned", unaligned * passes, block),
                 ("4 KiB", small_offsets, 4096))
        for kind, offsets, length in kinds:
            per_read = 1 if kind == "4 KiB" else length
            works = {name: (lambda read=read: per_read * sum(1 for o in offsets if len(read(o, length)) == length))
                     for name, read in readers.items()}
            rows += [{"read": kind, **row} for row in _turns(works, rounds, "local file")]
    finally:
        os.close(fd)
        http.close()
        for f in files:
            f.close()
    return rows


def _until_on_disk(client: DaemonClient, paths: list[str], timeout: float = 60.0) -> None:
    """Wait until the daemon has written every one of ``paths`` to its disk tier (it does so in the
    background), so that the attached path is measured on hits served in this process."""
    deadline = time.monotonic() + timeout
    while paths and client.short_circuited and time.monotonic() < deadline:
        waiting = []
        for path in paths:
            served = client.served_here
            client.read(path)
            if client.served_here == served:
                waiting.append(path)
        paths = waiting
        time.sleep(0.05)


def _cat_file(local: str, hot: str, attached, small_offsets: list[int], rounds: int) -> list[dict]:
    """4 KiB ``cat_file`` at random offsets on ``igtcache::`` attached, fsspec's ``file://`` and ``os.pread``."""
    import fsspec

    local_fs = fsspec.filesystem("file")
    fd = os.open(local, os.O_RDONLY)
    try:
        paths = {"os.pread": lambda o: os.pread(fd, 4096, o),
                 "fsspec file://": lambda o: local_fs.cat_file(local, start=o, end=o + 4096),
                 "igtcache:: attached": lambda o: attached.cat_file(hot, start=o, end=o + 4096)}
        works = {name: (lambda read=read: sum(1 for o in small_offsets if len(read(o)) == 4096))
                 for name, read in paths.items()}
        rows = _turns(works, rounds, "os.pread")
    finally:
        os.close(fd)
    by_name = {row["path"]: row for row in rows}
    ours = by_name["igtcache:: attached"]
    ours["vs"] = {name: ours["rate"] / by_name[name]["rate"] for name in CAT_FILE_TARGETS}
    ours["met"] = all(ours["vs"][name] >= share for name, share in CAT_FILE_TARGETS.items())
    return rows


def _loader(attached, client: DaemonClient, scratch: str, names: list[str], workers: int, rounds: int) -> dict:
    """Samples/s of a DataLoader with ``workers`` reading every small file whole, attached vs a local directory."""
    remote_paths = [f"{BUCKET}/bench/{name}" for name in names]
    for path in remote_paths:
        attached.cat_file(path)  # warm: every file in the daemon's tiers
    _until_on_disk(client, names)
    local = _Files([os.path.join(scratch, name) for name in names], _read_local)
    ours = _Files(remote_paths, attached.cat_file)
    rows = _turns({"local directory": _loader_rate(local, workers), "igtcache:: attached": _loader_rate(ours, workers)},
                  rounds, "local directory")
    result = {"workers": workers, "files": len(names), "rows": rows}
    result["met"] = rows[1]["ratio"] >= LOADER_TARGET
    return result


def _daemon_cpu(daemon, client: DaemonClient, socket_only: DaemonClient, small_offsets: list[int]) -> dict:
    """The daemon's CPU per hit reported by a short-circuit client, and per read served over its socket."""
    figures = {}
    offsets = small_offsets * -(-CPU_READS // len(small_offsets))  # enough for the CPU clock's 10 ms ticks
    for name, read in (("reported hit", client.read), ("socket read", socket_only.read)):
        before = _cpu_seconds(daemon.pid)
        for offset in offsets:
            read("hot.bin", offset, 4096)
        client.flush_reports()
        figures[name] = (_cpu_seconds(daemon.pid) - before) / len(offsets) * 1e6
    return {"us_per_reported_hit": figures["reported hit"], "us_per_socket_read": figures["socket read"],
            "reads": len(offsets), "met": figures["reported hit"] <= CPU_TARGET_US}


def _print(results: dict, rounds: int) -> None:
    block = format_size(results["block"])
    print(f"object {format_size(results['size'])} on a local S3 server (moto), blocks of {block}; "
          f"hits: median of {rounds} rounds, the paths taking turns; ratios: median of the rounds' ratios")
    print(f"attached: the plugin attached to the daemon, {'with' if results['short_circuit'] else 'WITHOUT'} "
          "short-circuit reads; socket: DaemonClient over the daemon's socket alone")
    print(f"\nhits: {block} reads (aligned to blocks, or shifted by half a block) in GB/s, "
          "4 KiB reads at random offsets in reads/s")
    print(f"{'read':<11}{'path':<12}{'rate':>14}{'vs local':>10}  target")
    for row in sorted(results["hits"], key=lambda r: ["aligned", "unaligned", "4 KiB"].index(r["read"])):
        rate = f"{row['rate']:,.0f} /s" if row["read"] == "4 KiB" else f"{row['rate'] / 1e9:.2f} GB/s"
        verdict = f"{row['target']}: {'met' if row['met'] else 'MISSED'}" if "target" in row else ""
        print(f"{row['read']:<11}{row['path']:<12}{rate:>14}{row['ratio']:>9.0%}  {verdict}")
    print("\n4 KiB cat_file at random offsets, reads/s")
    for row in results["cat_file"]:
        extra = ""
        if "vs" in row:
            shares = ", ".join(f"{v:.0%} of {k}" for k, v in row["vs"].items())
            extra = f"  {shares} (targets {', '.join(f'{v:.0%} of {k}' for k, v in CAT_FILE_TARGETS.items())}): " \
                    f"{'met' if row['met'] else 'MISSED'}"
        print(f"  {row['path']:<22}{row['rate']:>12,.0f} /s{row['ratio']:>7.0%} of os.pread{extra}")
    loader = results["loader"]
    print(f"\nDataLoader, {loader['workers']} workers, {loader['files']} files read whole, samples/s")
    for row in loader["rows"]:
        print(f"  {row['path']:<22}{row['rate']:>12,.0f} /s{row['ratio']:>7.0%} of the local directory")
    print(f"  target >= {LOADER_TARGET:.0%} of the local directory: {'met' if loader['met'] else 'MISSED'}")
    cpu = results["daemon_cpu"]
    print(f"\ndaemon CPU per 4 KiB read ({cpu['reads']:,} reads): reported hit {cpu['us_per_reported_hit']:.1f} us, "
          f"over the socket {cpu['us_per_socket_read']:.1f} us; target <= {CPU_TARGET_US:g} us per reported hit: "
          f"{'met' if cpu['met'] else 'MISSED'}")
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
    parser.add_argument("--files", type=int, default=1000, help="small files for the DataLoader (default 1000)")
    parser.add_argument("--file-size", type=size_argument, default="100KB",
                        help="size of each small file (default 100KB)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    if args.size < 2 * args.block_size or min(args.rounds, args.small_reads, args.passes, args.files) < 1:
        parser.error("--size must hold at least two blocks; --rounds, --small-reads, --passes and --files "
                     "must be positive")
    if args.workers < 0:
        parser.error("--workers must be 0 or more")
    results = run(args.size, args.block_size, args.small_reads, args.rounds, args.passes, args.files,
                  args.file_size, args.workers)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
