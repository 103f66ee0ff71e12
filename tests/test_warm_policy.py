"""A warm-up declares its reads (hint ``"warm"``): the cache keeps what fits in its free room
and never evicts for them, whatever the policy."""

from __future__ import annotations

import random

import pytest

from igtcache import Cache

from .helpers import memory_remote

KiB = 1 << 10
BLOCK = 16 * KiB


@pytest.mark.parametrize("policy, hint, keeps_hot", [("igt", "warm", True), ("lru", "warm", True),
                                                     ("lru", None, False)])  # undeclared: LRU gives the hot set up
def test_a_warm_larger_than_the_cache_fills_free_room_and_leaves_the_hot_set(tmp_path, policy, hint, keeps_hot):
    remote = memory_remote()
    hot = {f"table/{i:03d}.bin": random.Random(i).randbytes(BLOCK) for i in range(16)}  # 256 KiB, skewed lookups
    cold = {f"warm/{i:03d}.bin": random.Random(1000 + i).randbytes(4 * BLOCK) for i in range(32)}  # 2 MiB
    for name, data in {**hot, **cold}.items():
        remote.put(name, data)
    rng = random.Random(7)
    names = sorted(hot)
    with Cache(**remote.cache_args(), cache_dir=tmp_path / "c", block_size=BLOCK, memory_bytes=256 * KiB,
               disk_bytes=1 << 20, policy=policy) as cache:
        for _ in range(2000):  # Zipf-like: a few records read far more often than the rest
            name = names[min(int(rng.paretovariate(1.2)) - 1, len(names) - 1)]
            assert cache.read(name, job="lookups") == hot[name]
        for name, data in cold.items():  # twice the cache, front to back, declared
            for offset in range(0, len(data), BLOCK):
                assert cache.read(name, offset, BLOCK, job="igtcache-warm", hint=hint) == data[offset:offset + BLOCK]
        cache.flush()
        held = sum(cache.residency(name)["disk"] for name in hot)
        warmed = sum(cache.residency(name)["disk"] for name in cold)
        cache.check_invariants()
    assert (held == sum(map(len, hot.values()))) is keeps_hot, held
    if hint:
        assert warmed == (1 << 20) - held  # the free room, filled
