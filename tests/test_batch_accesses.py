"""The batch path for reported hits (ReadDriver.record_hits, AccessStreamTree.record_many,
IGT.observe_many) against the read-by-read path it stands for."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from igtcache.bench import gen
from igtcache.bench import policy as bench_policy
from igtcache.bench.streams import cluster_workload
from igtcache.bench.trace import TraceRow, TraceWriter
from igtcache.patterns import Pattern
from igtcache.policies import IGT, LRU, BlockKey
from igtcache.read_driver import ReadDriver
from igtcache.residency import AccessBatch, BatchObject
from igtcache.stream_tree import AccessStreamTree, Groups, stable_order

KiB, MiB = 1024, 1024**2
BLOCK = 64 * KiB


def tree_state(tree: AccessStreamTree, labels: bool = True) -> tuple:
    """Every stream's ring, counters and (optionally) label, and the nodes' recency order."""
    streams = []
    for node in [tree._root, *tree._nodes.values()]:
        for job, s in sorted(node.streams.items(), key=lambda item: str(item[0])):
            ring = s.ordered()
            streams.append((node.key, job, tuple(ring if isinstance(ring, list) else ring.tolist()), s.visits,
                            s.accesses, s.nbytes, s.last, s.last_ts,
                            (s.verdict.label, s.next_eval) if labels else None))
    return streams, list(tree._nodes)


def columns(work: list[tuple[str, int, int, str]]) -> tuple:
    paths = sorted({w[0] for w in work})
    jobs = sorted({w[3] for w in work})
    index, job_index = {p: i for i, p in enumerate(paths)}, {j: i for i, j in enumerate(jobs)}
    return (paths, jobs, np.array([index[w[0]] for w in work]), np.array([job_index[w[3]] for w in work]),
            np.array([w[1] for w in work]), np.array([w[2] for w in work]), np.arange(len(work), dtype=float))


@pytest.mark.parametrize("batch,labels", [(1, True), (400, False)])
def test_record_many_is_record_read_by_read(batch, labels):
    """One read at a time, everything matches; in batches, all but when streams were classified."""
    work = list(cluster_workload(6000, 1200, seed=1))
    one, many = AccessStreamTree(), AccessStreamTree()
    for i, (path, offset, size, job) in enumerate(work):
        one.record(path, offset, size, job, float(i))
    paths, jobs, obj, job, offset, size, ts = columns(work)
    for s in range(0, len(work), batch):
        part = slice(s, s + batch)
        many.record_many(paths, jobs, obj[part], job[part], offset[part], size[part], ts[part])
    assert tree_state(many, labels) == tree_state(one, labels)


def test_record_many_finds_the_patterns():
    tree = AccessStreamTree(max_nodes=8192)
    work = list(cluster_workload(60_000, 20_000, seed=7))
    paths, jobs, obj, job, offset, size, ts = columns(work)
    for s in range(0, len(work), 2048):
        part = slice(s, s + 2048)
        tree.record_many(paths, jobs, obj[part], job[part], offset[part], size[part], ts[part])
    labels = {(s["level"], s["job"], s["label"]) for s in tree.streams()}
    assert ("dir", "train", "random") in labels and ("dir", "eval", "sequential") in labels
    assert ("region", "tokens", "sequential") in labels and ("file", "embed", "skewed") in labels


def test_stable_order_and_groups():
    rng = np.random.default_rng(0)
    for high in (5, 70_000, 1 << 40):
        ids = rng.integers(0, high, 3000)
        assert np.array_equal(stable_order(ids), np.argsort(ids, kind="stable"))
        groups = Groups(ids)
        assert np.array_equal(groups.ids, np.unique(ids))
        assert np.array_equal(groups.ids[groups.of], ids)
        assert np.array_equal(groups.firsts, np.unique(ids, return_index=True)[1])
        assert all(ids[i] == groups.ids[g] for g, i in enumerate(groups.lasts)) and len(groups) == len(groups.ids)
    assert len(Groups(np.array([], dtype=np.int64))) == 0


def rows_of_a_mix(reads: int) -> list[TraceRow]:
    """Small files in shuffled epochs, skewed rows of a table, and scans, interleaved."""
    rng = random.Random(3)
    parts = [gen.ImageFolder(files=400, classes=8, epochs=3, mean_size=48 * KiB).rows(rng),
             gen.Features(tables=2, table_size=64 * MiB, jobs=2, lookups=8000).rows(rng),
             gen.Preprocess(jobs=2, files=4, file_size=8 * MiB, read_size=16 * KiB).rows(rng)]
    rows = sorted((r for part in parts for r in part), key=lambda r: r.ts)
    return rows[:reads]


def warm(rows: list[TraceRow], policy) -> ReadDriver:
    driver = ReadDriver(policy, BLOCK)
    for r in rows:
        plan = driver.plan(ts=r.ts, job=r.job, path=r.path, version="v", offset=r.offset, size=r.size,
                           object_size=r.object_size, hint=r.hint or None)
        for fetch in plan.fetches:
            driver.arrived(fetch.key, fetch.length, 0.02)
        driver.finish(plan)
    return driver


def reported(rows: list[TraceRow], batch: int) -> list[AccessBatch]:
    return [AccessBatch.of_reads([(r.job, BatchObject(r.path, "v", r.object_size, r.hint or None), r.offset,
                                   r.size, r.ts) for r in rows[s:s + batch]])
            for s in range(0, len(rows), batch)]


def igt_state(policy: IGT) -> dict:
    """What IGT knows, by value: clock, streams, history, placements, readers, scans, levels, pool."""
    def key(stream):
        return None if stream is None else stream.key

    return {
        "clock": (policy._clock.tick, policy._clock.epoch, policy._clock.exposure, policy._next_rebalance),
        "streams": {k: (s.label, s.reads, s.reuse, s.footprint, s.last_tick, s.value, s.resident, tuple(s.blocks))
                    for k, s in policy._streams.items()},
        "history": [(k, key(v.owner), v.count, v.epoch) for k, v in policy._history._seen.items()],
        "blocks": {k: (key(b.stream), b.place, b.since) for k, b in policy._blocks.items()},
        "readers": [(k, r.end, r.last_block, r.run, r.rate, r.upto, r.current, r.reuse_visit, r.last_tick,
                     key(r.stream), r.sequential) for k, r in policy._readers.items()],
        "scanning": dict(policy._scanning),
        "levels": {k: tuple(v) for k, v in policy._levels.items()},
        "places": (list(policy._protected), dict(policy._skew), list(policy._pool.keys()), policy._pool_hits),
        "requested": {k: r.read for k, r in policy._requested.items()},
    }


def test_hits_reported_one_at_a_time_are_observed_as_planned_hits():
    rows = rows_of_a_mix(9000)
    state = pickle.dumps(warm(rows[:5000], IGT(48 * BLOCK)))
    planned, reported_one_by_one = pickle.loads(state), pickle.loads(state)
    for r in rows[5000:]:
        planned.residency.plan(ts=r.ts, job=r.job, path=r.path, version="v", offset=r.offset, size=r.size,
                               object_size=r.object_size, hint=r.hint or None)
    for batch in reported(rows[5000:], 1):
        reported_one_by_one.record_hits(batch, readahead=False)
    assert igt_state(reported_one_by_one.policy) == igt_state(planned.policy)
    assert tree_state(reported_one_by_one.streams) == tree_state(planned.streams)


def test_batches_of_hits_keep_the_accounts():
    """Reports merged from several jobs count every read as a hit, keep the policy's
    accounts sound, and ask only for blocks that are not resident."""
    rows = rows_of_a_mix(12000)
    driver = warm(rows[:4000], IGT(48 * BLOCK))
    before = {job: (c.reads, c.hits, c.bytes_from_cache) for job, c in driver.counters.jobs.items()}
    fetches = []
    for batch in reported(rows[4000:], 512):
        fetches += driver.record_hits(batch)
        assert driver.policy.violations() == [] and driver.violations() == []
    for job in {r.job for r in rows[4000:]}:
        reads = [r for r in rows[4000:] if r.job == job and r.size > 0]
        counts = driver.counters.jobs[job]
        reads_before, hits_before, bytes_before = before.get(job, (0, 0, 0))
        assert counts.reads - reads_before == counts.hits - hits_before == len(reads)
        assert counts.bytes_from_cache - bytes_before == sum(r.size for r in reads)
    assert all(f.prefetched for f in fetches)
    assert {f.key for f in fetches}.isdisjoint(driver.policy.keys())


def test_a_scan_served_by_its_client_is_read_ahead():
    driver = ReadDriver(IGT(64 * BLOCK), BLOCK)
    scan = BatchObject("data/part-0.bin", "v", 32 * BLOCK)
    reads = [("scan", scan, i * BLOCK // 2, BLOCK // 2, i * 0.1) for i in range(8)]  # blocks 0..3, slowly
    fetches = driver.record_hits(AccessBatch.of_reads(reads))
    assert fetches and all(f.prefetched and f.key.path == scan.path and f.key.index > 3 for f in fetches)
    counts = driver.counters.jobs["scan"]
    assert (counts.reads, counts.hits, counts.bytes_from_cache) == (8, 8, 4 * BLOCK)
    assert driver.streams.pattern("data/part-0.bin", "scan") is Pattern.UNKNOWN  # 4 visits: no evidence yet


def test_merged_reports_interleave_jobs_by_time():
    a, b = BatchObject("x/a", "v", BLOCK), BatchObject("y/b", "v", BLOCK)
    first = AccessBatch.of_reads([("j1", a, 0, 10, 1.0), ("j1", a, 10, 10, 3.0)])
    second = AccessBatch.of_reads([("j2", b, 0, 10, 2.0), ("j2", a, 20, 10, 3.0)])
    merged = AccessBatch.merge([first, second])
    assert [merged.jobs[j] for j in merged.job] == ["j1", "j2", "j1", "j2"]
    assert [merged.objects[o].path for o in merged.obj] == ["x/a", "y/b", "x/a", "x/a"]
    assert merged.offset.tolist() == [0, 0, 10, 20] and merged.ts.tolist() == [1.0, 2.0, 3.0, 3.0]
    assert len(AccessBatch.merge([])) == 0


def test_other_policies_see_each_reported_read():
    """A reported hit on an LRU cache makes its block the most recently used."""
    driver = ReadDriver(LRU(2 * BLOCK), BLOCK)
    keys = [BlockKey(f"f{i}", "v", 0) for i in range(3)]
    for key in keys[:2]:
        driver.arrived(key, BLOCK, 0.0)
    driver.record_hits(AccessBatch.of_reads([("j", BatchObject("f0", "v", BLOCK), 0, BLOCK, 1.0)]))
    assert driver.arrived(keys[2], BLOCK, 0.0) == [keys[1]]


def test_benchmark_runs_and_prints_every_figure(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    with open(trace, "w", newline="") as out:
        writer = TraceWriter(out)
        for row in rows_of_a_mix(1500):
            writer.write(row)
    argv = [str(trace), "--warm", "500", "--batch", "64,256", "--repeat", "1", "--per-kind", "5"]
    assert bench_policy.main(argv) == 0
    out = capsys.readouterr().out
    for needle in ("plain dict update", "read by read (plan)", "record_hits, 256 per batch",
                   "256 accesses: accuracy", "targets (<= 5 us per read batched"):
        assert needle in out
