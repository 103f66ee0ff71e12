"""Baseline policies: capacity bound, hand-checked eviction orders, scan resistance, Belady's optimality."""

from __future__ import annotations

import random

import pytest

from igtcache.policies import (
    ARC, FIFO, LFU, LRU, POLICIES, S3FIFO, Belady, BlockKey, FutureOracle, Policy, make_policy,
)
import igtcache.policies as policies
from igtcache.residency import Residency

BASELINES = ["lru", "fifo", "lfu", "arc", "s3fifo"]
BLOCK = 1 << 20


def run(policy_name: str, capacity: int, reads: list[tuple[str, int]], drop_every: int = 0) -> tuple[int, Policy]:
    """Drive a policy through Residency over one-block objects ``(path, size)``.

    Returns the number of hits and the policy, checking the byte bound after
    every admission.
    """
    if policy_name == "belady":
        policy = Belady(capacity, oracle=FutureOracle(BlockKey(path, "v", 0) for path, _ in reads))
    else:
        policy = POLICIES[policy_name](capacity)
    residency = Residency(policy, BLOCK)
    sizes: dict = {}
    hits = 0
    for n, (path, size) in enumerate(reads):
        plan = residency.plan(ts=n, job="j", path=path, version="v", offset=0, size=size, object_size=size)
        hits += plan.access.hit
        for key in plan.missing:
            sizes[key] = size
            residency.admit(key, size)
            assert policy.used <= capacity
            assert policy.used == sum(sizes[k] for k in policy.keys())
        if drop_every and n % drop_every == 0 and len(policy):
            residency.drop(random.Random(n).choice(policy.keys()))
    return hits, policy


@pytest.mark.parametrize("name", BASELINES + ["belady"])
def test_never_exceeds_capacity_under_churn(name):
    rng = random.Random(7)
    sizes = {f"obj{i}": rng.randint(1, 300_000) for i in range(300)}
    hot = list(sizes)[:30]
    reads = [(path, sizes[path]) for path in (rng.choice(hot if rng.random() < 0.5 else list(sizes)) for _ in range(5000))]
    hits, policy = run(name, 2_000_000, reads, drop_every=97)
    assert 0 < hits < len(reads)
    assert 0 < policy.used <= 2_000_000


def unit(policy, *keys):
    """Insert unit-size keys; return the evictions of each insertion."""
    return [policy.insert(key, 1) for key in keys]


def test_lru_order():
    p = LRU(3)
    unit(p, "a", "b", "c")
    p.touch("a")
    assert unit(p, "d") == [["b"]]
    p.touch("c")
    assert unit(p, "e") == [["a"]]
    assert sorted(p.keys()) == ["c", "d", "e"]


def test_fifo_ignores_hits():
    p = FIFO(3)
    unit(p, "a", "b", "c")
    p.touch("a")
    assert unit(p, "d", "e") == [["a"], ["b"]]
    assert sorted(p.keys()) == ["c", "d", "e"]


def test_lfu_evicts_least_used_then_least_recent():
    p = LFU(3)
    unit(p, "a", "b", "c")
    for key in ("a", "a", "b"):
        p.touch(key)  # a=3 b=2 c=1
    assert unit(p, "d") == [["c"]]
    p.touch("d")  # d=2 ties b=2, but b was used longer ago
    assert unit(p, "e") == [["b"]]
    assert unit(p, "f") == [["e"]]  # e=1 is the least used
    assert sorted(p.keys()) == ["a", "d", "f"]


def test_arc_adapts_to_ghost_hits():
    p = ARC(4)
    unit(p, "a", "b", "c", "d")
    p.touch("a")
    p.touch("b")  # T1 = c d, T2 = a b
    assert unit(p, "e") == [["c"]]  # T1 over target p=0: its LRU goes to ghost B1
    assert unit(p, "c") == [["d"]]  # B1 hit: p grows to 1, c joins T2, T1 still over target
    assert p.p == 1
    assert unit(p, "f") == [["a"]]  # T1 = e at target: T2's LRU goes to B2
    assert unit(p, "a") == [["e"]]  # B2 hit: p shrinks to 0
    assert p.p == 0
    assert sorted(p.keys()) == ["a", "b", "c", "f"]


def test_s3fifo_small_main_ghost():
    p = S3FIFO(10)  # small share 1 byte, main 9
    keys = list("abcdefghij")
    unit(p, *keys)
    for key in keys:
        p.touch(key)
        p.touch(key)
    # Full: everything in S was used twice, so it moves to M until M is over
    # its share; then M's head (its count reset by the move) is evicted.
    assert unit(p, "x") == [["a"]]
    p.touch("b")
    assert unit(p, "y") == [["x"]]  # x was never used: out of S into the ghost
    assert unit(p, "x") == [["y"]]  # ghost hit: x goes to M; y leaves S
    # S is empty: M runs CLOCK; b has a use left, so it is reinserted and c goes.
    assert unit(p, "w") == [["c"]]
    assert sorted(p.keys()) == sorted("bdefghijwx")


def scan_trace(hot: int = 60, scan: int = 500) -> list[tuple[str, int]]:
    """A hot set used over and over, then a one-time scan, then the hot set again."""
    hot_keys = [f"hot{i}" for i in range(hot)]
    reads = hot_keys * 3
    for i in range(scan):
        reads.append(f"scan{i}")
        if i % 5 == 0:
            reads.append(hot_keys[(i // 5) % hot])
    reads += hot_keys * 3
    return [(key, 1) for key in reads]


def test_arc_and_s3fifo_resist_a_scan_better_than_lru():
    reads = scan_trace()
    lru, _ = run("lru", 100, reads)
    for name in ("arc", "s3fifo"):
        hits, _ = run(name, 100, reads)
        assert hits > lru + 60, (name, hits, lru)


@pytest.mark.parametrize("seed", range(4))
def test_belady_beats_every_baseline_on_random_traces(seed):
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(80)]
    reads = [(f"k{i}", 1) for i in rng.choices(range(80), weights=weights, k=3000)]
    best, _ = run("belady", 12, reads)
    for name in BASELINES:
        hits, _ = run(name, 12, reads)
        assert best >= hits, name


def test_belady_needs_an_oracle():
    with pytest.raises(ValueError, match="trace replay"):
        make_policy("belady", 1 << 30)
    with pytest.raises(ValueError, match="trace replay"):
        Belady(1 << 30)


def test_oracle_checks_the_request_order():
    oracle = FutureOracle(["a", "b", "a"])
    assert oracle.next_use("a") == 0 and oracle.next_use("b") == 1
    oracle.advance("a")
    assert oracle.next_use("a") == 2
    with pytest.raises(ValueError, match="out of step"):
        oracle.advance("a")


def test_register_policy_refuses_to_replace_another_unless_asked(monkeypatch):
    monkeypatch.setattr(policies, "POLICIES", dict(POLICIES))  # a registry of the test's own

    class Mine(LRU):
        name = "Mine"

    assert policies.register_policy(Mine) is Mine and policies.POLICIES["mine"] is Mine
    assert policies.register_policy(Mine) is Mine  # the same class again is no conflict

    class Other(LRU):
        name = "mine"

    with pytest.raises(ValueError, match="already"):
        policies.register_policy(Other)
    policies.register_policy(Other, clobber=True)
    assert policies.make_policy("MINE", 10).__class__ is Other


@pytest.mark.parametrize("name", BASELINES + ["igt"])
def test_to_evict_names_what_insert_would_evict_and_changes_nothing(name):
    """The pure inspection and the eviction agree, and the inspection leaves no trace: the run goes
    on exactly as one that never asked."""
    rng = random.Random(11)
    reads = [(f"o{min(int(rng.paretovariate(1.1)), 300)}", rng.choice([BLOCK // 4, BLOCK // 2, BLOCK]))
             for _ in range(1500)]
    sizes = dict(reversed(reads))  # one size per object, its first
    reads = [(path, sizes[path]) for path, _ in reads]
    asked, policy = run(name, 6 * BLOCK, reads)
    silent, twin = run(name, 6 * BLOCK, reads)
    evicting = 0
    for i in range(40):
        key = BlockKey(f"new{i}", "v", 0)
        size = rng.choice([BLOCK // 4, BLOCK])
        before = (list(policy.keys()), policy.used)
        predicted = policy.to_evict(key, size)
        assert (list(policy.keys()), policy.used) == before  # nothing changed
        assert predicted == policy.insert(key, size)
        twin.insert(key, size)
        assert list(policy.keys()) == list(twin.keys())  # as if never asked
        evicting += bool(predicted)
    assert asked == silent and evicting >= 20  # the cache was full: most insertions had to make room


def test_scan_readahead_pairs_with_any_eviction_policy():
    """``lru+readahead``: LRU's eviction, blocks read ahead of a scanning reader and not of a
    reader that jumps; the pairing changes no eviction."""
    from igtcache.policies import Access

    def access(offset: int, ts: float, job: str = "scan") -> Access:
        first = offset // BLOCK
        return Access(ts=ts, job=job, path="big", version="v", offset=offset, size=BLOCK, object_size=64 * BLOCK,
                      block_size=BLOCK, first_block=first, last_block=first, hit=False)

    paired, plain = make_policy("lru+readahead", 32 * BLOCK), make_policy("lru", 32 * BLOCK)
    assert paired.name == "lru+readahead" and isinstance(paired, LRU)
    ahead = []
    for i in range(4):  # 2 MB/s: blocks a default 50 ms fetch brings in time
        paired.observe(access(i * BLOCK, i * 0.5))
        ahead.append(paired.prefetch(access(i * BLOCK, i * 0.5)))
    assert ahead[0] == [] and ahead[1] and all(index > 1 for index in ahead[1])  # read ahead from the second read
    assert not set(ahead[2]) & set(ahead[1])  # never asked twice
    paired.observe(access(40 * BLOCK, 1.0, job="jumper"))
    assert paired.prefetch(access(40 * BLOCK, 1.0, job="jumper")) == []
    for n in range(40):
        key = BlockKey("o", "v", n)
        assert paired.insert(key, BLOCK) == plain.insert(key, BLOCK)
        if n % 3 == 0:
            paired.touch(BlockKey("o", "v", n // 2))
            plain.touch(BlockKey("o", "v", n // 2))
    assert paired.keys() == plain.keys()
