"""Tier bounds under churn, restart persistence (clean close and kill -9), corruption."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

from igtcache import Cache, CacheDirInUse

from .helpers import file_remote, in_threads

BLOCK = 32 * 1024


def _populate(remote, count: int, rng: random.Random) -> dict[str, bytes]:
    objects = {f"o{i:03d}": rng.randbytes(rng.randint(1, 4 * BLOCK)) for i in range(count)}
    for path, data in objects.items():
        remote.put(path, data)
    return objects


def _assert_in_bounds(cache: Cache) -> None:
    tiers = cache.stats()["tiers"]
    for name, tier in tiers.items():
        assert tier["bytes"] <= tier["capacity"], (name, tier)


def test_tiers_never_exceed_their_bounds_under_concurrent_churn(tmp_path):
    remote = file_remote(tmp_path)
    rng = random.Random(1)
    objects = _populate(remote, 60, rng)
    cache = Cache(**remote.cache_args(), cache_dir=tmp_path / "c", block_size=BLOCK,
                  memory_bytes=5 * BLOCK + 17, disk_bytes=20 * BLOCK + 5)

    def churn(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(150):
            path = local.choice(list(objects))
            data = objects[path]
            offset = local.randrange(len(data))
            size = local.randint(1, 2 * BLOCK)
            assert cache.read(path, offset, size) == data[offset:offset + size]
            _assert_in_bounds(cache)

    errors = in_threads(churn, 6)
    assert not errors, errors[0]
    stats = cache.stats()
    assert stats["evictions"] > 0
    assert stats["tiers"]["disk"]["bytes"] > 10 * BLOCK
    # The LMDB file itself stays within the map the disk budget implies.
    assert cache.disk.file_bytes() <= int(cache.disk.capacity * 1.25) + (64 << 20)
    cache.close()


def test_memory_only_cache_respects_its_bound(tmp_path):
    remote = file_remote(tmp_path)
    objects = _populate(remote, 30, random.Random(2))
    with Cache(**remote.cache_args(), block_size=BLOCK, memory_bytes=7 * BLOCK) as cache:
        for path, data in list(objects.items()) * 2:
            assert cache.read(path) == data
            _assert_in_bounds(cache)
        assert "disk" not in cache.stats()["tiers"]


def test_blocks_survive_a_clean_restart(tmp_path):
    remote = file_remote(tmp_path)
    objects = _populate(remote, 5, random.Random(3))
    args = dict(**remote.cache_args(), cache_dir=tmp_path / "c", block_size=BLOCK, memory_bytes=BLOCK, ttl=3600)
    with Cache(**args) as cache:
        for path in objects:
            cache.read(path)
    with Cache(**args) as cache:
        for path, data in objects.items():
            assert cache.read(path) == data
        stats = cache.stats()
        assert stats["remote_bytes"] == 0
        assert stats["hit_ratio"] == 1.0


def test_blocks_survive_kill_9(tmp_path):
    remote = file_remote(tmp_path)
    objects = _populate(remote, 5, random.Random(4))
    cache_dir = tmp_path / "c"
    script = textwrap.dedent(f"""
        import os, sys, time
        import fsspec
        from igtcache import Cache
        cache = Cache(fsspec.filesystem("file"), root={remote.root!r}, cache_dir={str(cache_dir)!r},
                      block_size={BLOCK}, memory_bytes={BLOCK}, ttl=3600)
        for path in {list(objects)!r}:
            cache.read(path)
        cache.flush()
        print("ready", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with Cache(**remote.cache_args(), cache_dir=cache_dir, block_size=BLOCK, memory_bytes=BLOCK, ttl=3600) as cache:
        for path, data in objects.items():
            assert cache.read(path) == data
        assert cache.stats()["remote_bytes"] == 0


def test_corrupted_block_on_disk_is_caught_dropped_and_refetched(tmp_path):
    remote = file_remote(tmp_path)
    marker = b"MARKER-" * 1000
    data = marker + random.Random(5).randbytes(BLOCK - len(marker))
    remote.put("victim", data)
    args = dict(**remote.cache_args(), cache_dir=tmp_path / "c", block_size=BLOCK, memory_bytes=BLOCK, ttl=3600)
    with Cache(**args) as cache:
        cache.read("victim")
    data_file = tmp_path / "c" / "blocks.lmdb" / "data.mdb"
    raw = bytearray(data_file.read_bytes())
    where = raw.find(marker)
    assert where >= 0
    raw[where + 100] ^= 0xFF  # one flipped bit-field inside the stored block
    data_file.write_bytes(bytes(raw))
    with Cache(**args) as cache:
        assert cache.read("victim") == data
        stats = cache.stats()
        assert stats["corruptions"] == 1
        assert stats["remote_bytes"] == len(data)
        assert cache.read("victim") == data  # now served from the refetched copy
        assert cache.stats()["remote_bytes"] == len(data)


def test_unreadable_disk_tier_is_moved_aside_and_rebuilt(tmp_path):
    remote = file_remote(tmp_path)
    remote.put("x", b"payload")
    args = dict(**remote.cache_args(), cache_dir=tmp_path / "c", block_size=BLOCK)
    with Cache(**args) as cache:
        cache.read("x")
    (tmp_path / "c" / "blocks.lmdb" / "data.mdb").write_bytes(os.urandom(8192))
    with Cache(**args) as cache:
        assert cache.read("x") == b"payload"
        assert cache.disk.recovered_from_corruption
    assert any(p.name.startswith("blocks.lmdb.corrupt-") for p in (tmp_path / "c").iterdir())


def test_second_cache_on_the_same_directory_is_refused(tmp_path):
    remote = file_remote(tmp_path)
    with Cache(**remote.cache_args(), cache_dir=tmp_path / "c"):
        with pytest.raises(CacheDirInUse, match=str(os.getpid())):
            Cache(**remote.cache_args(), cache_dir=tmp_path / "c")
