"""Cluster replay: per-node policies over a modelled shared tier and one remote link."""

from __future__ import annotations

import json
import random

import pytest

from igtcache.bench import gen
from igtcache.bench import replay_cluster as cli
from igtcache.bench.cluster_traces import node_job, node_of, split_by_node
from igtcache.bench.replay import footprint, replay
from igtcache.bench.replay_cluster import ClusterParams, LFUTier, LRUTier, capacity_for, replay_cluster
from igtcache.bench.trace import TraceRow, load_trace, write_trace
from igtcache.policies import BlockKey

KiB, MiB = 1024, 1024**2
BLOCK = 64 * KiB


def scan(node: int, start: float, path: str, size: int, read: int = BLOCK, gap: float = 0.01) -> list[TraceRow]:
    """One node reading a whole object front to back, one read every ``gap`` seconds."""
    return [TraceRow(start + i * gap, node_job(node, "job"), path, off, min(read, size - off), size)
            for i, off in enumerate(range(0, size, read))]


def by_time(*parts: list[TraceRow]) -> list[TraceRow]:
    return sorted((row for part in parts for row in part), key=lambda row: row.ts)


def run(rows, policy="lru", node_capacity=4 * BLOCK, cluster_capacity=0, **params) -> dict:
    options = {k: params.pop(k) for k in ("nodes", "latency_s", "bandwidth_Bps") if k in params}
    return replay_cluster(rows, policy, node_capacity, ClusterParams(cluster_capacity, **params),
                          block_size=BLOCK, **options)


# --- the trace convention ------------------------------------------------------


def test_node_jobs_name_their_node():
    assert node_job(12, "train-0") == "node12/train-0"
    assert node_of("node12/train-0") == 12
    for bad in ("train-0", "node/x", "nodeX/y", "node3/"):
        with pytest.raises(ValueError, match="names no node"):
            node_of(bad)
    rows = scan(2, 0.0, "a", BLOCK) + scan(0, 1.0, "b", BLOCK)
    assert [len(r) for r in split_by_node(rows)] == [1, 0, 1]
    assert len(split_by_node(rows, 4)) == 4
    with pytest.raises(ValueError, match="names node2 but the cluster has 2"):
        split_by_node(rows, 2)


# --- the shared tier's eviction ------------------------------------------------


def test_lru_tier_evicts_the_least_recently_used():
    tier = LRUTier(3 * BLOCK)
    a, b, c, d = (BlockKey("f", "1", i) for i in range(4))
    for t, key in enumerate((a, b, c)):
        assert tier.put(key, BLOCK, t)
    assert tier.get(a, 3)
    assert tier.put(d, BLOCK, 4)
    assert b not in tier and {a, c, d} <= tier.sizes.keys() and tier.used == 3 * BLOCK
    assert not tier.put(BlockKey("g", "1", 0), 4 * BLOCK, 5)  # bigger than the tier
    assert tier.evicted == 1


def test_lfu_tier_keeps_the_frequent_block_and_decays_idle_counters():
    tier = LFUTier(2 * BLOCK)
    hot, cold, new = (BlockKey("f", "1", i) for i in range(3))
    tier.put(hot, BLOCK, 0.0)
    tier.put(cold, BLOCK, 0.0)
    assert tier.counter(hot, 0.0) == 5  # Redis's LFU_INIT_VAL
    tier.get(hot, 1.0)  # from 5 the first increment is certain
    assert tier.counter(hot, 1.0) == 6
    tier.put(new, BLOCK, 2.0)  # cold (5) goes, though hot is older
    assert cold not in tier and hot in tier and new in tier
    assert tier.counter(hot, 61.0) == 5 and tier.counter(hot, 600.0) == 0  # one off per idle minute
    for t in range(1000):
        tier.get(hot, 3.0 + t / 1000)
    assert 14 <= tier.counter(hot, 5.0) <= 26  # Redis's table for log factor 10: 1K hits -> 18


# --- the cluster model -----------------------------------------------------------


def test_nodes_reading_the_same_data_fetch_it_from_the_remote_about_once():
    nodes, size = 8, 32 * BLOCK
    rows = by_time(*(scan(k, 10.0 * k, f"data/{f}", size) for k in range(nodes) for f in ("a", "b")))
    distinct = footprint(rows, BLOCK)
    assert distinct == 2 * size

    shared = run(rows, cluster_capacity=distinct)
    assert shared["remote_bytes"] <= 1.05 * distinct
    assert shared["remote_over_distinct"] == pytest.approx(shared["remote_bytes"] / distinct)
    assert shared["cluster_bytes"] >= (nodes - 1) * distinct * 0.95
    assert shared["cluster_hit_ratio"] > 0.85
    assert shared["combined_hit_ratio"] > 0.85

    tiny = run(rows, cluster_capacity=BLOCK)
    assert tiny["remote_bytes"] >= 0.95 * nodes * distinct
    none = run(rows, cluster_capacity=0)
    assert none["remote_bytes"] >= 0.95 * nodes * distinct and none["cluster_bytes"] == 0


def test_a_block_in_flight_for_one_node_is_waited_for_by_the_others():
    nodes = 6
    rows = by_time(*(scan(k, 0.0, "model.bin", BLOCK) for k in range(nodes)))
    r = run(rows, cluster_capacity=8 * BLOCK)
    assert r["jobs"]["node0/job"]["remote_bytes"] == BLOCK  # the first node's read takes the lease
    assert r["remote_bytes"] == BLOCK
    assert r["waits"] == r["waits_served"] == nodes - 1
    assert r["cluster_bytes"] == (nodes - 1) * BLOCK
    # Leases expire: a fetch slower than the lease lets every waiter fetch for itself.
    slow = run(rows, cluster_capacity=8 * BLOCK, latency_s=3.0, lease_s=2.0)
    assert slow["remote_bytes"] == nodes * BLOCK and slow["leases_expired"] == 1
    # Without a cluster tier there is no lease: every node fetches.
    assert run(rows, cluster_capacity=0)["remote_bytes"] == nodes * BLOCK


def _single_node_trace() -> list[TraceRow]:
    """A node's mixed workload: shard epochs, skewed lookups, an explicit prefetch, a changed object."""
    shards = gen.Shards(jobs=2, shards=6, shard_size=1 * MiB, epochs=2, read_size=48 * KiB, throughput=40 * MiB)
    features = gen.Features(jobs=2, lookups=1500, tables=2, table_size=2 * MiB, row_size=4 * KiB, shift_every=500)
    rows = list(shards.rows(random.Random(1))) + list(features.rows(random.Random(2)))
    end = max(row.ts for row in rows)
    rows += [TraceRow(end + 0.1, "extra", "shards/train-00000.tar", 0, 4 * BLOCK, 1 * MiB, "prefetch"),
             TraceRow(end + 0.2, "extra", "shards/train-00000.tar", 0, 3 * BLOCK, 1 * MiB, "read", "sequential"),
             TraceRow(end + 0.3, "extra", "shards/train-00000.tar", 0, 3 * BLOCK, 2 * MiB)]  # a new version
    return sorted((row._replace(job=node_job(0, row.job)) for row in rows), key=lambda row: row.ts)


@pytest.mark.parametrize("policy", ["lru", "igt", "belady"])
def test_one_node_without_a_cluster_tier_is_bench_replay(policy):
    rows = _single_node_trace()
    expected = replay(rows, policy, 24 * BLOCK, block_size=BLOCK)
    got = run(rows, policy, node_capacity=24 * BLOCK, cluster_capacity=0)
    keys = ("reads", "hit_ratio", "byte_hit_ratio", "remote_bytes", "wasted_prefetch_bytes", "late_prefetches")
    assert {k: got[k] for k in keys} == {k: expected[k] for k in keys}
    assert got["jobs"].keys() == expected["jobs"].keys() and len(got["jobs"]) == 5
    for job, figures in expected["jobs"].items():  # the cluster replay times no read: no stall figures
        assert {k: got["jobs"][job][k] for k in keys} == {k: figures[k] for k in keys}, job
    if policy == "igt":
        assert expected["late_prefetches"] > 0 or expected["wasted_prefetch_bytes"] > 0  # readahead ran


def _publishing(rows: list[TraceRow], policy: str, **params) -> dict:
    return run(rows, policy, cluster_capacity=footprint(rows, BLOCK), **params)


def test_igt_keeps_one_pass_scans_of_short_files_off_the_cluster_tier():
    rows = by_time(*(scan(k % 2, 0.1 * k, f"raw/part-{k}.bin", 8 * BLOCK) for k in range(8)))
    lru, igt = _publishing(rows, "lru"), _publishing(rows, "igt")
    assert lru["published"] == 64 and lru["not_published"] == 0
    assert igt["published"] + igt["not_published"] == 64
    assert igt["published"] < 64 / 2  # as the engine's test on a real cluster asks
    assert _publishing(rows, "igt", publish="everything")["published"] == 64


def test_igt_keeps_a_long_one_pass_scan_off_the_cluster_tier():
    rows = by_time(scan(0, 0.0, "raw/part-0.bin", 256 * BLOCK), scan(1, 0.005, "raw/part-1.bin", 256 * BLOCK))
    assert _publishing(rows, "lru")["published"] == 512
    assert _publishing(rows, "igt")["published"] < 0.2 * 512


def test_capacity_for_bisects_to_the_smallest_capacity_reaching_the_target():
    calls = []

    def ratio_at(capacity: int) -> dict:
        calls.append(capacity)
        return {"combined_hit_ratio": min(1.0, capacity / (100 * BLOCK))}

    found = capacity_for(0.5, ratio_at, 128 * BLOCK, BLOCK)
    assert 50 * BLOCK <= found <= 52 * BLOCK
    assert len(calls) <= 10
    assert capacity_for(0.99, ratio_at, 64 * BLOCK, BLOCK) is None
    assert capacity_for(0.0, ratio_at, 64 * BLOCK, BLOCK) == 0


# --- generators and the command ----------------------------------------------------


def test_cluster_train_splits_every_epoch_among_all_ranks():
    scenario = gen.ClusterTrain(nodes=4, jobs=2, files=40, file_size=1 * MiB, epochs=3, read_size=512 * KiB)
    rows = list(scenario.rows(random.Random(0)))
    assert [row.ts for row in rows] == sorted(row.ts for row in rows)
    assert {row.job for row in rows} == {node_job(k, f"train-{r}") for k in range(4) for r in range(2)}
    reads = {}
    for row in rows:
        reads.setdefault(row.path, []).append(row.job)
    assert len(reads) == 40
    assert all(len(jobs) == 3 * 2 for jobs in reads.values())  # every file, whole, once per epoch
    per_node = [sum(row.size for row in part) for part in split_by_node(rows)]
    assert per_node == [3 * 10 * MiB] * 4


def test_cluster_adapters_load_whole_files_on_every_node():
    scenario = gen.ClusterAdapters(nodes=8, loads=400, adapters=64, adapter_size=3 * MiB, read_size=1 * MiB)
    rows = list(scenario.rows(random.Random(0)))
    assert len(rows) == 400 * 3
    assert len(split_by_node(rows)) == 8 and all(split_by_node(rows))
    for part in split_by_node(rows):
        offsets = [row.offset for row in part]
        assert offsets == [0, MiB, 2 * MiB] * (len(part) // 3)  # each load front to back, not interleaved
    counts = sorted((sum(1 for row in rows if row.path == p) for p in {row.path for row in rows}), reverse=True)
    assert counts[0] > 5 * counts[len(counts) // 2]  # Zipf: the top adapter far above the median


def test_gen_and_replay_cluster_commands(tmp_path, capsys):
    trace = tmp_path / "train.csv"
    assert gen.main(["cluster-train", str(trace), "--nodes", "4", "--files", "32", "--file-size", "256KiB",
                     "--epochs", "4", "--read-size", "128KiB"]) == 0
    assert len(split_by_node(load_trace(trace))) == 4
    argv = [str(trace), "--policy", "lru,igt", "--publish", "everything", "--node-capacity", "256KiB",
            "--cluster-capacity", "0,50%", "--block-size", "64KiB", "--cluster-eviction", "lfu"]
    assert cli.main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["policy"], r["cluster_capacity"]) for r in out["results"]] == [
        ("lru", 0), ("lru", 4 * MiB), ("igt", 0), ("igt", 4 * MiB)]
    assert all(r["cluster_eviction"] == "lfu" and r["nodes"] == 4 for r in out["results"])
    for sweep in out["sweeps"]:
        assert sweep["ceiling"] == pytest.approx(0.75, abs=0.03)  # four epochs: the first one misses
        assert sweep["cluster_capacity"] is None  # 0.95 is out of reach
    assert cli.main(argv + ["--target", "0.6"]) == 0
    text = capsys.readouterr().out
    assert "lru/everything" in text and "cluster capacity for a combined hit ratio of 0.6" in text
    write_trace(tmp_path / "plain.csv", [TraceRow(0.0, "job", "a", 0, 10, 10)])
    assert cli.main([str(tmp_path / "plain.csv"), "--node-capacity", "1MiB"]) == 1
    assert "names no node" in capsys.readouterr().err
