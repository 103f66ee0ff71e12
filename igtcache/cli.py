"""The ``igtcache`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# ``igtcache bench NAME ...`` runs ``igtcache.bench.NAME.main(args)``.
BENCHMARKS = {
    "engine": "hit-path throughput of the memory and disk tiers next to a local file in page cache",
}

DESCRIPTION = """\
igtcache: a unified, pattern-aware data cache for AI clusters.

subcommands:
  demo    run a small training-like workload through the cache against a local
          S3 server it starts itself (no cloud account needed), printing hit
          ratios epoch by epoch; see `igtcache demo --help`
  bench   benchmarks that print a figure next to a baseline measured in the
          same run: """ + ", ".join(BENCHMARKS) + """; see `igtcache bench --help`

Python API: igtcache.Cache("s3://bucket/prefix", cache_dir=..., memory_bytes=...)
"""


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="igtcache bench",
        description="Run a benchmark; each prints its figures next to a baseline from the same run.",
        epilog="benchmarks:\n" + "\n".join(f"  {name:<10}{text}" for name, text in BENCHMARKS.items())
        + "\n\n`igtcache bench NAME --help` shows a benchmark's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME", help="which benchmark")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options for that benchmark")
    ns = parser.parse_args(argv)
    module = importlib.import_module(f"igtcache.bench.{ns.name}")
    return module.main(ns.args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="igtcache: %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="igtcache", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["demo", "bench"], metavar="COMMAND", help="demo | bench")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if not argv:
        parser.print_help()
        return 2
    ns = parser.parse_args(argv[:1])
    rest = argv[1:]
    if ns.command == "bench":
        return _bench(rest)
    from igtcache import demo

    return demo.main(rest)


if __name__ == "__main__":
    sys.exit(main())
