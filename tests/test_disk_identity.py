"""The disk tier knows what its bytes mean: block size, format, checksum and the remote
they came from. A cache directory reopened with other settings never serves old bytes;
LMDB's own errors never leave the tier; a truncated data file does not kill the process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import lmdb
import pytest

from igtcache import Cache
from igtcache.block_store import BlockStore, TierFull
from igtcache.disk_tier import DiskFull, DiskTier, DiskTierError
from igtcache.policies import BlockKey

KiB = 1024


def _remote_dir(tmp_path, name: str, files: dict[str, bytes], mtime: float = 1_700_000_000.0) -> str:
    root = tmp_path / name
    root.mkdir()
    for path, data in files.items():
        (root / path).write_bytes(data)
        os.utime(root / path, (mtime, mtime))
    return f"file://{root}"


def _moved_aside(cache_dir, reason: str) -> list:
    return [p for p in cache_dir.iterdir() if p.name.startswith(f"blocks.lmdb.{reason}-")]


def test_reopening_with_another_block_size_serves_the_right_bytes(tmp_path):
    data = os.urandom(256 * KiB)
    url = _remote_dir(tmp_path, "remote", {"obj": data})
    with Cache(url, cache_dir=tmp_path / "c", block_size=64 * KiB) as cache:
        assert cache.read("obj") == data
    with Cache(url, cache_dir=tmp_path / "c", block_size=128 * KiB) as cache:
        assert cache.read("obj", 128 * KiB, 4096) == data[128 * KiB:128 * KiB + 4096]
        assert cache.read("obj") == data
        assert cache.stats()["remote_bytes"] == len(data)
    assert len(_moved_aside(tmp_path / "c", "mismatch")) == 1


def test_cache_dir_reused_for_another_remote_serves_that_remotes_bytes(tmp_path):
    # Same names, sizes and mtimes, so the block keys (path, size:mtime, index) are equal.
    old, new = os.urandom(100 * KiB), os.urandom(100 * KiB)
    url_a = _remote_dir(tmp_path, "a", {"obj": old})
    url_b = _remote_dir(tmp_path, "b", {"obj": new})
    with Cache(url_a, cache_dir=tmp_path / "c", block_size=64 * KiB) as cache:
        assert cache.read("obj") == old
    with Cache(url_b, cache_dir=tmp_path / "c", block_size=64 * KiB) as cache:
        assert cache.read("obj") == new
        assert cache.stats()["remote_bytes"] == len(new)


def test_reopening_with_the_same_settings_keeps_the_blocks(tmp_path):
    data = os.urandom(200 * KiB)
    url = _remote_dir(tmp_path, "remote", {"obj": data})
    with Cache(url, cache_dir=tmp_path / "c", block_size=64 * KiB) as cache:
        assert cache.read("obj") == data
    with Cache(url, cache_dir=tmp_path / "c", block_size=64 * KiB) as cache:
        assert len(cache.disk) == 4
        assert cache.read("obj") == data
        assert cache.stats()["remote_bytes"] == 0
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith("blocks.lmdb")] == ["blocks.lmdb"]


def test_a_mismatch_logs_one_warning_naming_old_and_new_settings(tmp_path, caplog):
    data = os.urandom(10 * KiB)
    url = _remote_dir(tmp_path, "remote", {"obj": data})
    with Cache(url, cache_dir=tmp_path / "c", block_size=64 * KiB) as cache:
        cache.read("obj")
        identity = cache.remote.identity
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="igtcache.disk_tier"):
        with Cache(url, cache_dir=tmp_path / "c", block_size=128 * KiB) as cache:
            assert len(cache.disk) == 0
            assert cache.read("obj") == data
    warnings = [r.getMessage() for r in caplog.records if r.name == "igtcache.disk_tier"]
    assert len(warnings) == 1, warnings
    [aside] = _moved_aside(tmp_path / "c", "mismatch")
    message = warnings[0]
    assert "block size 65536" in message and "block size 131072" in message
    assert message.count(identity) == 2
    assert message.index("65536") < message.index("131072")  # old, then new
    assert str(aside) in message


def test_identity_names_the_remote_root(tmp_path):
    url_a = _remote_dir(tmp_path, "a", {})
    url_b = _remote_dir(tmp_path, "b", {})
    with Cache(url_a) as a, Cache(url_b) as b:
        assert a.remote.identity == f"file://{tmp_path / 'a'}"
        assert a.remote.identity != b.remote.identity


def test_an_older_environment_without_settings_is_moved_aside(tmp_path, caplog):
    data = os.urandom(100 * KiB)
    url = _remote_dir(tmp_path, "remote", {"obj": data})
    with Cache(url, cache_dir=tmp_path / "c", block_size=64 * KiB) as cache:
        cache.read("obj")
    # What the previous format left: index, data and meta, no settings.
    env = lmdb.open(str(tmp_path / "c" / "blocks.lmdb"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"settings", txn=txn), delete=True)
    env.close()
    with caplog.at_level(logging.WARNING, logger="igtcache.disk_tier"):
        with Cache(url, cache_dir=tmp_path / "c", block_size=64 * KiB) as cache:
            assert len(cache.disk) == 0
            assert cache.read("obj") == data
            assert cache.stats()["remote_bytes"] == len(data)
    assert len(_moved_aside(tmp_path / "c", "mismatch")) == 1
    assert any("older format" in r.getMessage() for r in caplog.records)
    # The new environment records its settings: the next open keeps its blocks.
    with Cache(url, cache_dir=tmp_path / "c", block_size=64 * KiB) as cache:
        assert len(cache.disk) == 2


def _damage_meta_pages(data_file, marker: bytes) -> None:
    """Zero the page header of every page holding ``marker``: LMDB then finds a page
    that is neither branch nor leaf where the meta database's tree should be."""
    raw = bytearray(data_file.read_bytes())
    where = raw.find(marker)
    assert where >= 0
    while where >= 0:
        page = where - where % 4096
        raw[page + 8:page + 16] = bytes(8)
        where = raw.find(marker, page + 4096)
    with open(data_file, "r+b") as f:  # in place: the open environment's map sees it
        f.write(bytes(raw))


def test_invalidate_on_a_damaged_tier_raises_no_raw_lmdb_error(tmp_path):
    data = os.urandom(10 * KiB)
    url = _remote_dir(tmp_path, "remote", {"obj": data})
    with Cache(url, cache_dir=tmp_path / "c", block_size=64 * KiB) as cache:
        assert cache.read("obj") == data
        cache.flush()
        version = cache.info("obj")["version"]  # a metadata value holds the version, then the path
        _damage_meta_pages(tmp_path / "c" / "blocks.lmdb" / "data.mdb", version.encode() + b"obj")
        try:
            cache.invalidate("obj")
        except OSError as exc:  # an lmdb.Error is no OSError: it would escape this
            assert str(tmp_path / "c") in str(exc)
        with pytest.raises(DiskFull):
            cache.disk.delete_meta("obj")
        with pytest.raises(DiskTierError):
            cache.disk.load_meta()
        assert cache.read("obj") == data


def test_tier_methods_map_lmdb_errors(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 20, block_size=4096, remote_id="memory://x")
    key = BlockKey("p", "v", 0)
    tier.put(key, b"x" * 100)
    tier.save_meta(_info("p"), fresh_until=0.0)
    tier._env.close()  # every later LMDB call fails
    for call in (lambda: tier.get(key), tier.load_meta):
        with pytest.raises(DiskTierError):
            call()
    for call in (lambda: tier.delete_meta("p"), lambda: tier.discard(key), lambda: tier.put(BlockKey("q", "v", 0), b"y")):
        with pytest.raises(DiskFull):
            call()


def _info(path: str):
    from igtcache.remote import ObjectInfo

    return ObjectInfo(path=path, size=100, version="v", fetched_at=1.0)


def test_a_write_over_the_bound_is_disk_full(tmp_path):
    tier = DiskTier(tmp_path / "d", 1000, block_size=4096, remote_id="memory://x")
    tier.put(BlockKey("p", "v", 0), b"a" * 600)
    with pytest.raises(DiskFull) as raised:
        tier.put(BlockKey("p", "v", 1), b"b" * 600)
    assert isinstance(raised.value, TierFull)
    assert tier.bytes == 600 and tier.keys() == [BlockKey("p", "v", 0)]
    tier.close()


def test_disk_tier_is_a_block_store(tmp_path):
    tier = DiskTier(tmp_path / "d", 1 << 20, block_size=4096, remote_id="memory://x")
    assert isinstance(tier, BlockStore)
    a, b = BlockKey("p", "v", 0), BlockKey("p", "v", 1)
    tier.put(a, b"first")
    tier.put(b, b"second")
    assert tier.get(a) == b"first" and tier.get(BlockKey("p", "v", 9)) is None
    assert set(tier.keys()) == {a, b} and tier.bytes == 11
    tier.discard(a)
    assert a not in tier and tier.get(a) is None and tier.bytes == 6
    tier.close()
    # A block failing its checksum: get() returns None and counts it.
    data_file = tmp_path / "d" / "blocks.lmdb" / "data.mdb"
    raw = data_file.read_bytes()
    assert b"second" in raw
    data_file.write_bytes(raw.replace(b"second", b"Second"))  # every copy, live or freed
    tier = DiskTier(tmp_path / "d", 1 << 20, block_size=4096, remote_id="memory://x")
    assert tier.get(b) is None
    assert tier.corrupt_reads == 1
    tier.close()


def test_a_truncated_data_file_is_moved_aside_not_a_crash(tmp_path):
    data = os.urandom(512 * KiB)
    url = _remote_dir(tmp_path, "remote", {"obj": data})
    with Cache(url, cache_dir=tmp_path / "c", block_size=64 * KiB) as cache:
        assert cache.read("obj") == data
    data_file = tmp_path / "c" / "blocks.lmdb" / "data.mdb"
    os.truncate(data_file, 3 * 4096)
    # In a child: without the check, LMDB touches pages past the end and SIGBUS kills it.
    script = textwrap.dedent(f"""
        from igtcache import Cache
        with Cache({url!r}, cache_dir={str(tmp_path / 'c')!r}, block_size=64 * 1024) as cache:
            assert cache.disk.recovered_from_corruption
            assert cache.read("obj") == open({str(tmp_path / 'remote' / 'obj')!r}, "rb").read()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "ok"
    assert len(_moved_aside(tmp_path / "c", "corrupt")) == 1


def test_restarts_with_changing_settings_keep_one_environment_aside(tmp_path):
    data = os.urandom(256 * KiB)
    url = _remote_dir(tmp_path, "remote", {"obj": data})
    for n in range(6):
        with Cache(url, cache_dir=tmp_path / "c", block_size=(64 if n % 2 else 32) * KiB) as cache:
            assert cache.read("obj") == data
    aside = sorted(p.name for p in (tmp_path / "c").glob("blocks.lmdb.*"))
    assert len(aside) == 1 and aside[0].startswith("blocks.lmdb.mismatch-")
