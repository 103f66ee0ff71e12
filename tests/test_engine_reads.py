"""Every byte the cache returns equals the remote's, on s3, file and memory remotes."""

from __future__ import annotations

import random

import pytest

from igtcache import Cache

from .helpers import Remote, file_remote, memory_remote

BLOCK = 64 * 1024


@pytest.fixture(params=["s3", "file", "memory"])
def remote(request, tmp_path) -> Remote:
    if request.param == "s3":
        fs, prefix = request.getfixturevalue("s3")
        return Remote(fs, prefix)
    if request.param == "file":
        return file_remote(tmp_path)
    return memory_remote()


def test_random_ranges_across_block_edges_match_remote(remote, tmp_path):
    rng = random.Random(7)
    objects = {f"dir/obj{i}": rng.randbytes(size) for i, size in enumerate([1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 123])}
    for path, data in objects.items():
        remote.put(path, data)
    with Cache(**remote.cache_args(), cache_dir=tmp_path / "cache", block_size=BLOCK,
               memory_bytes=3 * BLOCK, disk_bytes=8 * BLOCK) as cache:
        for _ in range(300):
            path, data = rng.choice(list(objects.items()))
            edge = rng.choice([0, BLOCK, 2 * BLOCK, len(data)])
            offset = max(0, min(len(data) + 3, edge + rng.randint(-5, 5)))
            size = rng.choice([0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK])
            assert cache.read(path, offset, size) == data[offset:offset + size], (path, offset, size)
        for path, data in objects.items():
            assert cache.read(path) == data
        stats = cache.stats()
        assert stats["hits"] > 0 and stats["misses"] > 0


def test_small_object_is_one_block_of_its_own_size(tmp_path):
    remote = memory_remote()
    remote.put("tiny", b"abc")
    with Cache(**remote.cache_args(), block_size=BLOCK) as cache:
        assert cache.read("tiny") == b"abc"
        assert cache.stats()["tiers"]["memory"]["bytes"] == 3


def test_reads_past_the_end_return_what_exists(tmp_path):
    remote = memory_remote()
    remote.put("f", b"0123456789")
    with Cache(**remote.cache_args(), block_size=4) as cache:
        assert cache.read("f", 8, 100) == b"89"
        assert cache.read("f", 10, 5) == b""
        assert cache.read("f", 1000, 5) == b""
        assert cache.read("f", 3, 0) == b""
        assert cache.read("f", 2) == b"23456789"


def test_info_ls_and_invalidate(remote, tmp_path):
    remote.put("a/x", b"x" * 10)
    remote.put("a/y", b"y" * 20)
    with Cache(**remote.cache_args(), cache_dir=tmp_path / "c", block_size=BLOCK) as cache:
        info = cache.info("a/x")
        assert info["size"] == 10 and info["version"]
        names = sorted((e["name"], e["size"]) for e in cache.ls("a"))
        assert names == [("a/x", 10), ("a/y", 20)]
        assert cache.read("a/x") == b"x" * 10
        cache.invalidate("a/x")
        assert cache.stats()["tiers"]["disk"]["blocks"] == 0
        assert cache.read("a/x") == b"x" * 10
        assert cache.stats()["remote_fetches"] == 2


def test_readinto_fills_a_buffer_from_every_tier(tmp_path):
    remote = file_remote(tmp_path)
    data = random.Random(11).randbytes(3 * BLOCK + 10)
    remote.put("f", data)
    with Cache(**remote.cache_args(), cache_dir=tmp_path / "c", block_size=BLOCK,
               memory_bytes=0, disk_bytes=8 * BLOCK) as cache:
        for offset, length in [(5, BLOCK), (BLOCK - 3, 2 * BLOCK), (3 * BLOCK, 100)]:
            for _ in range(2):  # first from the remote, then from the disk tier
                buffer = bytearray(length)
                count = cache.readinto("f", offset, buffer)
                assert bytes(buffer[:count]) == data[offset:offset + length]
        assert cache.stats()["hits"] == 3


@pytest.mark.parametrize("memory_bytes", [0, 8 * BLOCK])
def test_read_pieces_are_the_read_unjoined_and_memory_blocks_uncopied(tmp_path, memory_bytes):
    remote = file_remote(tmp_path)
    data = random.Random(12).randbytes(3 * BLOCK + 10)
    remote.put("f", data)
    with Cache(**remote.cache_args(), cache_dir=tmp_path / "c", block_size=BLOCK,
               memory_bytes=memory_bytes, disk_bytes=8 * BLOCK) as cache:
        for offset, length in [(5, BLOCK), (BLOCK - 3, 2 * BLOCK), (3 * BLOCK, 100), (0, 0)]:
            for _ in range(2):  # first from the remote, then from a tier
                pieces = cache.read_pieces("f", offset, length)
                assert b"".join(pieces) == data[offset:offset + length]
                assert len(pieces) == len({i // BLOCK for i in range(offset, min(offset + length, len(data)))})
        if memory_bytes:
            block = cache.read("f", BLOCK, BLOCK)  # the cached block itself
            (piece,) = cache.read_pieces("f", BLOCK + 1, BLOCK - 1)
            assert isinstance(piece, memoryview) and piece.obj is block
