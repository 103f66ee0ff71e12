"""``igtcache demo``: a training-like job read through the cache, end to end.

Starts a local S3 server (moto, on 127.0.0.1), uploads a generated dataset,
then reads it for a few epochs in shuffled order through ``igtcache.Cache``
with a memory tier and an LMDB disk tier smaller than the dataset, printing
hit ratios and remote traffic as it goes. It ends by reopening the cache, as a
restarted job would, to show the disk tier's blocks served again.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time

from igtcache import Cache
from igtcache.local_s3 import LocalS3
from igtcache.policies import LIVE_POLICIES
from igtcache.sizes import format_size, size_argument

BUCKET = "igtcache-demo"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igtcache demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: igtcache demo --files 64 --file-size 1MiB --disk 24MiB --epochs 4",
    )
    parser.add_argument("--files", type=int, default=48, help="objects in the dataset (default 48)")
    parser.add_argument("--file-size", type=size_argument, default="1MiB", help="size of each object (default 1MiB)")
    parser.add_argument("--epochs", type=int, default=3, help="shuffled passes over the dataset (default 3)")
    parser.add_argument("--memory", type=size_argument, default="8MiB", help="memory tier (default 8MiB)")
    parser.add_argument("--disk", type=size_argument, default="32MiB", help="disk tier (default 32MiB)")
    parser.add_argument("--block-size", type=size_argument, default="1MiB", help="cache block size (default 1MiB)")
    parser.add_argument("--read-size", type=size_argument, default="1MiB", help="bytes per read call (default 1MiB)")
    parser.add_argument("--policy", default="igt", choices=LIVE_POLICIES,
                        help="eviction policy (default igt; try lru to compare)")
    parser.add_argument("--cache-dir", help="where the disk tier lives (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    return parser


def _epoch(cache: Cache, names: list[str], read_size: int, rng: random.Random) -> None:
    order = names[:]
    rng.shuffle(order)
    for name in order:
        size = cache.info(name)["size"]
        for offset in range(0, size, read_size):
            cache.read(name, offset, read_size, job="train")


def _report(label: str, before: dict, after: dict, seconds: float) -> None:
    reads = after["reads"] - before["reads"]
    hits = after["hits"] - before["hits"]
    requested = after["bytes_requested"] - before["bytes_requested"]
    cached = after["bytes_from_cache"] - before["bytes_from_cache"]
    remote = after["remote_bytes"] - before["remote_bytes"]
    print(
        f"{label:<22} reads {reads:>5}  hit ratio {hits / max(reads, 1):5.2f}  "
        f"byte hit ratio {cached / max(requested, 1):5.2f}  remote {format_size(remote):>10}  {seconds:5.2f} s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.files <= 0 or args.epochs <= 0 or args.read_size <= 0:
        print("igtcache demo: --files, --epochs and --read-size must be positive", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    with LocalS3() as server, tempfile.TemporaryDirectory(prefix="igtcache-demo-") as scratch:
        server.create_bucket(BUCKET)
        fs = server.filesystem()
        names = [f"train/sample-{i:05d}.bin" for i in range(args.files)]
        print(f"local S3 server (moto) at {server.endpoint}; uploading {args.files} objects "
              f"of {format_size(args.file_size)} to s3://{BUCKET}/train ...", flush=True)
        for name in names:
            fs.pipe_file(f"{BUCKET}/{name}", rng.randbytes(args.file_size))
        cache_dir = args.cache_dir or f"{scratch}/cache"
        options = dict(root=BUCKET, cache_dir=cache_dir, memory_bytes=args.memory, disk_bytes=args.disk,
                       block_size=args.block_size, policy=args.policy, ttl=3600)
        print(f"cache: memory {format_size(args.memory)} + disk {format_size(args.disk)} (LMDB in {cache_dir}), "
              f"block {format_size(args.block_size)}, policy {args.policy}; "
              f"dataset {format_size(args.files * args.file_size)}", flush=True)
        with Cache(fs, **options) as cache:
            for epoch in range(1, args.epochs + 1):
                before, started = cache.stats(), time.perf_counter()
                _epoch(cache, names, args.read_size, rng)
                _report(f"epoch {epoch}/{args.epochs}", before, cache.stats(), time.perf_counter() - started)
            final = cache.stats()
        print(f"total: hit ratio {final['hit_ratio']:.2f}, byte hit ratio {final['byte_hit_ratio']:.2f}, "
              f"remote {format_size(final['remote_bytes'])}, evictions {final['evictions']}", flush=True)
        with Cache(fs, **options) as cache:
            before, started = cache.stats(), time.perf_counter()
            _epoch(cache, names, args.read_size, rng)
            _report("after restart", before, cache.stats(), time.perf_counter() - started)
    return 0
