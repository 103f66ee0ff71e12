"""The IGT policy on small traces: each of its properties, against the baselines.

Every test replays a tiny synthetic trace through ``igtcache.bench.replay``
(the Residency code path the engine uses), with fixed seeds, and checks one
property that a plain policy fails.
"""

from __future__ import annotations

import itertools
import random

import pytest

from igtcache.bench import gen
from igtcache.bench.replay import footprint, replay
from igtcache.bench.trace import TraceRow
from igtcache.patterns import Pattern
from igtcache.policies import IGT, POLICIES, ARC, BlockKey, make_policy
from igtcache.policies.igt import IGTParams
from igtcache.policies.igt_readahead import Readahead
from igtcache.residency import Residency, block_length
from igtcache.stream_tree import Level

KiB, MiB = 1024, 1024**2
BASELINES = ["lru", "lfu", "arc", "s3fifo"]


class IGTNoReadahead(IGT):
    """IGT deciding residency only, so hit ratios measure what it keeps."""

    name = "igt-noreadahead"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, readahead=False)


@pytest.fixture(autouse=True)
def _no_readahead_variant(monkeypatch):
    monkeypatch.setitem(POLICIES, IGTNoReadahead.name, IGTNoReadahead)


def run(rows, names, capacity, block_size, **link) -> dict[str, dict]:
    return {name: replay(rows, name, capacity, block_size, **link) for name in names}


def hit_ratio_from(rows, name, capacity, block_size, start: int, job: str | None = None) -> float:
    """Hit ratio of the reads ``rows[start:]`` (of ``job`` only, if given), after a warm-up."""
    def hits(part):
        result = replay(part, name, capacity, block_size)
        counts = result["jobs"][job] if job else result
        return counts["hit_ratio"] * counts["reads"], counts["reads"]

    (all_hits, all_reads), (warm_hits, warm_reads) = hits(rows), hits(rows[:start])
    return (all_hits - warm_hits) / (all_reads - warm_reads)


def zipf_rows(objects: int, reads: int, exponent: float, seed: int, size: int) -> list[TraceRow]:
    """Whole reads of one-block objects with Zipf popularity, two jobs taking turns."""
    rng = random.Random(seed)
    weights = list(itertools.accumulate((r + 1) ** -exponent for r in range(objects)))
    ids = rng.sample(range(objects), objects)
    picks = rng.choices(range(objects), cum_weights=weights, k=reads)
    return [TraceRow(n * 1e-3, f"j{n % 2}", f"kv/obj{ids[r]:05d}", 0, size, size) for n, r in enumerate(picks)]


def test_registered():
    assert POLICIES["igt"] is IGT
    assert isinstance(make_policy("igt", 1 << 20), IGT)


def test_loop_larger_than_cache_keeps_a_stable_part():
    """A loop over 2x-10x the cache: IGT hits ~capacity/size per pass, LRU nothing."""
    block = 256 * KiB
    loops = 4
    rows = list(gen.Loop(files=16, file_size=4 * MiB, loops=loops, read_size=block).rows(random.Random(1)))
    size = footprint(rows, block)
    for share in (0.1, 0.3, 0.5):
        results = run(rows, ["igt-noreadahead", "lru"], int(size * share), block)
        ideal = share * (loops - 1) / loops  # the first pass always misses
        assert results["igt-noreadahead"]["hit_ratio"] >= 0.9 * ideal
        assert results["lru"]["hit_ratio"] < 0.01


def test_epoch_reshuffle_keeps_a_stable_subset():
    """Shuffled epochs over a dataset 5x the cache: ~capacity/dataset per epoch, no churn."""
    epochs = 3
    rows = list(gen.ImageFolder(files=3000, classes=20, epochs=epochs, mean_size=48 * KiB)
                .rows(random.Random(2)))
    block = 1 * MiB
    share = 0.2
    results = run(rows, ["igt", *BASELINES], int(footprint(rows, block) * share), block)
    ideal = share * (epochs - 1) / epochs
    assert results["igt"]["hit_ratio"] >= 0.75 * ideal
    assert max(results[b]["hit_ratio"] for b in BASELINES) < 0.4 * ideal


def test_working_set_that_fits_is_kept_whole():
    """Uniform reads over a file that fits, beside one-pass scans that would flush it."""
    block = 256 * KiB
    rng = random.Random(3)
    hot_size = 8 * MiB
    rows = []
    for n, row in enumerate(gen.Preprocess(jobs=2, files=16, file_size=16 * MiB, read_size=block).rows(rng)):
        rows.append(row)
        if n % 2:
            offset = rng.randrange(hot_size // (16 * KiB)) * 16 * KiB
            rows.append(TraceRow(row.ts, "reader", "hot/table.bin", offset, 16 * KiB, hot_size))
    capacity = hot_size + 4 * MiB
    warm = len(rows) // 3
    assert hit_ratio_from(rows, "igt-noreadahead", capacity, block, warm, "reader") == 1.0
    assert hit_ratio_from(rows, "lru", capacity, block, warm, "reader") < 0.6


def test_one_pass_scan_does_not_flush_a_skewed_working_set():
    """A Zipf reader keeps its hit ratio while a scan 16x the cache streams through."""
    block = 64 * KiB
    zipf = zipf_rows(2000, 12000, 1.0, seed=4, size=block)
    scan = list(gen.Preprocess(jobs=1, files=16, file_size=12 * MiB, read_size=block).rows(random.Random(4)))
    scan = [r._replace(ts=r.ts * zipf[-1].ts / scan[-1].ts) for r in scan]  # the same span
    rows = sorted(zipf + scan, key=lambda r: r.ts)
    capacity = 12 * MiB
    alone = run(zipf, ["igt"], capacity, block)["igt"]["hit_ratio"]
    mixed = run(rows, ["igt", "lru"], capacity, block)

    def zipf_hit(result):
        return sum(result["jobs"][j]["hit_ratio"] for j in ("j0", "j1")) / 2

    assert zipf_hit(mixed["igt"]) >= alone - 0.02
    assert zipf_hit(mixed["lru"]) < alone - 0.1


def test_zipf_within_two_points_of_the_best_baseline():
    block = 64 * KiB
    rows = zipf_rows(4000, 24000, 0.9, seed=5, size=block)
    size = footprint(rows, block)
    for share in (0.05, 0.2):
        results = run(rows, ["igt", *BASELINES], int(size * share), block)
        best = max(results[b]["hit_ratio"] for b in BASELINES)
        assert results["igt"]["hit_ratio"] >= best - 0.02


def test_shifted_hot_set_is_taken_over_within_bounded_accesses():
    """80% of reads go to 40 hot objects; then to 40 others. In-cache LFU never recovers."""
    block = 64 * KiB
    rng = random.Random(6)
    objects = rng.sample(range(2000), 2000)
    old_hot, new_hot = objects[:40], objects[40:80]
    shift, total = 16000, 28000
    picks = [rng.choice(old_hot if n < shift else new_hot) if rng.random() < 0.8 else rng.randrange(2000)
             for n in range(total)]
    rows = [TraceRow(n * 1e-3, "j", f"hot/o{i:05d}", 0, block, block) for n, i in enumerate(picks)]

    def hit_ratio_after(name: str, start: int, end: int) -> float:
        after = rows[:end]
        late = rows[:start]
        hits_end = replay(after, name, 50 * block, block)
        hits_start = replay(late, name, 50 * block, block)
        hits = hits_end["hit_ratio"] * len(after) - hits_start["hit_ratio"] * len(late)
        return hits / (end - start)

    before = hit_ratio_after("igt", shift - 4000, shift)
    assert before > 0.7
    bound = 4000  # a few aging periods (1024 reads or 8 per resident block)
    assert hit_ratio_after("igt", shift + bound, total) >= before - 0.05
    assert hit_ratio_after("lfu", shift + bound, total) < 0.3


def test_a_finished_jobs_hot_set_gives_way_to_a_running_job():
    """A short inference job reads hot adapters while a training job starts 2 shuffled epochs over 3x the cache.

    The adapters must be kept while they are read (a short run is valued
    from its first reads), and given up once their job has gone quiet, so
    that the training job enters its second epoch with the whole cache.
    """
    rng = random.Random(7)
    adapter, sample, files = 2 * MiB, 128 * KiB, 480
    epochs = [rng.sample(range(files), files) for _ in range(2)]
    weights = list(itertools.accumulate((r + 1) ** -1.1 for r in range(8)))
    hot = rng.choices(range(8), cum_weights=weights, k=150)
    rows = []
    for n, f in enumerate(itertools.chain(*epochs)):
        rows.append(TraceRow(len(rows) * 1e-3, "train", f"train/{f:05d}.bin", 0, sample, sample))
        if n < len(hot):
            rows.append(TraceRow(len(rows) * 1e-3, "hot", f"adapters/{hot[n]:05d}.bin", 0, adapter, adapter))
    capacity, block = 20 * MiB, 1 * MiB  # the adapters take 16 MiB, the dataset 60 MiB
    results = run(rows, ["igt-noreadahead", "lru"], capacity, block)
    assert results["igt-noreadahead"]["jobs"]["hot"]["hit_ratio"] >= results["lru"]["jobs"]["hot"]["hit_ratio"]
    second_epoch = hit_ratio_from(rows, "igt-noreadahead", capacity, block, len(rows) - files, "train")
    assert second_epoch >= 0.8 * capacity / (files * sample)


def test_sequential_scans_are_prefetched_with_little_waste():
    """One-pass scans at 1 GB/s over a 20 ms remote: most reads hit, where LRU hits none.

    Blocks are cached when they arrive, so the reads of a file's first
    20 ms (the readahead's lead, 20 blocks of 4 reads) wait on fetches in
    flight and miss; LRU's reads all wait on their own demand fetches."""
    block = 1 * MiB
    files = 4
    rows = list(gen.Preprocess(jobs=2, files=files, file_size=128 * MiB, read_size=256 * KiB,
                               throughput=1000**3).rows(random.Random(7)))
    results = run(rows, ["igt", "lru"], 256 * MiB, block, latency_s=0.02, bandwidth_Bps=4e9)
    igt = results["igt"]
    assert igt["byte_hit_ratio"] >= 0.75
    assert igt["hit_ratio"] > results["lru"]["hit_ratio"] + 0.5
    assert igt["wasted_prefetch_bytes"] <= 0.1 * igt["remote_bytes"]
    assert igt["late_prefetches"] <= files


@pytest.mark.parametrize("latency_s", [0.005, 0.05])
def test_readahead_depth_follows_latency(latency_s):
    """The same scan behind a 10x slower remote still hits once under way: the window deepens.

    Only the reads at the start of each file miss: those of the blocks a
    scan needs before any fetch could land (the lead), or, where that is
    shorter, of the blocks it reads before it is recognised as a scan.
    """
    block = 1 * MiB
    rows = list(gen.Preprocess(jobs=1, files=2, file_size=256 * MiB, read_size=512 * KiB,
                               throughput=400 * 1000**2).rows(random.Random(8)))
    result = replay(rows, "igt", 256 * MiB, block, latency_s=latency_s, bandwidth_Bps=4e9)
    lead = latency_s * 400e6 / block + 2
    warm_up = 13  # blocks read before the scan is recognised
    reads_per_block = block // (512 * KiB)
    assert result["hit_ratio"] >= 1 - 2 * max(lead, warm_up) * reads_per_block / len(rows)
    assert result["late_prefetches"] <= 2
    assert result["wasted_prefetch_bytes"] == 0


def test_readahead_window():
    ra = Readahead(max_depth=32)
    ra.observe_fetch(0.02)
    assert ra.window(None, MiB, 1, 32) == (1, 4)  # no rate yet: a default window
    # 20 ms at 100 MB/s is 2 blocks of 1 MiB: those would arrive late.
    assert ra.window(100e6, MiB, 1, 32) == (3, 4)
    assert ra.window(1000e6, MiB, 1, 32) == (21, 22)  # 10x the rate, 10x the lead
    assert ra.window(1000e6, MiB, 1, 8) == (21, 8)  # capped: nothing worth requesting
    for _ in range(100):
        ra.observe_fetch(0.2)
    assert ra.window(100e6, MiB, 1, 32) == (21, 22)  # the remote got slower


class _Unlabelled:
    """A stream tree that never finds a pattern."""

    region_size = 1 << 62

    def record(self, *args) -> None:
        pass

    def act_level(self, path, job=None, offset=None) -> Level:
        return Level(path.rpartition("/")[0], "dir", None, Pattern.UNKNOWN)

    def levels(self, path, job=None, offset=None) -> list[Level]:
        return [self.act_level(path, job, offset)]

    def skewed_ancestor(self, path, job=None) -> None:
        return None


def test_without_any_label_igt_is_its_arc_fallback():
    block = 64 * KiB
    rows = zipf_rows(1500, 8000, 0.8, seed=9, size=block)
    outcomes = {}
    for policy in (IGT(40 * block), ARC(40 * block)):
        residency = Residency(policy, block, streams=_Unlabelled())
        hits = []
        for row in rows:
            plan = residency.plan(ts=row.ts, job=row.job, path=row.path, version="v",
                                  offset=row.offset, size=row.size, object_size=row.object_size)
            hits.append(not plan.missing)
            for key in plan.missing:
                residency.admit(key, block)
        outcomes[policy.name] = hits
    assert outcomes["igt"] == outcomes["arc"]
    assert 0.2 < sum(outcomes["igt"]) / len(rows) < 0.9


def _check_consistent(policy: IGT) -> None:
    """Every resident block is kept in exactly one place, and the byte counts agree."""
    places = {
        "protected": set(policy._protected),
        "uniform": {k for s in policy._streams.values() for k in s.blocks},
        "skewed": set(policy._skew),
        "pool": set(policy._pool.keys()),
    }
    assert sum(len(p) for p in places.values()) == len(policy)
    assert set().union(*places.values()) == set(policy.keys())
    assert policy._protected_bytes == sum(policy._blocks[k].size for k in places["protected"])
    assert policy._protected_bytes <= policy.params.protect_share * policy.capacity


def test_never_exceeds_capacity_under_mixed_churn():
    """Scans, random and skewed reads of objects of many sizes, prefetch, invalidations."""
    rng = random.Random(10)
    block = 64 * KiB
    capacity = 3 * MiB + 12345
    policy = IGT(capacity)
    residency = Residency(policy, block)
    sizes = {f"d{d}/f{i}": rng.choice([7 * KiB, block, 5 * block + 3, 40 * block])
             for d in range(4) for i in range(30)}
    paths = list(sizes)
    positions: dict[tuple[str, str], int] = {}
    for n in range(6000):
        job = f"j{rng.randrange(4)}"
        if job == "j0":  # scans
            path = paths[(n // 50) % len(paths)]
            offset = positions.get((job, path), 0)
        elif job == "j1":  # skewed
            path = paths[min(int(rng.paretovariate(1.2)) - 1, len(paths) - 1)]
            offset = rng.randrange(sizes[path])
        else:  # uniform
            path = rng.choice(paths)
            offset = rng.randrange(sizes[path])
        object_size = sizes[path]
        size = min(rng.choice([4 * KiB, 32 * KiB, block]), object_size - offset)
        positions[(job, path)] = (offset + size) % object_size
        plan = residency.plan(ts=n * 1e-3, job=job, path=path, version="v", offset=offset,
                              size=size, object_size=object_size)
        for key in plan.missing:
            residency.admit(key, block_length(key.index, object_size, block))
            assert policy.used <= capacity
        for key in residency.prefetch(plan.access):
            residency.admit(key, block_length(key.index, object_size, block), prefetched=True)
            assert policy.used <= capacity
        if n % 97 == 0 and len(policy):
            residency.drop(rng.choice(policy.keys()))
        if n % 500 == 0:
            _check_consistent(policy)
    assert policy.used == sum(
        block_length(k.index, sizes[k.path], block) for k in policy.keys() if isinstance(k, BlockKey)
    )
    _check_consistent(policy)
    assert 0 < policy.used <= capacity


class _ShallowIGT(IGT):
    name = "igt-shallow"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, params=IGTParams(max_depth=2, hysteresis=0.2))


def test_parameters_show_in_the_label_and_the_results(monkeypatch):
    assert IGT(MiB).label == "igt" and IGTParams().changed() == {}
    monkeypatch.setitem(POLICIES, _ShallowIGT.name, _ShallowIGT)
    rows = list(gen.Preprocess(jobs=1, files=1, file_size=64 * MiB, read_size=256 * KiB,
                               throughput=1000**3).rows(random.Random(2)))
    shallow, default = (replay(rows, name, 256 * MiB, MiB, latency_s=0.02) for name in ("igt-shallow", "igt"))
    assert shallow["policy"] == "igt-shallow(hysteresis=0.2, max_depth=2)" and default["policy"] == "igt"
    assert shallow["hit_ratio"] < default["hit_ratio"]  # 2 blocks ahead cannot hide 20 ms at 1 GB/s
