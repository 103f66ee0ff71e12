"""Cluster replay: N nodes, each running a policy, share a cluster tier in front of one remote.

``igtcache bench replay-cluster TRACE.csv --policy igt,lru --node-capacity SIZE
--cluster-capacity SIZE[,SIZE...] [--nodes N] [--cluster-eviction lru|lfu]
[--publish policy|everything] [--target 0.95] [--json]``

TRACE.csv is a cluster trace: every row's job reads ``nodeK/JOBNAME`` (see
``igtcache bench gen cluster-train`` and ``cluster-adapters``). Every node
runs its own ReadDriver and policy over its rows, exactly as ``igtcache
bench replay`` runs one; the nodes' rows are taken in the trace's global
time order, and before each read every fetch that has arrived by its time is
delivered, across all nodes, in arrival order.

The model:

* Remote: one FIFO link (--bandwidth, --latency-ms) shared by every node,
  as in ``igtcache bench replay``.
* Cluster tier: --cluster-capacity bytes of block data (Redis maxmemory,
  value bytes only) evicting like allkeys-lru (exact LRU; Redis samples
  keys) or allkeys-lfu (Redis's logarithmic counter: log factor 10, new
  keys at 5, one step of decay per idle minute; the exact minimum is evicted
  where Redis takes the best of a sample). Each node reaches it over its own
  FIFO link (--cluster-latency-ms, --cluster-bandwidth MB/s). A cluster
  capacity of 0 means no cluster tier: nodes go straight to the remote.
* A node's fetch (demand or readahead) looks in the cluster tier when it is
  issued. A hit arrives after the node's cluster link delivers it (source
  "cluster"). A miss takes the block's cluster-wide lease and fetches from
  the remote three cluster round trips later (GET, SET NX, GET again); on
  arrival the block is published if the node's policy finds it worth sharing
  (--publish policy) or always (--publish everything), and stored one cluster
  access later, when the lease is released.
* Single-flight: a node that misses while another node holds the lease polls
  as ClusterTier.wait_published does (5 ms, doubling to 100 ms). At its first
  poll after the lease is released it reads the block from the cluster tier,
  or, when none was stored (not published, or evicted already), fetches it
  from the remote itself. A lease expires --lease-ms after it was taken;
  waiters then fetch for themselves.

Figures per contender (policy and publish mode) and cluster capacity: remote
bytes over distinct bytes (those of the distinct blocks the trace reads),
node hit ratio (reads whose every block was resident on the node), cluster
hit ratio (node fetches the cluster tier served), combined hit ratio (1 -
remote bytes / requested bytes: the share of the bytes read that did not
cross the remote link), what was published, evicted and waited for. Then,
for each contender, the smallest cluster capacity whose combined hit ratio
reaches --target, by bisection over [0, distinct bytes] (assuming the ratio
grows with capacity), to within 1/64 of the distinct bytes.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import sys
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from igtcache.bench.cluster_traces import node_of, split_by_node
from igtcache.bench.replay import (
    DEFAULT_BANDWIDTH_BPS, DEFAULT_BLOCK_SIZE, DEFAULT_LATENCY_S, RemoteLink, _capacity, _render, _version,
    footprint, make_replay_policy, replay_metrics,
)
from igtcache.bench.trace import TraceRow, load_trace
from igtcache.cluster_tier import WAIT_POLL_MAX, WAIT_POLL_START
from igtcache.policies import POLICIES, BlockKey
from igtcache.read_driver import Fetch, ReadDriver
from igtcache.residency import block_span
from igtcache.sizes import format_size
from igtcache.stats import JobCounters

DEFAULT_CLUSTER_LATENCY_S = 0.0005
DEFAULT_CLUSTER_BANDWIDTH_BPS = 1000e6
DEFAULT_LEASE_S = 2.0  # ClusterTier's lease_ms
DEFAULT_TARGET = 0.95
MISS_ROUND_TRIPS = 3  # GET (a miss), SET NX (the lease), GET again: then the remote
EVICTIONS = ("lru", "lfu")
PUBLISH = ("policy", "everything")
LFU_INIT_VAL, LFU_LOG_FACTOR, LFU_DECAY_S = 5, 10, 60.0  # Redis's defaults


# --- the cluster tier's contents ----------------------------------------------


class SharedTier(ABC):
    """Blocks held by the cluster tier, at most ``capacity`` bytes; subclasses choose victims."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self.sizes: dict[BlockKey, int] = {}
        self.evicted = 0

    def __contains__(self, key: BlockKey) -> bool:
        return key in self.sizes

    def get(self, key: BlockKey, now: float) -> bool:
        """A GET at ``now``: whether the block is there (a hit is an access)."""
        if key not in self.sizes:
            return False
        self._accessed(key, now)
        return True

    def put(self, key: BlockKey, size: int, now: float) -> bool:
        """A SET at ``now``, evicting until the block fits; ``False`` if it exceeds the tier."""
        if size > self.capacity:
            return False
        if key in self.sizes:  # another node's copy of the same block: an overwrite
            self._accessed(key, now)
            return True
        while self.used + size > self.capacity:
            victim = self._victim()
            self.used -= self.sizes.pop(victim)
            self._forget(victim)
            self.evicted += 1
        self.sizes[key] = size
        self.used += size
        self._stored(key, now)
        return True

    @abstractmethod
    def _accessed(self, key: BlockKey, now: float) -> None:
        """A resident block was read, or written again."""

    @abstractmethod
    def _stored(self, key: BlockKey, now: float) -> None:
        """A new block is resident."""

    @abstractmethod
    def _victim(self) -> BlockKey:
        """The resident block to evict next."""

    @abstractmethod
    def _forget(self, key: BlockKey) -> None:
        """Drop an evicted block's bookkeeping."""


class LRUTier(SharedTier):
    """allkeys-lru, exact: the least recently read or written block goes first."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[BlockKey, None] = OrderedDict()

    def _accessed(self, key: BlockKey, now: float) -> None:
        self._order.move_to_end(key)

    def _stored(self, key: BlockKey, now: float) -> None:
        self._order[key] = None

    def _victim(self) -> BlockKey:
        return next(iter(self._order))

    def _forget(self, key: BlockKey) -> None:
        del self._order[key]


class LFUTier(SharedTier):
    """allkeys-lfu with Redis's counter: a new key starts at 5; an access first takes one
    off per minute since the counter last changed, then adds one with probability
    1 / ((counter - 5) * 10 + 1). The victim is the lowest decayed counter, least
    recently accessed first among equals (Redis: the lowest of a sample)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity)
        self._rng = random.Random(seed)
        self._stamps = itertools.count()
        self._state: dict[BlockKey, tuple[int, int, float, int]] = {}  # counter, minute, last access, stamp
        # (counter + minute, last access, stamp, key): a decayed counter is max(0, counter + minute - now),
        # so this order is the order of decayed counters at any time; stale stamps are skipped.
        self._heap: list[tuple[int, float, int, BlockKey]] = []

    def counter(self, key: BlockKey, now: float) -> int:
        """The block's counter as Redis would read it at ``now`` (decayed)."""
        counter, minute, _, _ = self._state[key]
        return max(0, counter - (int(now // LFU_DECAY_S) - minute))

    def _accessed(self, key: BlockKey, now: float) -> None:
        counter = self.counter(key, now)
        if counter < 255 and self._rng.random() < 1 / (max(0, counter - LFU_INIT_VAL) * LFU_LOG_FACTOR + 1):
            counter += 1
        self._set(key, counter, now)

    def _stored(self, key: BlockKey, now: float) -> None:
        self._set(key, LFU_INIT_VAL, now)

    def _set(self, key: BlockKey, counter: int, now: float) -> None:
        minute, stamp = int(now // LFU_DECAY_S), next(self._stamps)
        self._state[key] = (counter, minute, now, stamp)
        heapq.heappush(self._heap, (counter + minute, now, stamp, key))
        if len(self._heap) > 4 * len(self._state) + 1024:
            self._heap = [(c + m, last, s, k) for k, (c, m, last, s) in self._state.items()]
            heapq.heapify(self._heap)

    def _victim(self) -> BlockKey:
        while True:
            _, _, stamp, key = self._heap[0]
            state = self._state.get(key)
            if state is not None and state[3] == stamp:
                return key
            heapq.heappop(self._heap)

    def _forget(self, key: BlockKey) -> None:
        del self._state[key]


def make_tier(eviction: str, capacity: int) -> SharedTier:
    """The cluster tier's contents under ``eviction`` (``"lru"`` or ``"lfu"``)."""
    tiers = {"lru": LRUTier, "lfu": LFUTier}
    if eviction not in tiers:
        raise ValueError(f"unknown cluster eviction {eviction!r}; choose from {', '.join(EVICTIONS)}")
    return tiers[eviction](capacity)


# --- the cluster replay ---------------------------------------------------------


@dataclass(frozen=True)
class ClusterParams:
    """The cluster tier as modelled: its size, eviction, link from each node, lease and publishing."""

    capacity: int
    eviction: str = "lru"
    latency_s: float = DEFAULT_CLUSTER_LATENCY_S
    bandwidth_Bps: float = DEFAULT_CLUSTER_BANDWIDTH_BPS
    lease_s: float = DEFAULT_LEASE_S
    publish: str = "policy"

    def __post_init__(self) -> None:
        if self.capacity < 0 or self.latency_s < 0 or not self.bandwidth_Bps > 0 or not self.lease_s > 0:
            raise ValueError("cluster capacity and latency must be >= 0, bandwidth and lease time > 0")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"unknown cluster eviction {self.eviction!r}; choose from {', '.join(EVICTIONS)}")
        if self.publish not in PUBLISH:
            raise ValueError(f"unknown publish mode {self.publish!r}; choose from {', '.join(PUBLISH)}")


class _Node:
    """One node: its read driver and policy, its link to the cluster tier, the versions it has seen."""

    def __init__(self, driver: ReadDriver, cluster_link: RemoteLink) -> None:
        self.driver = driver
        self.link = cluster_link
        self.versions: dict[str, tuple[str, int]] = {}  # path -> (version, object size) last seen


@dataclass
class _Waiter:
    """A node's fetch waiting for another node's, polling from ``since``."""

    node: _Node
    fetch: Fetch
    issued: float
    since: float


@dataclass
class _Lease:
    """A block's cluster-wide lease: taken by the node that fetches it from the remote."""

    key: BlockKey
    expires: float
    waiters: list[_Waiter] = field(default_factory=list)


class ClusterReplay:
    """Nodes replaying their rows, each a ReadDriver over its own policy, sharing one cluster
    tier and one remote link; see the module's docstring for the model."""

    def __init__(self, node_rows: Sequence[Sequence[TraceRow]], policy_name: str, node_capacity: int,
                 cluster: ClusterParams, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 latency_s: float = DEFAULT_LATENCY_S, bandwidth_Bps: float = DEFAULT_BANDWIDTH_BPS) -> None:
        if block_size <= 0:
            raise ValueError(f"block size must be > 0, got {block_size}")
        self.block_size = block_size
        self.cluster = cluster
        self.counters = JobCounters()
        self.nodes = [
            _Node(ReadDriver(make_replay_policy(policy_name, node_capacity, rows, block_size), block_size,
                             self.counters), RemoteLink(cluster.latency_s, cluster.bandwidth_Bps))
            for rows in node_rows
        ]
        self.remote = RemoteLink(latency_s, bandwidth_Bps)
        self.tier = make_tier(cluster.eviction, cluster.capacity) if cluster.capacity else None
        self.leases: dict[BlockKey, _Lease] = {}
        self.figures: Counter[str] = Counter()
        self._events: list[tuple[float, int, Callable, tuple]] = []
        self._seq = itertools.count()

    def run(self, rows: Sequence[TraceRow], progress: Callable[[float], None] | None = None) -> None:
        """Replay the whole trace (all nodes' rows in time order); ``progress`` gets the fraction done."""
        node_by_job: dict[str, _Node] = {}
        for n, row in enumerate(rows):
            node = node_by_job.get(row.job)
            if node is None:
                node = node_by_job[row.job] = self.nodes[node_of(row.job)]
            self._deliver_until(row.ts)
            self._read(node, row)
            if progress is not None and n % 4096 == 0:
                progress(n / len(rows))
        self._deliver_until(math.inf)

    # Each read as bench/replay.py's replay() handles it, on the row's node.
    def _read(self, node: _Node, row: TraceRow) -> None:
        driver, ts, version = node.driver, row.ts, _version(row)
        old = node.versions.get(row.path)
        if old is not None and old[0] != version:  # a new version: the old blocks are stale
            old_blocks = (BlockKey(row.path, old[0], i) for i in range(-(-old[1] // self.block_size)))
            driver.drop([key for key in old_blocks if key in driver.policy])
        node.versions[row.path] = (version, row.object_size)
        if row.op == "prefetch":
            first, last = block_span(row.offset, row.size, row.object_size, self.block_size)
            fetches = driver.prefetch(job=row.job, path=row.path, version=version,
                                      object_size=row.object_size, first=first, last=last)
            for fetch in fetches:
                self._fetch(node, fetch, ts)
            return
        plan = driver.plan(ts=ts, job=row.job, path=row.path, version=version, offset=row.offset,
                           size=row.size, object_size=row.object_size, hint=row.hint or None)
        for fetch in plan.fetches:
            self._fetch(node, fetch, ts)
        driver.finish(plan)

    # --- events ---

    def _at(self, when: float, action: Callable, *args) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action, args))

    def _deliver_until(self, ts: float) -> None:
        """Run every event due by ``ts``, in time order (the ones they schedule too)."""
        while self._events and self._events[0][0] <= ts:
            when, _, action, args = heapq.heappop(self._events)
            action(when, *args)

    # --- fetches ---

    def _fetch(self, node: _Node, fetch: Fetch, ts: float) -> None:
        if self.tier is None:
            self._from_remote(node, fetch, ts, ts, None)
        elif self.tier.get(fetch.key, ts):
            self._from_cluster(node, fetch, ts, ts)
        else:
            rtt = self.cluster.latency_s
            lease = self.leases.get(fetch.key)
            if lease is not None and lease.expires <= ts:  # expired unnoticed: nobody was waiting
                self._release(lease.expires, lease)
                lease = None
            if lease is None:
                lease = self.leases[fetch.key] = _Lease(fetch.key, ts + rtt + self.cluster.lease_s)
                self._from_remote(node, fetch, ts, ts + MISS_ROUND_TRIPS * rtt, lease)
            else:
                if not lease.waiters:  # its expiry matters once someone waits for it
                    self._at(lease.expires, self._release, lease)
                self.figures["waits"] += 1
                lease.waiters.append(_Waiter(node, fetch, ts, ts + 2 * rtt))

    def _from_remote(self, node: _Node, fetch: Fetch, issued: float, start: float, lease: _Lease | None) -> None:
        self._at(self.remote.fetch(start, fetch.length), self._remote_arrived, node, fetch, issued, lease)

    def _from_cluster(self, node: _Node, fetch: Fetch, issued: float, start: float) -> None:
        self._at(node.link.fetch(start, fetch.length), self._arrived, node, fetch, issued, "cluster")

    def _arrived(self, now: float, node: _Node, fetch: Fetch, issued: float, source: str) -> None:
        node.driver.arrived(fetch.key, fetch.length, now - issued, source=source)

    def _remote_arrived(self, now: float, node: _Node, fetch: Fetch, issued: float, lease: _Lease | None) -> None:
        if self.tier is None:
            self._arrived(now, node, fetch, issued, "remote")
            return
        # Asked before the node admits the block, as the engine's ClusterSource asks.
        share = self.cluster.publish == "everything" or node.driver.policy.worth_sharing(fetch.key)
        self._arrived(now, node, fetch, issued, "remote")
        if share:
            self.figures["published"] += 1
            self.figures["published_bytes"] += fetch.length
            stored = now + self.cluster.latency_s + fetch.length / self.cluster.bandwidth_Bps
            self._at(stored, self._stored, fetch, lease)
        else:
            self.figures["not_published"] += 1
            self._release(now, lease)

    def _stored(self, now: float, fetch: Fetch, lease: _Lease | None) -> None:
        self.tier.put(fetch.key, fetch.length, now)
        self._release(now, lease)

    def _release(self, now: float, lease: _Lease | None) -> None:
        """The lease is gone (released, or expired): each waiter looks again at its next poll."""
        if lease is None or self.leases.get(lease.key) is not lease:
            return  # released already, or it was a fetch without a lease
        del self.leases[lease.key]
        if now >= lease.expires:
            self.figures["leases_expired"] += 1
        for waiter in lease.waiters:
            self._at(self._next_poll(waiter, now), self._poll, waiter)

    def _next_poll(self, waiter: _Waiter, now: float) -> float:
        """The first of the waiter's polls at or after ``now`` (its last is at its deadline)."""
        poll, delay, deadline = waiter.since, WAIT_POLL_START, waiter.since + self.cluster.lease_s
        while poll < now and poll < deadline:
            poll = min(poll + delay, deadline)
            delay = min(2 * delay, WAIT_POLL_MAX)
        return max(poll, now)

    def _poll(self, now: float, waiter: _Waiter) -> None:
        if self.tier.get(waiter.fetch.key, now):
            self.figures["waits_served"] += 1
            self._from_cluster(waiter.node, waiter.fetch, waiter.issued, now)
        else:  # nothing was stored: fetch it ourselves, publishing as any fetch does
            self._from_remote(waiter.node, waiter.fetch, waiter.issued, now, None)

    # --- figures ---

    def result(self) -> dict:
        """The figures: overall (as ``replay()`` reports them, plus the cluster's) and per job."""
        total = self.counters.total
        fetches = total.cluster_fetches + total.remote_fetches
        return {
            **replay_metrics(total),
            "bytes_requested": total.bytes_requested,
            "cluster_bytes": total.cluster_bytes,
            "cluster_hit_ratio": total.cluster_fetches / fetches if fetches else 0.0,
            "combined_hit_ratio": max(0.0, 1 - total.remote_bytes / total.bytes_requested)
            if total.bytes_requested else 0.0,
            "published": self.figures["published"],
            "published_bytes": self.figures["published_bytes"],
            "not_published": self.figures["not_published"],
            "cluster_evictions": self.tier.evicted if self.tier is not None else 0,
            "waits": self.figures["waits"],
            "waits_served": self.figures["waits_served"],
            "leases_expired": self.figures["leases_expired"],
            "jobs": {job: {**replay_metrics(c), "cluster_bytes": c.cluster_bytes}
                     for job, c in sorted(self.counters.jobs.items())},
        }


def replay_cluster(
    rows: Sequence[TraceRow],
    policy_name: str,
    node_capacity: int,
    cluster: ClusterParams,
    *,
    nodes: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    latency_s: float = DEFAULT_LATENCY_S,
    bandwidth_Bps: float = DEFAULT_BANDWIDTH_BPS,
    distinct_bytes: int | None = None,
    progress: Callable[[float], None] | None = None,
) -> dict:
    """Replay a cluster trace on ``nodes`` nodes (default: as many as it names) with one policy
    per node and a shared tier; return the figures as a dict (see :meth:`ClusterReplay.result`)
    with the parameters, ``distinct_bytes`` (computed unless given), ``remote_over_distinct``
    and ``elapsed_s``."""
    started = time.perf_counter()
    rows = rows if isinstance(rows, Sequence) else list(rows)
    node_rows = split_by_node(rows, nodes)
    sim = ClusterReplay(node_rows, policy_name, node_capacity, cluster, block_size=block_size,
                        latency_s=latency_s, bandwidth_Bps=bandwidth_Bps)
    sim.run(rows, progress)
    distinct = footprint(rows, block_size) if distinct_bytes is None else distinct_bytes
    out = sim.result()
    return {
        "policy": policy_name,
        "publish": cluster.publish,
        "nodes": len(node_rows),
        "node_capacity": node_capacity,
        "cluster_capacity": cluster.capacity,
        "cluster_eviction": cluster.eviction,
        "distinct_bytes": distinct,
        "remote_over_distinct": out["remote_bytes"] / distinct if distinct else 0.0,
        **out,
        "block_size": block_size,
        "latency_s": latency_s,
        "bandwidth_Bps": bandwidth_Bps if math.isfinite(bandwidth_Bps) else None,
        "cluster_latency_s": cluster.latency_s,
        "cluster_bandwidth_Bps": cluster.bandwidth_Bps,
        "lease_s": cluster.lease_s,
        "elapsed_s": round(time.perf_counter() - started, 3),
    }


def whole_blocks(nbytes: int, block_size: int) -> int:
    """``nbytes`` rounded up to whole blocks: a tier of that size holds them all."""
    return -(-nbytes // block_size) * block_size


def capacity_for(target: float, run: Callable[[int], dict], distinct: int, block_size: int) -> int | None:
    """The smallest cluster capacity whose combined hit ratio reaches ``target``, by bisection
    over ``[0, distinct]`` to within ``max(block_size, distinct / 64)`` (rounded up to whole
    blocks); ``None`` when even ``distinct`` bytes (nothing evicted) fall short.
    ``run(capacity)`` replays at one capacity."""
    if run(0)["combined_hit_ratio"] >= target:
        return 0
    high = whole_blocks(distinct, block_size)
    if run(high)["combined_hit_ratio"] < target:
        return None
    low, step = 0, max(block_size, distinct // 64)
    while high - low > step:
        middle = (low + high) // 2 // block_size * block_size
        if middle <= low:
            break
        if run(middle)["combined_hit_ratio"] >= target:
            high = middle
        else:
            low = middle
    return high


# --- command line ---------------------------------------------------------------


def _capacities(text: str) -> list[str | int]:
    """``SIZE[,SIZE...]``, each a size or a percentage of the trace's distinct bytes."""
    return [_capacity(part) for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igtcache bench replay-cluster",
        description="Replay a cluster trace: one policy per node, a shared cluster tier, one remote link.",
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("trace", metavar="TRACE.csv",
                        help="cluster trace, jobs named nodeK/JOBNAME (igtcache bench gen cluster-train ...)")
    parser.add_argument("--nodes", type=int, metavar="N",
                        help="nodes in the cluster (default: as many as the trace names); must cover every node named")
    parser.add_argument("--policy", action="append", metavar="NAME[,NAME...]",
                        help=f"each node's policy, to compare (default igt,lru; known: {','.join(POLICIES)})")
    parser.add_argument("--node-capacity", type=_capacity, required=True, metavar="SIZE",
                        help="each node's cache size, e.g. 512MiB, or a percentage of the trace's distinct bytes")
    parser.add_argument("--cluster-capacity", action="append", type=_capacities, metavar="SIZE[,SIZE...]",
                        help="cluster tier sizes to run (0: no cluster tier), sizes or percentages of the "
                             "distinct bytes; repeatable (default: only the sweep)")
    parser.add_argument("--cluster-eviction", choices=EVICTIONS, default="lru",
                        help="the tier's maxmemory-policy: allkeys-lru or allkeys-lfu (default lru)")
    parser.add_argument("--publish", action="append", metavar="MODE[,MODE...]",
                        help="which fetched blocks a node publishes: 'policy' (those its policy finds worth "
                             "sharing; every block for policies other than igt) or 'everything'; comma-separate "
                             "to compare (default policy)")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET, metavar="RATIO",
                        help=f"combined hit ratio the sweep finds the cluster capacity for "
                             f"(default {DEFAULT_TARGET}; 0 skips the sweep)")
    parser.add_argument("--block-size", type=_capacity_bytes, default=DEFAULT_BLOCK_SIZE, metavar="SIZE",
                        help="cache block size, on nodes and in the cluster tier (default 4MiB)")
    parser.add_argument("--latency-ms", type=float, default=DEFAULT_LATENCY_S * 1e3, metavar="MS",
                        help=f"remote latency per fetch (default {DEFAULT_LATENCY_S * 1e3:g})")
    parser.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH_BPS / 1e6, metavar="MB_PER_S",
                        help=f"remote bandwidth in MB/s, one link shared by every node "
                             f"(default {DEFAULT_BANDWIDTH_BPS / 1e6:g}; 'inf' for unlimited)")
    parser.add_argument("--cluster-latency-ms", type=float, default=DEFAULT_CLUSTER_LATENCY_S * 1e3, metavar="MS",
                        help=f"cluster tier latency per access (default {DEFAULT_CLUSTER_LATENCY_S * 1e3:g})")
    parser.add_argument("--cluster-bandwidth", type=float, default=DEFAULT_CLUSTER_BANDWIDTH_BPS / 1e6,
                        metavar="MB_PER_S", help=f"each node's bandwidth to the cluster tier in MB/s "
                                                 f"(default {DEFAULT_CLUSTER_BANDWIDTH_BPS / 1e6:g})")
    parser.add_argument("--lease-ms", type=float, default=DEFAULT_LEASE_S * 1e3, metavar="MS",
                        help=f"cluster-wide lease time: the longest a node waits for another's fetch "
                             f"(default {DEFAULT_LEASE_S * 1e3:g})")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return parser


def _capacity_bytes(text: str) -> int:
    value = _capacity(text)
    if not isinstance(value, int) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a size > 0, got {text!r}")
    return value


def _names(groups: list[str] | None, default: str) -> list[str]:
    return list(dict.fromkeys(n.strip().lower() for g in (groups or [default]) for n in g.split(",") if n.strip()))


def main(argv: list[str] | None = None) -> int:
    """``igtcache bench replay-cluster``: returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    policies, modes = _names(args.policy, "igt,lru"), _names(args.publish, "policy")
    if not policies or any(p not in POLICIES for p in policies):
        parser.error(f"--policy: known policies are {', '.join(POLICIES)}")
    if not modes or any(m not in PUBLISH for m in modes):
        parser.error(f"--publish: choose from {', '.join(PUBLISH)}")
    if min(args.latency_ms, args.cluster_latency_ms) < 0 or not min(args.bandwidth, args.cluster_bandwidth) > 0:
        parser.error("latencies must be >= 0 and bandwidths > 0")
    if not args.lease_ms > 0 or not 0 <= args.target <= 1 or (args.nodes is not None and args.nodes < 1):
        parser.error("--lease-ms must be > 0, --target between 0 and 1, --nodes >= 1")

    started = time.perf_counter()
    try:
        rows = load_trace(args.trace)
        node_count = len(split_by_node(rows, args.nodes))
    except (OSError, ValueError) as e:
        print(f"igtcache bench replay-cluster: {e}", file=sys.stderr)
        return 1
    distinct = footprint(rows, args.block_size)
    _note(f"loaded {len(rows):,} rows on {node_count} nodes in {time.perf_counter() - started:.1f} s; "
          f"distinct {format_size(distinct)} at {format_size(args.block_size)} blocks")

    def size(value: str | int) -> int:
        return int(distinct * float(value[:-1]) / 100) if isinstance(value, str) else value

    node_capacity = size(args.node_capacity)
    capacities = sorted({size(c) for group in (args.cluster_capacity or []) for c in group})
    results, sweeps = [], []
    for policy, mode in itertools.product(policies, modes):
        runs: dict[int, dict] = {}

        def run(capacity: int) -> dict:
            if capacity not in runs:
                cluster = ClusterParams(capacity, args.cluster_eviction, args.cluster_latency_ms / 1e3,
                                        args.cluster_bandwidth * 1e6, args.lease_ms / 1e3, mode)
                label = f"{policy}/{mode} @ {format_size(capacity)}"
                runs[capacity] = replay_cluster(
                    rows, policy, node_capacity, cluster, nodes=node_count, block_size=args.block_size,
                    latency_s=args.latency_ms / 1e3, bandwidth_Bps=args.bandwidth * 1e6, distinct_bytes=distinct,
                    progress=_Progress(label).update,
                )
                r = runs[capacity]
                _note(f"{label}: remote/distinct {r['remote_over_distinct']:.2f}, combined hit "
                      f"{r['combined_hit_ratio']:.3f} ({r['elapsed_s']:.1f} s)")
            return runs[capacity]

        for capacity in capacities:
            results.append(run(capacity))
        if args.target > 0:
            needed = capacity_for(args.target, run, distinct, args.block_size)
            best = run(whole_blocks(distinct, args.block_size))
            sweeps.append({"policy": policy, "publish": mode, "target": args.target, "cluster_capacity": needed,
                           "ceiling": best["combined_hit_ratio"], "runs": len(runs)})

    if args.json:
        print(json.dumps({"results": results, "sweeps": sweeps}, indent=2))
    else:
        print(format_table(results, sweeps, distinct))
    return 0


class _Progress:
    """Progress of one replay on stderr, at most every 5 seconds."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last = time.monotonic()

    def update(self, done: float) -> None:
        now = time.monotonic()
        if now - self.last >= 5:
            self.last = now
            _note(f"{self.label}: {done:.0%} of the rows")


def _note(text: str) -> None:
    print(f"replay-cluster: {text}", file=sys.stderr, flush=True)


def format_table(results: list[dict], sweeps: list[dict], distinct: int) -> str:
    """Results as text: one line per contender and cluster capacity, then the sweep's answers."""
    out = [f"distinct bytes read: {format_size(distinct)}"]
    if results:
        # _render left-aligns the "policy" and "capacity" columns: here the contender and the cluster tier's size
        lines = [("policy", "capacity", "remote/distinct", "node hit", "node byte hit", "cluster hit",
                  "combined", "published", "waits served")]
        for r in results:
            lines.append((f"{r['policy']}/{r['publish']}", format_size(r["cluster_capacity"]),
                          f"{r['remote_over_distinct']:.2f}", f"{r['hit_ratio']:.3f}", f"{r['byte_hit_ratio']:.3f}",
                          f"{r['cluster_hit_ratio']:.3f}", f"{r['combined_hit_ratio']:.3f}",
                          format_size(r["published_bytes"]), f"{r['waits_served']:,}/{r['waits']:,}"))
        out += ["", _render(lines)]
    if sweeps:
        out += ["", f"cluster capacity for a combined hit ratio of {sweeps[0]['target']:g}:"]
        for s in sweeps:
            needed = (format_size(s["cluster_capacity"]) if s["cluster_capacity"] is not None
                      else f"out of reach (ceiling {s['ceiling']:.3f})")
            out.append(f"  {s['policy']}/{s['publish']}: {needed}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
