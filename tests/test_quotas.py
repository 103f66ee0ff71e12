"""Per-prefix quotas: what one dataset or tenant may hold in a node's tiers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from igtcache import Cache
from igtcache.daemon.metrics import render as render_metrics
from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import DaemonClient
from igtcache.quotas import parse_quota
from igtcache.stats_cmd import render as render_stats

from .helpers import file_remote

KiB = 1 << 10
BLOCK = 4 * KiB


def _dataset(remote, prefix: str, count: int, size: int = 10 * KiB) -> dict[str, bytes]:
    files = {f"{prefix}/{i}.bin": os.urandom(size) for i in range(count)}
    for name, data in files.items():
        remote.put(name, data)
    return files


def test_a_prefix_holds_no_more_than_its_quota_and_others_are_untouched(tmp_path):
    remote = file_remote(tmp_path)
    capped, free = _dataset(remote, "tenant-a", 10), _dataset(remote, "tenant-b", 10)
    with Cache(**remote.cache_args(), cache_dir=tmp_path / "c", block_size=BLOCK, disk_bytes=1 << 20,
               quotas={"tenant-a": 30 * KiB}) as cache:
        for (a, data_a), (b, data_b) in zip(capped.items(), free.items()):
            assert cache.read(a) == data_a and cache.read(b) == data_b
        cache.flush()
        quota = cache.stats()["quotas"]["tenant-a"]
        assert quota["used"] <= 30 * KiB and quota["evictions"] > 0 and quota["limit"] == 30 * KiB
        held = {name: cache.residency(name)["disk"] for name in [*capped, *free]}
        assert sum(held[name] for name in capped) == quota["used"]
        assert all(held[name] == 10 * KiB for name in free)  # the other tenant keeps everything


def test_within_its_quota_a_prefix_loses_its_least_recently_read_blocks_first(tmp_path):
    remote = file_remote(tmp_path)
    files = _dataset(remote, "d", 6, size=BLOCK)
    with Cache(**remote.cache_args(), block_size=BLOCK, memory_bytes=1 << 20, quotas={"d": 3 * BLOCK}) as cache:
        for name in ["d/0.bin", "d/1.bin", "d/2.bin"]:
            cache.read(name)
        cache.read("d/0.bin")  # d/1 is now the least recently read
        cache.read("d/3.bin")
        cache.flush()
        assert [cache.residency(f"d/{i}.bin")["memory"] for i in range(4)] == [BLOCK, 0, BLOCK, BLOCK]
        assert cache.read("d/5.bin") == files["d/5.bin"]


def test_a_block_larger_than_its_quota_is_served_but_not_kept(tmp_path):
    remote = file_remote(tmp_path)
    files = _dataset(remote, "big", 1, size=3 * BLOCK)
    with Cache(**remote.cache_args(), cache_dir=tmp_path / "c", block_size=BLOCK, quotas={"big": BLOCK - 1}) as cache:
        assert cache.read("big/0.bin") == files["big/0.bin"]
        assert cache.read("big/0.bin") == files["big/0.bin"]
        cache.flush()
        assert cache.residency("big/0.bin")["disk"] == 0 and cache.stats()["quotas"]["big"]["used"] == 0
        assert cache.stats()["remote_bytes"] == 2 * 3 * BLOCK


def test_a_lower_quota_after_a_restart_trims_what_the_disk_kept(tmp_path):
    remote = file_remote(tmp_path)
    files = _dataset(remote, "ds", 8)
    args = dict(**remote.cache_args(), cache_dir=tmp_path / "c", block_size=BLOCK)
    with Cache(**args) as cache:
        for name in files:
            cache.read(name)
    with Cache(**args, quotas={"ds": 20 * KiB}) as cache:
        assert cache.stats()["quotas"]["ds"]["used"] <= 20 * KiB
        assert len(cache.disk) * BLOCK <= 24 * KiB
        for name, data in files.items():
            assert cache.read(name) == data


def test_quotas_are_parsed_with_a_clear_error():
    assert parse_quota("train/imagenet=2GiB") == ("train/imagenet", 2 << 30)
    assert parse_quota("/a//b/=1MiB") == ("a/b", 1 << 20)
    for bad in ("train", "train=", "=x", "../up=1GiB"):
        with pytest.raises(ValueError):
            parse_quota(bad)
    with pytest.raises(ValueError, match="0 or more"):
        Cache("memory://igt-q", quotas={"a": -1})


def test_the_daemon_takes_quotas_from_options_and_config_and_shows_their_use(tmp_path):
    remote = file_remote(tmp_path)
    files = {**_dataset(remote, "a", 6), **_dataset(remote, "b", 3)}
    config = tmp_path / "igtcache.toml"
    config.write_text('[quota]\n"b" = "12KiB"\n')
    args = ["--remote", f"data=file://{remote.root}", "--config", str(config), "--quota", "a=20KiB",
            "--cache-dir", str(tmp_path / "cache"), "--memory", "1MiB", "--disk", "16MiB", "--block-size", "4KiB"]
    with DaemonProcess(tmp_path / "d.sock", args) as daemon, \
            DaemonClient(daemon.socket_path, short_circuit=False) as client:
        for name, data in files.items():
            assert client.read(name) == data
        quotas = client.stats()["quotas"]
        assert quotas["a"]["limit"] == 20 * KiB and 0 < quotas["a"]["used"] <= 20 * KiB
        assert quotas["b"]["limit"] == 12 * KiB and quotas["b"]["used"] <= 12 * KiB
        everything = client.daemon_stats()
        metrics = render_metrics(everything)
        assert f'igtcache_quota_limit_bytes{{remote="data",prefix="a"}} {20 * KiB}' in metrics
        assert 'igtcache_quota_bytes{remote="data",prefix="b"}' in metrics
        assert "quota a: " in render_stats(everything)


def test_a_bad_quota_option_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "igtcache.cli", "serve", "--remote", "memory://x",
                             "--quota", "train"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "a quota is PREFIX=SIZE" in result.stderr
    assert "Traceback" not in result.stderr
