"""Trace replay: run cache policies over a trace against a simulated remote.

``igtcache bench replay TRACE.csv --capacity SIZE [--capacity SIZE ...]
--policy lru,arc,... [--block-size SIZE] [--latency-ms MS] [--bandwidth MB_PER_S]
[--json] [--plot FILE.png]``

Policies run through :class:`igtcache.residency.Residency`, the code path of
the live engine: ``plan()`` for every read, ``admit()`` for every fetched
block, ``prefetch()`` after every read, ``drop()`` for blocks of an object
whose size changed (a new version); like the engine, the replay also tells
the policy each fetch's size and (simulated) duration via
``Policy.observe_fetch``, at issue time. Belady's oracle is built from the
trace's block requests; ``plan()`` advances it (through ``Policy.observe``)
read by read.

The model:

* Time is the trace's. Reads happen at their ``ts``; a miss does not delay
  later reads (open loop), and a block fetched on demand is cached at once.
* One shared link to the remote: a fetch issued at ``t`` starts when the
  link is free, holds it for ``size / bandwidth``, and its bytes arrive
  ``latency`` after the transfer ends. With an idle link a prefetched block
  arrives at ``t + latency + size / bandwidth``. Demand fetches use the link
  too, so they delay later prefetches.
* A read that needs a prefetched block that has not arrived is a miss, and
  the prefetch is counted as late (once per prefetched block). No second
  fetch is issued: the read waits for the one in flight.
* Remote bytes count every fetched byte. Wasted prefetch bytes are
  prefetched blocks evicted (or declined by the policy) before any read.

Metrics per policy and capacity, and per job: hit ratio (reads whose every
block was resident and arrived), byte hit ratio (requested bytes that lay in
resident, arrived blocks), remote bytes, wasted prefetch bytes, late
prefetches. Remote and prefetch figures are charged to the job whose read
caused the fetch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Iterable, Iterator, Sequence

from igtcache.bench.trace import TraceRow, load_trace
from igtcache.policies import POLICIES, BlockKey, FutureOracle, Policy
from igtcache.residency import Residency, block_length, block_span
from igtcache.sizes import format_size, size_argument

DEFAULT_BLOCK_SIZE = 4 * 1024**2
DEFAULT_LATENCY_S = 0.020
DEFAULT_BANDWIDTH_BPS = 2000e6


class RemoteLink:
    """The simulated remote: one FIFO link of ``bandwidth_Bps`` plus ``latency_s`` per fetch."""

    def __init__(self, latency_s: float, bandwidth_Bps: float) -> None:
        if latency_s < 0 or not bandwidth_Bps > 0:
            raise ValueError("latency must be >= 0 and bandwidth > 0")
        self.latency_s = latency_s
        self.bandwidth_Bps = bandwidth_Bps
        self.free_at = 0.0

    def fetch(self, ts: float, nbytes: int) -> float:
        """Issue a fetch at ``ts``; return when its bytes arrive."""
        self.free_at = max(ts, self.free_at) + nbytes / self.bandwidth_Bps
        return self.free_at + self.latency_s


class Tally:
    """Counters for one job (or, summed, for a whole run)."""

    __slots__ = ("reads", "hits", "requested_bytes", "hit_bytes", "remote_bytes",
                 "wasted_prefetch_bytes", "late_prefetches")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def add(self, other: Tally) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return {
            "reads": self.reads,
            "hit_ratio": self.hits / self.reads if self.reads else 0.0,
            "byte_hit_ratio": self.hit_bytes / self.requested_bytes if self.requested_bytes else 0.0,
            "remote_bytes": self.remote_bytes,
            "wasted_prefetch_bytes": self.wasted_prefetch_bytes,
            "late_prefetches": self.late_prefetches,
        }


def _version(row: TraceRow) -> str:
    # Traces carry no ETag: an object's size stands in for its version.
    return str(row.object_size)


def block_requests(rows: Iterable[TraceRow], block_size: int) -> Iterator[BlockKey]:
    """Every block key the replay will request, in order (what Belady's oracle needs)."""
    for row in rows:
        first, last = block_span(row.offset, row.size, row.object_size, block_size)
        version = _version(row)
        for index in range(first, last + 1):
            yield BlockKey(row.path, version, index)


def footprint(rows: Iterable[TraceRow], block_size: int) -> int:
    """Bytes in the distinct blocks a trace reads: the cache size that never evicts."""
    seen: set[BlockKey] = set()
    total = 0
    for row in rows:
        first, last = block_span(row.offset, row.size, row.object_size, block_size)
        for index in range(first, last + 1):
            key = BlockKey(row.path, _version(row), index)
            if key not in seen:
                seen.add(key)
                total += block_length(index, row.object_size, block_size)
    return total


def make_replay_policy(name: str, capacity: int, rows: Sequence[TraceRow], block_size: int) -> Policy:
    """A registered policy by name; Belady gets an oracle over ``rows``."""
    try:
        cls = POLICIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
    if getattr(cls, "needs_oracle", False):
        return cls(capacity, oracle=FutureOracle(block_requests(rows, block_size)))
    return cls(capacity)


def replay(
    trace_rows: Iterable[TraceRow],
    policy_name: str,
    capacity: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    latency_s: float = DEFAULT_LATENCY_S,
    bandwidth_Bps: float = DEFAULT_BANDWIDTH_BPS,
) -> dict:
    """Replay a trace with one policy and capacity; return the metrics as a dict.

    The dict has ``policy``, ``capacity``, ``hit_ratio``, ``byte_hit_ratio``,
    ``remote_bytes``, ``wasted_prefetch_bytes``, ``late_prefetches``,
    ``reads``, the model's parameters, ``elapsed_s`` and ``jobs`` (the same
    metrics per job).
    """
    if block_size <= 0:
        raise ValueError(f"block size must be > 0, got {block_size}")
    rows = trace_rows if isinstance(trace_rows, Sequence) else list(trace_rows)
    started = time.perf_counter()
    residency = Residency(make_replay_policy(policy_name, capacity, rows, block_size), block_size)
    policy = residency.policy
    link = RemoteLink(latency_s, bandwidth_Bps)
    tallies: dict[str, Tally] = {}
    unread: dict[BlockKey, tuple[Tally, int]] = {}  # prefetched, not yet read -> (whose prefetch, bytes)
    arrivals: dict[BlockKey, float] = {}  # prefetched blocks possibly still in flight
    versions: dict[str, tuple[str, int]] = {}  # path -> (version, object size) last read

    def forget(keys: Iterable[BlockKey]) -> None:
        for key in keys:
            arrivals.pop(key, None)
            wasted = unread.pop(key, None)
            if wasted is not None:
                wasted[0].wasted_prefetch_bytes += wasted[1]

    for row in rows:
        ts, job, path, offset, size, object_size = row
        tally = tallies.get(job) or tallies.setdefault(job, Tally())
        version = _version(row)
        old = versions.get(path)
        if old is not None and old[0] != version:  # a new version: the old blocks are stale
            old_blocks = (BlockKey(path, old[0], i) for i in range(-(-old[1] // block_size)))
            stale = [key for key in old_blocks if key in policy]
            for key in stale:
                residency.drop(key)
            forget(stale)
        versions[path] = (version, object_size)

        available = (lambda key: arrivals.get(key, ts) <= ts) if arrivals else None
        plan = residency.plan(ts=ts, job=job, path=path, version=version, offset=offset,
                              size=size, object_size=object_size, available=available)
        end = offset + size
        hit_bytes = 0
        for key in plan.resident:
            arrivals.pop(key, None)
            unread.pop(key, None)
            start = key.index * block_size
            hit_bytes += min(end, start + block_size) - max(offset, start)
        for key in plan.missing:
            if key in policy:  # a prefetch still in flight: wait for it
                prefetcher = unread.pop(key, None)
                if prefetcher is not None:
                    prefetcher[0].late_prefetches += 1
                continue
            length = block_length(key.index, object_size, block_size)
            policy.observe_fetch(length, link.fetch(ts, length) - ts)
            tally.remote_bytes += length
            forget(residency.admit(key, length) or ())

        tally.reads += 1
        tally.requested_bytes += size
        tally.hit_bytes += hit_bytes
        if not plan.missing:
            tally.hits += 1

        for key in residency.prefetch(plan.access):
            length = block_length(key.index, object_size, block_size)
            arrival = link.fetch(ts, length)
            policy.observe_fetch(length, arrival - ts)
            tally.remote_bytes += length
            evicted = residency.admit(key, length, prefetched=True)
            if evicted is None:
                tally.wasted_prefetch_bytes += length
                continue
            unread[key] = (tally, length)
            arrivals[key] = arrival
            forget(evicted)

    total = Tally()
    for t in tallies.values():
        total.add(t)
    return {
        "policy": policy_name,
        "capacity": capacity,
        **total.as_dict(),
        "block_size": block_size,
        "latency_s": latency_s,
        "bandwidth_Bps": bandwidth_Bps if math.isfinite(bandwidth_Bps) else None,
        "elapsed_s": round(time.perf_counter() - started, 3),
        "jobs": {job: t.as_dict() for job, t in sorted(tallies.items())},
    }


# --- command line -----------------------------------------------------------


def _capacity(text: str) -> str | int:
    """``"10%"`` (of the trace's footprint) stays text; anything else must be a size."""
    text = text.strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
        if not 0 < percent:
            raise argparse.ArgumentTypeError(f"capacity must be > 0%, got {text!r}")
        return text
    return size_argument(text)


def _positive_size(text: str) -> int:
    value = size_argument(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igtcache bench replay",
        description="Replay an access trace through cache policies over a simulated remote.",
        epilog=__doc__.split("\n\n", 3)[3], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("trace", metavar="TRACE.csv", help="trace file (see igtcache bench gen)")
    parser.add_argument("--capacity", action="append", type=_capacity, required=True, metavar="SIZE",
                        help="cache size, e.g. 8GiB, or a percentage of the trace's footprint "
                             "(bytes of distinct blocks read), e.g. 10%%; repeat for several")
    parser.add_argument("--policy", action="append", metavar="NAME[,NAME...]",
                        help=f"policies to compare (default all: {','.join(POLICIES)}); repeatable")
    parser.add_argument("--block-size", type=_positive_size, default=DEFAULT_BLOCK_SIZE, metavar="SIZE",
                        help="cache block size (default 4MiB)")
    parser.add_argument("--latency-ms", type=float, default=DEFAULT_LATENCY_S * 1e3, metavar="MS",
                        help=f"remote latency per fetch (default {DEFAULT_LATENCY_S * 1e3:g})")
    parser.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH_BPS / 1e6, metavar="MB_PER_S",
                        help=f"remote bandwidth in MB/s, shared by all fetches "
                             f"(default {DEFAULT_BANDWIDTH_BPS / 1e6:g}; 'inf' for unlimited)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--plot", metavar="FILE.png", help="draw hit ratio against capacity, one line per policy")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``igtcache bench replay``: returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    names = [n.strip().lower() for group in (args.policy or [",".join(POLICIES)]) for n in group.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown or not names:
        parser.error(f"unknown policy {', '.join(map(repr, unknown))}; known: {', '.join(POLICIES)}")
    if args.latency_ms < 0 or not args.bandwidth > 0:
        parser.error("--latency-ms must be >= 0 and --bandwidth > 0")

    started = time.perf_counter()
    try:
        rows = load_trace(args.trace)
    except (OSError, ValueError) as e:
        print(f"igtcache bench replay: {e}", file=sys.stderr)
        return 1
    _note(f"loaded {len(rows):,} reads in {time.perf_counter() - started:.1f} s")
    if any(isinstance(c, str) for c in args.capacity):
        total = footprint(rows, args.block_size)
        _note(f"footprint {format_size(total)} at {format_size(args.block_size)} blocks")
    capacities = sorted({
        int(total * float(c[:-1]) / 100) if isinstance(c, str) else c for c in args.capacity
    })

    results = []
    for name in dict.fromkeys(names):
        for capacity in capacities:
            result = replay(rows, name, capacity, args.block_size, args.latency_ms / 1e3, args.bandwidth * 1e6)
            _note(f"{name} @ {format_size(capacity)}: hit ratio {result['hit_ratio']:.3f} "
                  f"({result['elapsed_s']:.1f} s)")
            results.append(result)

    if args.json:
        print(json.dumps({"results": results}, indent=2))
    else:
        print(format_table(results))
    if args.plot:
        plot(results, args.plot, title=args.trace)
    return 0


def _note(text: str) -> None:
    print(f"replay: {text}", file=sys.stderr, flush=True)


def format_table(results: list[dict]) -> str:
    """Results as a readable text table: one line per run, then one per run and job."""
    head = ("policy", "capacity", "hit", "byte hit", "remote", "wasted pf", "late pf")
    lines = [head]
    job_lines = [("policy", "capacity", "job", "reads", "hit", "byte hit", "remote", "wasted pf", "late pf")]
    for r in results:
        cap = format_size(r["capacity"])
        lines.append((r["policy"], cap, *_cells(r)))
        for job, j in r["jobs"].items():
            job_lines.append((r["policy"], cap, job, f"{j['reads']:,}", *_cells(j)))
    return _render(lines) + "\n\nper job:\n" + _render(job_lines)


def _cells(m: dict) -> tuple[str, ...]:
    return (f"{m['hit_ratio']:.3f}", f"{m['byte_hit_ratio']:.3f}", format_size(m["remote_bytes"]),
            format_size(m["wasted_prefetch_bytes"]), f"{m['late_prefetches']:,}")


def _render(lines: list[tuple[str, ...]]) -> str:
    """Align columns: names to the left, numbers to the right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    left = [name in ("policy", "capacity", "job") for name in lines[0]]
    return "\n".join(
        "  ".join(cell.ljust(w) if l else cell.rjust(w) for cell, w, l in zip(line, widths, left)).rstrip()
        for line in lines
    )


def plot(results: list[dict], path: str, title: str = "") -> None:
    """Save a PNG of hit ratio against capacity, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["policy"] for r in results):
        points = sorted((r["capacity"], r["hit_ratio"]) for r in results if r["policy"] == name)
        ax.plot([c / 1024**3 for c, _ in points], [h for _, h in points], marker="o", label=name)
    ax.set_xlabel("capacity (GiB)")
    ax.set_ylabel("hit ratio")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
