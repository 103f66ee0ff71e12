"""Hit-path throughput of the engine's tiers next to a local file in page cache.

One run measures, on the same bytes: reading a local file with ``os.pread``
after it is in the page cache (the baseline), then ``Cache.read`` hits served
from the memory tier and from the LMDB disk tier, each for 4 MiB reads aligned
to blocks and shifted by half a block (so every read spans two blocks and must
be joined). Each figure is the median of several rounds; ratios are to the
baseline measured in the same run.

Targets (issue 2): memory-tier hits >= 50% of the local-file figure, disk-tier
hits >= 30%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Callable

import fsspec

from igtcache import Cache
from igtcache.bench.files import write_random_file
from igtcache.sizes import format_size, size_argument

MiB = 1 << 20
TARGETS = {"memory": 0.5, "disk": 0.3}


def _throughput(read: Callable[[int], bytes], offsets: list[int], rounds: int) -> float:
    """Median bytes/s over ``rounds`` passes of ``read(offset)`` for every offset."""
    rates = []
    for _ in range(rounds):
        total = 0
        started = time.perf_counter()
        for offset in offsets:
            total += len(read(offset))
        rates.append(total / (time.perf_counter() - started))
    return statistics.median(rates)


def run(size: int, read_size: int, rounds: int) -> list[dict]:
    """Measure every path; one dict per row: path, alignment, bytes/s, ratio to baseline."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="igtcache-bench-") as scratch:
        remote_dir = os.path.join(scratch, "remote")
        os.mkdir(remote_dir)
        local = os.path.join(remote_dir, "data.bin")
        write_random_file(local, size)
        shifts = {"aligned": 0, "unaligned": read_size // 2}
        fd = os.open(local, os.O_RDONLY)
        try:
            for name, shift in shifts.items():
                offsets = list(range(shift, size - read_size + 1, read_size))
                _throughput(lambda o: os.pread(fd, read_size, o), offsets, 1)  # into the page cache
                rate = _throughput(lambda o: os.pread(fd, read_size, o), offsets, rounds)
                rows.append({"path": "local file (page cache)", "reads": name, "bytes_per_s": rate})
        finally:
            os.close(fd)
        baseline = {r["reads"]: r["bytes_per_s"] for r in rows}
        fs = fsspec.filesystem("file")
        tiers = {
            "memory": dict(memory_bytes=size + 8 * MiB),
            "disk": dict(memory_bytes=0, cache_dir=os.path.join(scratch, "cache"), disk_bytes=size + 8 * MiB),
        }
        for tier, options in tiers.items():
            with Cache(fs, root=remote_dir, block_size=read_size, ttl=3600, **options) as cache:
                cache.read("data.bin")  # warm: every block resident in this tier
                for name, shift in shifts.items():
                    offsets = list(range(shift, size - read_size + 1, read_size))
                    rate = _throughput(lambda o: cache.read("data.bin", o, read_size), offsets, rounds)
                    rows.append({"path": f"igtcache {tier} tier", "reads": name, "bytes_per_s": rate,
                                 "target": TARGETS[tier]})
                assert cache.stats()["remote_bytes"] == size, "a benchmark read missed the cache"
    for row in rows:
        row["ratio"] = row["bytes_per_s"] / baseline[row["reads"]]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="igtcache bench engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", type=size_argument, default="256MiB", help="bytes of data read per round (default 256MiB)")
    parser.add_argument("--read-size", type=size_argument, default="4MiB", help="bytes per read and block size (default 4MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per figure; the median is reported (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.size < 2 * args.read_size or args.rounds < 1:
        parser.error("--size must be at least two reads and --rounds at least 1")
    rows = run(args.size, args.read_size, args.rounds)
    if args.json:
        print(json.dumps({"read_size": args.read_size, "size": args.size, "results": rows}, indent=2))
        return 0
    print(f"{format_size(args.read_size)} reads over {format_size(args.size)}, median of {args.rounds} rounds")
    print(f"{'path':<26}{'reads':<11}{'GB/s':>8}{'vs local':>10}{'target':>9}")
    for row in rows:
        target = row.get("target")
        verdict = "" if target is None else f"{'>=' if row['ratio'] >= target else '< '}{target:.0%}"
        print(f"{row['path']:<26}{row['reads']:<11}{row['bytes_per_s'] / 1e9:>8.2f}{row['ratio']:>9.0%} {verdict:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
