"""IGT on an inference node: whole adapters read ahead, skewed tables kept, both on one link."""

from __future__ import annotations

import random

import pytest

from igtcache.bench import gen
from igtcache.bench.replay import footprint, replay
from igtcache.policies import IGT
from igtcache.policies import IGTParams
from igtcache.read_driver import ReadDriver

KiB, MiB = 1024, 1024**2
EMBED = "inference-embed-0"
CLASSICAL = ["lru", "arc", "s3fifo"]
LINK = {"latency_s": 0.02, "bandwidth_Bps": 500e6}


def node(**options) -> list:
    """A small inference node: 1 MiB blocks, 4 MiB adapters read in 256 KiB pieces, a 64 MiB table."""
    scenario = gen.Inference(**{"jobs": 2, "loads": 200, "adapters": 40, "adapter_size": 4 * MiB,
                                "read_size": 256 * KiB, "interval": 0.05, "throughput": 50 * 1000**2,
                                "lookups": 20000, "table_size": 64 * MiB, "record_size": 4 * KiB, **options})
    return list(scenario.rows(random.Random(5)))


def embed_hit_ratio(rows: list, name: str, capacity: int, start: int = 0, end: int | None = None) -> float:
    """The lookups' hit ratio over ``rows[start:end]``, each replayed after the rows before it."""
    def hits(stop):
        job = replay(rows[:stop], name, capacity, MiB, **LINK)["jobs"][EMBED]
        return job["hit_ratio"] * job["reads"], job["reads"]

    (h1, n1), (h0, n0) = hits(len(rows) if end is None else end), (hits(start) if start else (0.0, 0))
    return (h1 - h0) / (n1 - n0)


def load(driver: ReadDriver, ts: float, job: str, path: str, size: int, piece: int) -> list[list[int]]:
    """Read ``path`` whole in ``piece``-sized reads; the readahead block indices each read issued."""
    issued = []
    for offset in range(0, size, piece):
        plan = driver.plan(ts=ts, job=job, path=path, version="v", offset=offset, size=piece, object_size=size)
        issued.append([f.key.index for f in plan.fetches if f.prefetched])
        for fetch in plan.fetches:
            driver.arrived(fetch.key, fetch.length, 0.02)
        driver.finish(plan)
        ts += 0.001
    return issued


def test_a_whole_object_load_is_read_ahead_from_its_first_piece():
    driver = ReadDriver(IGT(64 * MiB), MiB)
    load(driver, 0.0, "serve", "adapters/a/adapter.safetensors", 6 * MiB, 256 * KiB)
    issued = load(driver, 1.0, "serve", "adapters/b/adapter.safetensors", 6 * MiB, 256 * KiB)
    assert issued[0] == [1, 2, 3, 4, 5]  # the job loads objects whole: the rest of b, from b's first piece
    assert not any(issued[1:])


def test_one_off_adapter_loads_do_not_displace_a_hot_table():
    rows = node(jobs=1, loads=300, adapters=100_000, zipf=0.0, table_size=16 * MiB, shift_at=1.0)
    assert len({r.path for r in rows if r.offset == 0 and "-serve-" in r.job}) > 290  # nearly all one-off
    alone = [r for r in rows if r.job == EMBED]
    capacity = 12 * MiB
    beside = embed_hit_ratio(rows, "igt", capacity)
    assert beside >= embed_hit_ratio(alone, "igt", capacity) - 0.01
    assert beside > embed_hit_ratio(rows, "lru", capacity) + 0.03


def test_a_shifted_hot_set_is_followed_within_one_aging_period():
    rows = node(shift_at=0.5)
    shift = [i for i, r in enumerate(rows) if r.job == EMBED][10_000]
    capacity = 16 * MiB  # 16 blocks: the aging period is its shortest
    before = embed_hit_ratio(rows, "igt", capacity, shift - 4000, shift)
    assert before > 0.8
    assert embed_hit_ratio(rows, "igt", capacity, shift + IGTParams().min_aging_period) >= before - 0.02
    assert embed_hit_ratio(rows, "lfu", capacity, shift + IGTParams().min_aging_period) < 0.5 * before


@pytest.mark.parametrize("zipf, share, over_classical", [
    (0.8, 0.1, 1.3), (0.8, 0.3, 1.3), (1.2, 0.1, 1.3),
    (1.2, 0.3, 1.2),  # skewed enough that classical policies keep the hot adapters too: 1.25x here
])
def test_inference_byte_hits_beat_classical_policies_and_belady(zipf, share, over_classical):
    scenario = gen.Inference(jobs=2, loads=400, adapters=60, adapter_size=4 * MiB, read_size=256 * KiB,
                             zipf=zipf, interval=0.05, throughput=50 * 1000**2, lookups=20000,
                             table_size=64 * MiB, record_size=4 * KiB, table_zipf=zipf)
    rows = list(scenario.rows(random.Random(3)))
    capacity = int(footprint(rows, MiB) * share)
    results = {name: replay(rows, name, capacity, MiB, **LINK) for name in ["igt", "belady", *CLASSICAL]}
    igt = results["igt"]
    assert igt["byte_hit_ratio"] >= over_classical * max(results[n]["byte_hit_ratio"] for n in CLASSICAL)
    assert igt["byte_hit_ratio"] >= results["belady"]["byte_hit_ratio"]
    assert igt["hit_ratio"] > max(results[n]["hit_ratio"] for n in CLASSICAL)
    assert igt["stall_s"] < min(results[n]["stall_s"] for n in CLASSICAL)
