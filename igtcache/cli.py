"""The ``igtcache`` command line: each subcommand is a module with ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module with main(argv), one line of help)
COMMANDS = {
    "demo": ("igtcache.demo", "a training-like job through the cache on a local S3 server (no cloud account)"),
    "bench": ("igtcache.cli", "benchmarks that print a figure next to a baseline from the same run"),
    "mount": ("igtcache.fuse.cli", "mount a remote as a file system read through the cache (FUSE)"),
    "unmount": ("igtcache.fuse.unmount", "unmount an igtcache mount, lazily if files are still open"),
    "serve": ("igtcache.daemon.serve", "run the node daemon: one cache shared by every job, on a Unix socket"),
    "stats": ("igtcache.stats_cmd", "what the daemon is doing: tiers, hit ratios, jobs, streams (--watch)"),
    "warm": ("igtcache.warm", "load a dataset into the node cache with progress; --check coverage, --evict"),
    "cluster": ("igtcache.redis_cluster", "a local Redis Cluster for the cluster tier: up, down, status"),
    "lora": ("igtcache.clients.materialize", "LoRA adapters for inference engines: materialize NAME DIR"),
}

# ``igtcache bench NAME ...`` runs ``igtcache.bench.NAME.main(args)`` (``-`` in NAME read as ``_``).
BENCHMARKS = {
    "engine": "hit-path throughput of the memory and disk tiers next to a local file in page cache",
    "classify": "classifier accuracy at 32..1024 accesses, record() cost next to a dict update, tree memory",
    "policy": "CPU per read of the tree and IGT, read by read and in batches of reported hits, next to a dict update",
    "daemon": "hit path and miss latency of the igtcache:: fsspec plugin, attached and embedded, vs local file and s3fs",
    "fuse": "sequential 1 MiB and random 4 KiB reads through the FUSE mount on cached data, next to a local file",
    "lora": "multi-LoRA serving: dependency tree + cost model vs vLLM- and S-LoRA-style pools (KV hit, TTFT)",
    "serve": "a real tiny Llama serving PEFT adapters from S3: TTFT of LoraKVCache vs vLLM-/S-LoRA-style, logits checked",
    "gpu": "on a CUDA device: pinned pool copies vs bare pinned copy_, the CUDA tests, the serving benchmark",
    "gen": "write an AI-cluster access trace (CSV) for a scenario: preprocess, imagefolder, shards, ... mix",
    "replay": "replay a trace through the policies (the live cache's code) over a simulated remote",
    "replay-cluster": "replay a cluster trace: a policy per node, a shared cluster tier (Redis LRU/LFU), one remote",
    "e2e": "job completion time of a scenario's concurrent jobs reading from S3 via a shaping proxy, per contender",
    "cluster": "N node daemons sharing a Redis Cluster over one S3 link: remote bytes and makespan vs node-local",
    "soak": "fault soak: every reader kind under seeded daemon, S3, disk and LMDB faults; wrong bytes, stalls, recovery",
}


def _usage() -> str:
    lines = ["igtcache: a unified, pattern-aware data cache for AI clusters.", "", "commands:"]
    lines += [f"  {name:<8}{text}" for name, (_module, text) in COMMANDS.items()]
    lines += ["", "`igtcache COMMAND --help` explains a command's options.",
              'Python API: igtcache.Cache("s3://bucket/prefix", cache_dir=..., memory_bytes=...)']
    return "\n".join(lines)


def bench(argv: list[str]) -> int:
    """``igtcache bench NAME [options]``."""
    parser = argparse.ArgumentParser(
        prog="igtcache bench",
        description="Run a benchmark; each prints its figures next to a baseline from the same run.",
        epilog="benchmarks:\n" + "\n".join(f"  {name:<16}{text}" for name, text in BENCHMARKS.items())
        + "\n\n`igtcache bench NAME --help` shows a benchmark's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME", help="which benchmark")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options for that benchmark")
    ns = parser.parse_args(argv)
    return importlib.import_module(f"igtcache.bench.{ns.name.replace('-', '_')}").main(ns.args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before numpy loads: the classifier's small arrays gain nothing from BLAS threads,
    # which would otherwise spin beside the daemon's and the mount's own threads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    logging.basicConfig(level=logging.WARNING, format="igtcache: %(levelname)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"igtcache: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        if command == "bench":
            return bench(rest)
        return importlib.import_module(COMMANDS[command][0]).main(rest)
    except SystemExit as exc:
        if exc.code == 2:  # argparse has printed what it could not take
            words = [command, rest[0]] if command == "bench" and rest and rest[0] in BENCHMARKS else [command]
            print(f"igtcache: `igtcache {' '.join(words)} --help` lists what it takes", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
