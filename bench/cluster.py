"""``igtcache bench cluster``: N node daemons sharing one Redis Cluster, reading one S3 bucket.

Everything runs on this machine: moto's S3 server behind ``bench/shaping_proxy.py``
(``--latency`` per request and one ``--bandwidth`` cap that all nodes share,
as a cluster's link to object storage), a local Redis Cluster of 3 masters
whose memory holds the whole data set, and ``--nodes`` igtcache daemons, each
with its own socket, cache dir and a memory + disk budget a quarter of the
data set. Every node runs two jobs as processes reading through the igtcache
fsspec plugin attached to its daemon, checking each file's CRC-32 against the
generated data:

- ``train``: rank r of a data-parallel job, reading its 1/N of each epoch's
  shuffled order of a training set of small files, for several epochs;
- ``infer``: an inference server loading whole adapter files of a few MiB,
  with Zipf popularity (the same adapters hot on every node).

Contenders, one after another in the same run, from cold caches (the
cluster is flushed between them):

- ``node-local``: the IGT policy, no cluster tier: every node fetches what
  its own cache lacks from S3;
- ``cluster-lru``: the cluster tier, LRU on each node, every block fetched
  from S3 published to the cluster;
- ``cluster-igt``: the cluster tier, IGT on each node, which decides what is
  worth publishing.

Figures per contender, from the daemons' stats: remote bytes (fetched from
S3) over the distinct bytes the jobs read, makespan (the slowest job, from a
common start), node hit ratio (bytes the node's own tiers served / bytes
read), cluster hit ratio (bytes the cluster served / bytes the nodes
fetched), each next to node-local's; S3 requests through the proxy (block
GETs, the rest metadata); and the cluster tier's publishes, drops, lease
waits and circuit opens. Each daemon first reads an object of its own, so
that its S3 session and cluster connections are open when the jobs start, as
on a node whose daemon has been running; its counters leave that out. Targets: with IGT and the cluster
tier, remote bytes <= 1.2x the distinct bytes read, and makespan <= 0.6x
node-local's at 4 nodes. Scales: ``tiny`` (a test, under a minute),
``small`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igtcache.bench.cluster_jobs import JOBS, SCALES, ClusterWorkload, workload
from igtcache.bench.e2e import BUCKET, Scenario, upload
from igtcache.bench.e2e_jobs import JobSpec, run_job
from igtcache.bench.shaping_proxy import DEFAULT_LATENCY_S, ShapingProxy
from igtcache.bench.soak_services import MotoProcess
from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import DaemonClient
from igtcache.redis_cluster import RedisClusterProcess

MiB = 1 << 20
CONTENDERS = {"node-local": ("igt", False), "cluster-lru": ("lru", True), "cluster-igt": ("igt", True)}
BASELINE = "node-local"
REMOTE_NAME = "data"
BLOCK_SIZE = 1 * MiB
DEFAULT_BANDWIDTH_BPS = 50e6
NODE_DISK_SHARE = 0.25  # of the data set: a node's cache (the disk tier bounds it, memory is a hot subset)
NODE_MEMORY_SHARE = 0.08
# Redis keeps per-key structures and rounds values up to its allocator's size classes:
# give each master twice its share of the data set so that nothing is evicted.
CLUSTER_HEADROOM = 2.0
REMOTE_TARGET = 1.2
MAKESPAN_TARGET = 0.6
STALL_S = 180.0
WARMUP = "warmup/node{}.bin"  # one small object per node, read before the jobs start
WARMUP_SIZE = 64 << 10
COUNTERS = ("remote_bytes", "cluster_bytes", "bytes_requested", "bytes_from_cache", "remote_fetches",
            "cluster_fetches")
DIAGNOSTICS = ("published", "publish_bytes", "publish_dropped", "publish_failed", "leases", "lease_denied",
               "waits_served", "waits_missed", "circuit_opens", "errors", "timeouts", "busy", "corrupt")


@dataclass
class Rig:
    """What every contender shares: the data set, its CRCs, the shaping proxy in front of S3 and the cluster."""

    work: ClusterWorkload
    crcs: dict[str, int]
    proxy: ShapingProxy
    cluster: RedisClusterProcess
    workdir: Path


def run(scale: str, nodes: int, latency_s: float, bandwidth_Bps: float, seed: int,
        contenders: list[str]) -> dict[str, Any]:
    """Start the services, run each contender, stop everything; the report."""
    work = workload(scale, nodes, seed)
    maxmemory = int(CLUSTER_HEADROOM * work.dataset_bytes / 3) + 32 * MiB
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="igtcache-bench-cluster-")))
        cluster = RedisClusterProcess(tmp / "redis", maxmemory=maxmemory)
        stack.callback(cluster.stop)
        starting = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))  # its exit waits for start()
        cluster_up = starting.submit(cluster.start)  # mostly waiting: overlaps S3's start and the upload
        moto = MotoProcess(str(tmp / "moto.log"))
        stack.callback(moto.kill)
        moto.start()
        proxy = ShapingProxy("127.0.0.1", moto.port, latency_s, bandwidth_Bps).start()
        stack.callback(proxy.stop)
        _note(f"bench cluster/{scale}: {nodes} nodes, {len(work.sizes)} objects, "
              f"{work.dataset_bytes / MiB:.1f} MiB; node cache {NODE_MEMORY_SHARE:.0%} memory + "
              f"{NODE_DISK_SHARE:.0%} disk of it; Redis Cluster 3 masters x {maxmemory / MiB:.0f} MiB; "
              f"proxy {latency_s * 1000:.0f} ms/request, {bandwidth_Bps / 1e6:.0f} MB/s shared")
        warmups = {WARMUP.format(node): WARMUP_SIZE for node in range(nodes)}
        crcs = upload(moto.endpoint, Scenario({**work.sizes, **warmups}, {}), seed)
        cluster_up.result()
        rig = Rig(work, crcs, proxy, cluster, tmp)
        results = []
        for name in contenders:
            _flush(cluster)
            results.append(run_contender(name, rig))
    add_ratios(results)
    return {"scale": scale, "nodes": nodes, "latency_s": latency_s, "bandwidth_Bps": bandwidth_Bps,
            "block_size": BLOCK_SIZE, "dataset_bytes": work.dataset_bytes, "distinct_bytes": work.distinct_bytes,
            "node_memory_bytes": _node_memory(work), "node_disk_bytes": _node_disk(work),
            "cluster_maxmemory_bytes": maxmemory, "results": results, "targets": targets(results, nodes)}


def _node_memory(work: ClusterWorkload) -> int:
    return int(NODE_MEMORY_SHARE * work.dataset_bytes)


def _node_disk(work: ClusterWorkload) -> int:
    return int(NODE_DISK_SHARE * work.dataset_bytes)


def _flush(cluster: RedisClusterProcess) -> None:
    """Empty the cluster: ``FLUSHALL`` on every master."""
    for port in cluster.ports:
        cluster.cli(port, "flushall")


def run_contender(name: str, rig: Rig) -> dict[str, Any]:
    """Start a daemon per node, run every node's jobs at once, read the daemons' stats."""
    policy, shared = CONTENDERS[name]
    nodes = len(rig.work.nodes)
    storage = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": rig.proxy.endpoint, "region_name": "us-east-1"}}
    base = ["--remote", f"{REMOTE_NAME}=s3://{BUCKET}", "--storage-options", json.dumps(storage),
            "--memory", str(_node_memory(rig.work)), "--disk", str(_node_disk(rig.work)),
            "--block-size", str(BLOCK_SIZE), "--policy", policy, "--log-level", "warning"]
    if shared:
        base += ["--cluster", rig.cluster.url]
    workdir = rig.workdir / name
    workdir.mkdir()
    load = os.getloadavg()[0]
    _note(f"{name}: starting and warming up {nodes} daemons (policy {policy}, "
          f"{'cluster tier' if shared else 'no cluster tier'}); load average {load:.1f}")
    with contextlib.ExitStack() as stack:
        daemons = []
        for node in range(nodes):
            daemon = DaemonProcess(workdir / f"node{node}.sock",
                                   [*base, "--cache-dir", str(workdir / f"node{node}-cache")])
            stack.push(daemon.__exit__)  # killed and its log removed, started or not
            daemons.append(daemon)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(nodes) as pool:
            before = list(pool.map(_start_warm, daemons, range(nodes)))
        _note(f"{name}: daemons up in {time.monotonic() - started:.1f} s; starting {len(JOBS) * nodes} jobs")
        # any contender name but s3fs's and fsspec's caches reads through the plugin attached to ``socket``
        specs = {(node, job): JobSpec(name=job, contender="igtcache", endpoint=rig.proxy.endpoint, bucket=BUCKET,
                                      reads=reads, crcs={k: rig.crcs[k] for k, _ in reads},
                                      sizes={k: rig.work.sizes[k] for k, _ in reads},
                                      socket=daemon.socket_path)
                 for node, daemon in enumerate(daemons) for job, reads in rig.work.nodes[node].items()}
        requests = rig.proxy.requests
        jobs = run_jobs(name, specs)
        requests = rig.proxy.requests - requests
        stats = []
        for daemon, start in zip(daemons, before):
            with DaemonClient(daemon.socket_path, REMOTE_NAME) as client:
                after = _counters(client.stats())
            stats.append({k: after[k] - start[k] for k in after})
    out = contender_figures(name, policy, shared, jobs, stats, rig.work)
    out.update(s3_requests=requests, load_average=load)
    return out


def _start_warm(daemon: DaemonProcess, node: int) -> dict[str, int]:
    """Start ``daemon`` and read its warm-up object, so that its S3 session and cluster connections
    are open when the jobs start, as on a node whose daemon has been running; its counters then."""
    daemon.start()
    with DaemonClient(daemon.socket_path, REMOTE_NAME) as client:
        client.read(WARMUP.format(node))
        deadline = time.monotonic() + 10
        while _publishing(stats := client.stats()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return _counters(stats)


def _publishing(stats: dict) -> bool:
    """Whether the warm-up block's publish is still under way (its counters not yet final)."""
    tier = stats.get("cluster")
    return tier is not None and tier["published"] + tier["publish_dropped"] + tier["publish_failed"] < 1


def _counters(stats: dict) -> dict[str, int]:
    """The counters the figures come from, cluster tier's prefixed ``tier_`` (none without a tier)."""
    out = {k: stats[k] for k in COUNTERS}
    out.update({f"tier_{k}": stats["cluster"][k] for k in DIAGNOSTICS if "cluster" in stats})
    return out


def run_jobs(label: str, specs: dict[tuple[int, str], JobSpec]) -> dict[tuple[int, str], dict]:
    """Run every job as its own process from a common start; each one's result (``run_job``'s)."""
    # A fork server with the readers' imports loaded makes each job process cheap to start;
    # the parent itself runs threads (the proxy) and must not be forked.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["igtcache.bench.e2e_jobs", "igtcache.clients.fsspec_plugin", "s3fs"])
    barrier = ctx.Barrier(len(specs) + 1)
    results = ctx.Queue()
    progress = {key: ctx.Value("l", 0, lock=False) for key in specs}
    processes = []
    try:
        for key, spec in specs.items():
            process = ctx.Process(target=run_job, args=(spec, barrier, progress[key], results), daemon=True)
            process.start()
            processes.append(process)
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            raise RuntimeError(f"{label}: a job could not start: {_errors(results)}") from None
        return _wait_for_jobs(label, specs, processes, progress, results)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(10)


def _errors(results) -> list[str]:
    """The errors the jobs have reported (until none comes within a second)."""
    errors = []
    with contextlib.suppress(Exception):
        while True:
            errors.append(results.get(timeout=1)["error"])
    return errors


def _wait_for_jobs(label: str, specs: dict[tuple[int, str], JobSpec], processes: list, progress: dict,
                   results) -> dict[tuple[int, str], dict]:
    """Each job's result as it comes, with a progress line every 5 s; ``RuntimeError`` if one fails,
    dies or no read finishes for ``STALL_S``."""
    started = last_note = last_change = time.monotonic()
    key_of = {process.pid: key for process, key in zip(processes, specs)}
    done: dict[tuple[int, str], dict] = {}
    last_total = -1
    while len(done) < len(specs):
        try:
            result = results.get(timeout=0.5)
        except queue.Empty:
            if not any(p.is_alive() for p in processes):
                raise RuntimeError(f"{label}: a job process died without a result") from None
        else:
            key = key_of[result["pid"]]
            done[key] = result
            if result["error"]:
                raise RuntimeError(f"{label}: job {result['name']} on node {key[0]} failed: {result['error']}")
        now = time.monotonic()
        total = sum(value.value for value in progress.values())
        if total != last_total:
            last_total, last_change = total, now
        elif now - last_change > STALL_S:
            raise RuntimeError(f"{label}: no read finished for {STALL_S:.0f} s")
        if now - last_note >= 5 or len(done) == len(specs):
            last_note = now
            counts = "  ".join(
                f"{job} {sum(progress[k].value for k in specs if k[1] == job)}/"
                f"{sum(len(s.reads) for k, s in specs.items() if k[1] == job)}" for job in JOBS)
            _note(f"  {label:<11} {now - started:6.1f} s  reads: {counts}")
    return done


def contender_figures(name: str, policy: str, shared: bool, jobs: dict[tuple[int, str], dict],
                      stats: list[dict], work: ClusterWorkload) -> dict[str, Any]:
    """One contender's figures from its jobs' results and each daemon's counters over the jobs' run."""
    def total(field: str) -> int:
        return sum(s[field] for s in stats)

    remote, cluster = total("remote_bytes"), total("cluster_bytes")
    requested = total("bytes_requested")
    expected = sum(work.sizes[key] for node in work.nodes for reads in node.values() for key, _ in reads)
    out = {
        "contender": name, "policy": policy, "cluster_tier": shared,
        "makespan_s": max(job["seconds"] for job in jobs.values()),
        "job_seconds": {job: max(r["seconds"] for (_, j), r in jobs.items() if j == job) for job in JOBS},
        "reads": sum(job["reads"] for job in jobs.values()),
        "bad_reads": sum(job["bad"] for job in jobs.values()),
        "bytes_checked": sum(job["bytes"] for job in jobs.values()), "bytes_expected": expected,
        "remote_bytes": remote, "cluster_bytes": cluster, "bytes_requested": requested,
        "remote_fetches": total("remote_fetches"), "cluster_fetches": total("cluster_fetches"),
        "remote_per_distinct": remote / work.distinct_bytes,
        "node_hit_ratio": total("bytes_from_cache") / requested if requested else 0.0,
        "cluster_hit_ratio": cluster / (cluster + remote) if cluster + remote else 0.0,
        "nodes": [{"remote_bytes": s["remote_bytes"], "cluster_bytes": s["cluster_bytes"],
                   "node_hit_ratio": s["bytes_from_cache"] / s["bytes_requested"] if s["bytes_requested"] else 0.0,
                   "jobs": {job: jobs[(node, job)]["seconds"] for job in JOBS}} for node, s in enumerate(stats)],
    }
    if shared:
        out["cluster_tier_stats"] = {k: total(f"tier_{k}") for k in DIAGNOSTICS}
    return out


RATIO_FIELDS = ("remote_per_distinct", "makespan_s", "node_hit_ratio", "cluster_hit_ratio")


def add_ratios(results: list[dict]) -> None:
    """Set each contender's ``vs_node_local``: its figures over node-local's (``None`` where
    node-local's is 0 or did not run)."""
    base = next((r for r in results if r["contender"] == BASELINE), None)
    for r in results:
        r["vs_node_local"] = {k: (r[k] / base[k] if base and base[k] else None) for k in RATIO_FIELDS}


def targets(results: list[dict], nodes: int) -> list[dict]:
    """The two targets for ``cluster-igt``, each with its value and whether it is met."""
    igt = next((r for r in results if r["contender"] == "cluster-igt"), None)
    if igt is None:
        return []
    out = [{"name": "cluster-igt remote bytes / distinct bytes read", "limit": REMOTE_TARGET,
            "value": igt["remote_per_distinct"]}]
    if igt["vs_node_local"]["makespan_s"] is not None:
        out.append({"name": f"cluster-igt makespan / node-local (set for 4 nodes; {nodes} here)",
                    "limit": MAKESPAN_TARGET, "value": igt["vs_node_local"]["makespan_s"]})
    for target in out:
        target["met"] = target["value"] <= target["limit"]
    return out


def format_report(report: dict) -> str:
    """The table, the cluster tier's counters per contender, and the targets."""
    header = ["contender", "remote MiB", "remote/distinct", "x local", "makespan s", "x local",
              "node hit", "x local", "cluster hit", "x local", "bad reads"]
    rows = [header]
    for r in report["results"]:
        ratio = r["vs_node_local"]
        rows.append([r["contender"], f"{r['remote_bytes'] / MiB:.1f}", f"{r['remote_per_distinct']:.2f}",
                     _ratio(ratio["remote_per_distinct"]), f"{r['makespan_s']:.2f}", _ratio(ratio["makespan_s"]),
                     f"{r['node_hit_ratio']:.3f}", _ratio(ratio["node_hit_ratio"]),
                     f"{r['cluster_hit_ratio']:.3f}" if r["cluster_tier"] else "-",
                     _ratio(ratio["cluster_hit_ratio"]), str(r["bad_reads"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.append(f"distinct bytes read {report['distinct_bytes'] / MiB:.1f} MiB of {report['dataset_bytes'] / MiB:.1f}"
                 f" MiB; node cache {report['node_disk_bytes'] / MiB:.1f} MiB; {report['nodes']} nodes")
    for r in report["results"]:
        slowest = ", ".join(f"{job} {s:.2f} s" for job, s in r["job_seconds"].items())
        lines.append(f"{r['contender']}: slowest {slowest}; {r['reads']} reads, "
                     f"{r['bytes_checked'] / MiB:.1f} of {r['bytes_expected'] / MiB:.1f} MiB checked; "
                     f"S3 requests {r['s3_requests']} ({r['remote_fetches']} block GETs, the rest metadata); "
                     f"load average {r['load_average']:.1f} at its start")
        if "cluster_tier_stats" in r:
            c = r["cluster_tier_stats"]
            lines.append(f"  cluster tier: published {c['published']} blocks ({c['publish_bytes'] / MiB:.1f} MiB), "
                         f"dropped {c['publish_dropped']}, failed {c['publish_failed']}; leases {c['leases']}, "
                         f"denied {c['lease_denied']}, waits served {c['waits_served']}, missed {c['waits_missed']}; "
                         f"circuit opens {c['circuit_opens']}; errors {c['errors']}, timeouts {c['timeouts']}, "
                         f"busy {c['busy']}, corrupt {c['corrupt']}")
    for t in report["targets"]:
        lines.append(f"target: {t['name']} <= {t['limit']}: {t['value']:.2f} ({'met' if t['met'] else 'MISSED'})")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(report: dict, path: str) -> None:
    """Save a PNG: remote bytes / distinct bytes and makespan, one bar per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = [r["contender"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.bar(names, [r["remote_per_distinct"] for r in results], color="tab:orange")
    left.axhline(REMOTE_TARGET, color="gray", linestyle="--", label=f"target {REMOTE_TARGET}")
    left.set_ylabel("remote bytes / distinct bytes read")
    left.legend()
    right.bar(names, [r["makespan_s"] for r in results], color="tab:blue")
    base = next((r for r in results if r["contender"] == BASELINE), None)
    if base is not None:
        right.axhline(MAKESPAN_TARGET * base["makespan_s"], color="gray", linestyle="--",
                      label=f"target {MAKESPAN_TARGET} x {BASELINE}")
        right.legend()
    right.set_ylabel("makespan (s)")
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"bench cluster/{report['scale']}: {report['nodes']} nodes, one Redis Cluster, one S3 link")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igtcache bench cluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  igtcache bench cluster --scale tiny                 # about a minute\n"
        "  igtcache bench cluster --nodes 4 --scale small --plot cluster.png\n"
        "  igtcache bench cluster --contenders node-local,cluster-igt --json > cluster.json\n"
        "\nneeds redis-server and redis-cli (apt-get install redis-server); progress goes to stderr")
    parser.add_argument("--nodes", type=int, default=4, help="node daemons, each with its train and infer job "
                        "(default 4)")
    parser.add_argument("--scale", default="small", choices=sorted(SCALES),
                        help="tiny: 64 small files x 3 epochs, for tests; small: 512 files of 256 KiB x 4 epochs "
                        "and 16 adapters of 3 MiB (default small)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated, run in this order (default {','.join(CONTENDERS)}); the ratios "
                        f"need {BASELINE}")
    parser.add_argument("--latency", type=float, default=DEFAULT_LATENCY_S,
                        help=f"seconds the proxy adds to each S3 request (default {DEFAULT_LATENCY_S})")
    parser.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH_BPS,
                        help=f"bytes/s from S3, shared by all nodes (default {DEFAULT_BANDWIDTH_BPS:.0f})")
    parser.add_argument("--seed", type=int, default=0, help="data, shuffles and adapter draws (default 0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE.png", help="also save a chart of remote bytes and makespan")
    return parser


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    contenders = [c for c in args.contenders.split(",") if c]
    if unknown := sorted(set(contenders) - set(CONTENDERS)):
        parser.error(f"unknown contenders {unknown}; choose from {','.join(CONTENDERS)}")
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    signal.signal(signal.SIGTERM, _interrupt)  # cleans up as Ctrl-C does
    try:
        report = run(args.scale, args.nodes, args.latency, args.bandwidth, args.seed, contenders)
    except KeyboardInterrupt:
        _note("igtcache bench cluster: interrupted; daemons, Redis, moto and the proxy are stopped")
        return 130
    except RuntimeError as exc:  # a job failed or stalled, or a service did not start; all stopped
        _note(f"igtcache bench cluster: {exc}")
        return 1
    if args.plot:
        plot(report, args.plot)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if all(r["bad_reads"] == 0 and r["bytes_checked"] == r["bytes_expected"]
                    for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
