"""Trace replay: run cache policies over a trace against a simulated remote.

``igtcache bench replay TRACE.csv --capacity SIZE [--capacity SIZE ...]
--policy lru,arc,... [--block-size SIZE] [--latency-ms MS] [--bandwidth MB_PER_S]
[--demand-first] [--json] [--plot FILE.png]``

Each read goes through :class:`igtcache.read_driver.ReadDriver`, the read
driver of the live engine: the same plan, demand fetches, readahead issued
at the read's time, admission when a block arrives, and the same hit, late,
used and wasted prefetch accounting. Only the fetch backend differs: here a
simulated link with its own clock. Explicit prefetches and read hints in
the trace reach the policy as they did live. Belady's oracle is built from
the trace's block requests; planning a read advances it (through
``Policy.observe``) read by read.

The model:

* Time is the trace's. Reads happen at their ``ts`` (a live trace's times
  already include each reader's waits for its misses); a miss does not
  delay later reads (open loop). Fetches whose bytes arrive by a read's
  ``ts`` are admitted, in arrival order, before that read is planned, so a
  read of a block still in flight, demand or readahead, is a miss.
* One shared link to the remote (:class:`igtcache.bench.link.PriorityLink`):
  a fetch holds it for ``size / bandwidth``, one at a time, and its bytes
  arrive ``latency`` after the transfer ends, in issue order; with
  ``--demand-first`` the link takes the fetch issued by then that is due
  first, a demand fetch being due when issued and readahead one latency
  later, so demand overtakes readahead issued up to a latency before it
  and readahead is never held back longer.
* A read that needs a block still in flight is a miss and waits for that
  fetch (no second fetch; with ``--demand-first`` a queued readahead
  block becomes demand); a prefetch it waits for counts as late.
* Remote bytes count every fetched byte. Wasted prefetch bytes are
  prefetched blocks evicted (or declined by the policy) before any read.

Metrics per policy and capacity, and per job: hit ratio (reads whose every
block was resident when planned), byte hit ratio (requested bytes that lay
in resident blocks), remote bytes, wasted prefetch bytes, late prefetches,
stall (seconds reads waited for the remote: from a read's time to the
arrival of the last block it needed) and completion time (a job's span in
the trace plus its stall: the job's time had each wait delayed the reads
after it; for a run, its longest job's).
Remote and prefetch figures are charged to the job whose read caused the
fetch.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import sys
import time
from typing import Iterable, Iterator, Sequence

from igtcache.bench.link import PriorityLink
from igtcache.bench.trace import TraceRow, load_trace
from igtcache.policies import POLICIES, BlockKey, FutureOracle, Policy
from igtcache.read_driver import Fetch, ReadDriver
from igtcache.residency import block_length, block_span
from igtcache.sizes import format_size, size_argument
from igtcache.stats import JobCounters, ReadCounters

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


class SimulatedBackend:
    """Fetches on a :class:`PriorityLink`, delivered to the driver when the replay's clock passes them.

    It also times each read: a read completes when the last block it waits
    for arrives; its *stall* is that time less its own (the trace's) time.
    """

    def __init__(self, driver: ReadDriver, link: PriorityLink) -> None:
        self.driver = driver
        self.link = link
        self._arrivals: list[tuple[float, int, BlockKey]] = []  # (arrival, seq, key)
        self._seq = itertools.count()
        self._flights: dict[BlockKey, tuple[Fetch, float]] = {}  # key -> (fetch, issue time)
        self._waiters: dict[BlockKey, list[_Wait]] = {}
        self.stall_s: dict[str, float] = {}  # per job

    def start(self, ts: float, fetches: Iterable[Fetch]) -> None:
        for fetch in fetches:
            self._flights[fetch.key] = (fetch, ts)
            self.link.submit(ts, fetch.key, fetch.length, demand=not fetch.prefetched)

    def wait(self, ts: float, job: str, keys: Sequence[BlockKey]) -> None:
        """A read at ``ts`` needs ``keys``, all in flight: it completes when the last arrives."""
        wait = _Wait(ts, job, len(keys))
        for key in keys:
            self.link.promote(key)
            self._waiters.setdefault(key, []).append(wait)

    def deliver_until(self, ts: float) -> None:
        """Admit every fetch that has arrived by ``ts``, in arrival order."""
        for arrival, key in self.link.run_until(ts):
            heapq.heappush(self._arrivals, (arrival, next(self._seq), key))
        while self._arrivals and self._arrivals[0][0] <= ts:
            arrival, _, key = heapq.heappop(self._arrivals)
            fetch, issued = self._flights.pop(key)
            self.driver.arrived(key, fetch.length, arrival - issued)
            for wait in self._waiters.pop(key, ()):
                wait.last = max(wait.last, arrival)
                wait.left -= 1
                if not wait.left:
                    self.stall_s[wait.job] = self.stall_s.get(wait.job, 0.0) + wait.last - wait.ts


class _Wait:
    """A read waiting for ``left`` blocks; ``last`` is the latest arrival so far."""

    __slots__ = ("ts", "job", "left", "last")

    def __init__(self, ts: float, job: str, left: int) -> None:
        self.ts, self.job, self.left, self.last = ts, job, left, ts


def replay_metrics(counters: ReadCounters) -> dict:
    """The replay's figures from a job's (or the total's) counters."""
    return {
        "reads": counters.reads,
        "hit_ratio": counters.hits / counters.reads if counters.reads else 0.0,
        "byte_hit_ratio": counters.bytes_from_cache / counters.bytes_requested if counters.bytes_requested else 0.0,
        "remote_bytes": counters.remote_bytes,
        "wasted_prefetch_bytes": counters.prefetch_wasted_bytes,
        "late_prefetches": counters.prefetch_late,
    }


def _version(row: TraceRow) -> str:
    # Traces carry no ETag: an object's size stands in for its version.
    return str(row.object_size)


def _reads(rows: Iterable[TraceRow]) -> Iterator[TraceRow]:
    return (row for row in rows if row.op == "read")


def block_requests(rows: Iterable[TraceRow], block_size: int) -> Iterator[BlockKey]:
    """Every block key the replay's reads will request, in order (what Belady's oracle needs)."""
    for row in _reads(rows):
        first, last = block_span(row.offset, row.size, row.object_size, block_size)
        version = _version(row)
        for index in range(first, last + 1):
            yield BlockKey(row.path, version, index)


def footprint(rows: Iterable[TraceRow], block_size: int) -> int:
    """Bytes in the distinct blocks a trace reads: the cache size that never evicts."""
    seen: set[BlockKey] = set()
    total = 0
    for row in _reads(rows):
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
    demand_first: bool = False,
) -> dict:
    """Replay a trace with one policy and capacity; return the metrics as a dict.

    The dict has ``policy``, ``capacity``, ``hit_ratio``, ``byte_hit_ratio``,
    ``remote_bytes``, ``wasted_prefetch_bytes``, ``late_prefetches``,
    ``reads``, ``stall_s``, ``completion_s`` (the longest job's), the
    model's parameters, ``elapsed_s`` and ``jobs`` (the same metrics per
    job). ``demand_first``: demand fetches overtake readahead on the link
    (:class:`igtcache.bench.link.PriorityLink`); else one queue in issue order.
    """
    if block_size <= 0:
        raise ValueError(f"block size must be > 0, got {block_size}")
    rows = trace_rows if isinstance(trace_rows, Sequence) else list(trace_rows)
    started = time.perf_counter()
    counters = JobCounters()
    policy = make_replay_policy(policy_name, capacity, rows, block_size)
    driver = ReadDriver(policy, block_size, counters)
    backend = SimulatedBackend(driver, PriorityLink(latency_s, bandwidth_Bps, demand_first=demand_first))
    versions: dict[str, tuple[str, int]] = {}  # path -> (version, object size) last seen
    spans: dict[str, list[float]] = {}  # job -> [first ts, last ts]

    def handle(ts: float, row: TraceRow) -> None:
        """Replay one row at ``ts``."""
        backend.deliver_until(ts)
        version = _version(row)
        old = versions.get(row.path)
        if old is not None and old[0] != version:  # a new version: the old blocks are stale
            old_blocks = (BlockKey(row.path, old[0], i) for i in range(-(-old[1] // block_size)))
            driver.drop([key for key in old_blocks if key in driver.policy])
        versions[row.path] = (version, row.object_size)
        if row.op == "prefetch":
            first, last = block_span(row.offset, row.size, row.object_size, block_size)
            backend.start(ts, driver.prefetch(job=row.job, path=row.path, version=version,
                                              object_size=row.object_size, first=first, last=last))
            return
        plan = driver.plan(ts=ts, job=row.job, path=row.path, version=version, offset=row.offset,
                           size=row.size, object_size=row.object_size, hint=row.hint or None)
        backend.start(ts, plan.fetches)
        if plan.waiting or plan.fetches:
            demand = plan.demand
            if demand:
                backend.wait(ts, row.job, demand)
        span = spans.get(row.job)
        if span is None:
            spans[row.job] = [ts, ts]
        else:
            span[1] = ts
        driver.finish(plan)

    for row in rows:
        handle(row.ts, row)
    backend.deliver_until(math.inf)  # as the live cache's flush() waits for every fetch

    jobs = {}
    for job, c in sorted(counters.jobs.items()):
        stall = backend.stall_s.get(job, 0.0)
        first, last = spans.get(job, (0.0, 0.0))
        jobs[job] = {**replay_metrics(c), "stall_s": stall, "completion_s": last - first + stall}
    return {
        "policy": policy.label,
        "capacity": capacity,
        **replay_metrics(counters.total),
        "stall_s": sum(j["stall_s"] for j in jobs.values()),
        "completion_s": max((j["completion_s"] for j in jobs.values()), default=0.0),
        "block_size": block_size,
        "latency_s": latency_s,
        "bandwidth_Bps": bandwidth_Bps if math.isfinite(bandwidth_Bps) else None,
        "demand_first": demand_first,
        "elapsed_s": round(time.perf_counter() - started, 3),
        "jobs": jobs,
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
    parser.add_argument("--demand-first", action="store_true",
                        help="demand fetches overtake readahead issued up to one latency before them "
                             "(default: one queue in issue order)")
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
            result = replay(rows, name, capacity, args.block_size, args.latency_ms / 1e3, args.bandwidth * 1e6,
                            demand_first=args.demand_first)
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
    head = ("policy", "capacity", "hit", "byte hit", "remote", "wasted pf", "late pf", "stall s", "done s")
    lines = [head]
    job_lines = [("policy", "capacity", "job", "reads", *head[2:])]
    for r in results:
        cap = format_size(r["capacity"])
        lines.append((r["policy"], cap, *_cells(r)))
        for job, j in r["jobs"].items():
            job_lines.append((r["policy"], cap, job, f"{j['reads']:,}", *_cells(j)))
    return _render(lines) + "\n\nper job:\n" + _render(job_lines)


def _cells(m: dict) -> tuple[str, ...]:
    return (f"{m['hit_ratio']:.3f}", f"{m['byte_hit_ratio']:.3f}", format_size(m["remote_bytes"]),
            format_size(m["wasted_prefetch_bytes"]), f"{m['late_prefetches']:,}", f"{m['stall_s']:,.1f}",
            f"{m['completion_s']:,.1f}")


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
