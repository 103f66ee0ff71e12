"""The policy interface as the engine drives it: every access observed, prefetch honoured."""

from __future__ import annotations

import os
import time

import pytest

from igtcache import Cache
from igtcache.policies import LRU, Access

from .helpers import memory_remote

BLOCK = 1024


class Recorder(LRU):
    """LRU that records what the engine tells it and prefetches the next block."""

    name = "recorder"

    def __init__(self, capacity: int, readahead: int = 1) -> None:
        super().__init__(capacity)
        self.readahead = readahead
        self.seen: list[Access] = []

    def observe(self, access: Access) -> None:
        self.seen.append(access)

    def prefetch(self, access: Access) -> list[int]:
        return list(range(access.last_block + 1, access.last_block + 1 + self.readahead))


def _wait_for(predicate, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_every_read_reaches_the_policy_with_job_and_hit_flag():
    remote = memory_remote()
    remote.put("f", os.urandom(4 * BLOCK))
    policy = Recorder(64 * BLOCK, readahead=0)
    with Cache(**remote.cache_args(), block_size=BLOCK, policy=policy) as cache:
        cache.read("f", 0, BLOCK, job="a")
        cache.read("f", 10, 20, job="b", hint="random")
        cache.read("f", BLOCK, 2 * BLOCK, job="a")
    assert [(a.job, a.hit, a.first_block, a.last_block) for a in policy.seen] == [
        ("a", False, 0, 0), ("b", True, 0, 0), ("a", False, 1, 2),
    ]
    assert policy.seen[1].hint == "random"
    assert all(a.object_size == 4 * BLOCK and a.block_size == BLOCK for a in policy.seen)


def test_prefetched_blocks_turn_the_next_read_into_a_hit():
    remote = memory_remote()
    data = os.urandom(8 * BLOCK)
    remote.put("seq", data)
    policy = Recorder(64 * BLOCK, readahead=2)
    with Cache(**remote.cache_args(), block_size=BLOCK, policy=policy) as cache:
        assert cache.read("seq", 0, BLOCK) == data[:BLOCK]
        _wait_for(lambda: cache.stats()["prefetch"]["bytes"] == 2 * BLOCK)
        assert cache.read("seq", BLOCK, BLOCK) == data[BLOCK:2 * BLOCK]
        stats = cache.stats()
        assert stats["hits"] == 1
        assert stats["prefetch"]["issued"] >= 2 and stats["prefetch"]["used"] == 1


def test_prefetched_blocks_evicted_unread_count_as_waste():
    remote = memory_remote()
    remote.put("a", os.urandom(4 * BLOCK))
    remote.put("b", os.urandom(4 * BLOCK))
    policy = Recorder(3 * BLOCK, readahead=2)
    with Cache(**remote.cache_args(), block_size=BLOCK, memory_bytes=3 * BLOCK, policy=policy) as cache:
        cache.read("a", 0, BLOCK)
        _wait_for(lambda: cache.stats()["prefetch"]["bytes"] == 2 * BLOCK)
        policy.readahead = 0
        for i in range(3):
            cache.read("b", i * BLOCK, BLOCK)
        assert cache.stats()["prefetch"]["wasted_bytes"] == 2 * BLOCK


def test_policy_larger_than_its_tier_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        Cache(**memory_remote().cache_args(), memory_bytes=BLOCK, policy=LRU(2 * BLOCK))


def test_stats_list_the_streams_each_job_makes():
    remote = memory_remote()
    remote.put("data/big", os.urandom(256 * BLOCK))
    with Cache(**remote.cache_args(), block_size=BLOCK, memory_bytes=512 * BLOCK) as cache:
        for i in range(200):
            cache.read("data/big", i * BLOCK, BLOCK, job="scanner")
        streams = cache.stats()["streams"]
    ours = [s for s in streams if s["path"] == "data/big" and s["job"] == "scanner"]
    assert ours and ours[0]["label"] == "sequential"
    assert ours[0]["samples"] >= 8 and ours[0]["rate"] > 0


def test_a_recorded_live_trace_replays_to_the_same_hits(tmp_path):
    from igtcache.bench.replay import replay
    from igtcache.bench.trace import load_trace

    remote = memory_remote()
    for i in range(6):
        remote.put(f"d/f{i}", os.urandom(3 * BLOCK + 5))
    trace = tmp_path / "live.csv"
    rng = __import__("random").Random(3)
    with Cache(**remote.cache_args(), block_size=BLOCK, memory_bytes=8 * BLOCK, policy="lru",
               trace_path=trace) as cache:
        for _ in range(300):
            path = f"d/f{rng.randrange(6)}"
            cache.read(path, rng.randrange(3 * BLOCK), rng.randrange(1, BLOCK), job=f"j{rng.randrange(2)}")
        live = cache.stats()
    rows = load_trace(trace)
    assert len(rows) == 300
    replayed = replay(rows, "lru", 8 * BLOCK, block_size=BLOCK, latency_s=0.0, bandwidth_Bps=1e12)
    assert replayed["hit_ratio"] == live["hit_ratio"]
    assert replayed["byte_hit_ratio"] == live["byte_hit_ratio"]
