"""The cluster tier inside the engine: several caches (nodes) over one moto bucket
sharing one real Redis Cluster on loopback."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time

import pytest
import redis

from igtcache import Cache
from igtcache.redis_cluster import RedisClusterProcess

from .helpers import ManualClock

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 256 * KiB


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing on CI (make setup installs it)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with RedisClusterProcess(tmp_path_factory.mktemp("redis"), maxmemory=64 * MiB) as running:
        yield running


def _node(s3_server, prefix, cluster_url, **kwargs) -> Cache:
    options = dict(memory_bytes=4 * MiB, block_size=BLOCK, cluster=cluster_url, policy="lru")
    options.update(kwargs)
    return Cache(s3_server.filesystem(), root=prefix, **options)


def _published(cache: Cache) -> None:
    assert cache.source.cluster.flush(10)


def test_a_block_one_node_fetched_is_served_to_another_from_the_cluster(cluster, s3_server, s3):
    fs, prefix = s3
    data = random.Random(1).randbytes(3 * BLOCK + 7)
    fs.pipe(f"{prefix}/obj", data)
    with _node(s3_server, prefix, cluster.url) as first, _node(s3_server, prefix, cluster.url) as second:
        assert first.read("obj") == data
        _published(first)
        assert second.read("obj") == data
        stats = second.stats()
        assert stats["remote_bytes"] == 0 and stats["remote_fetches"] == 0
        assert stats["cluster_bytes"] == len(data)
        assert stats["cluster"]["state"] == "up"
        assert stats["cluster"]["hits"] == 4


def test_a_changed_object_is_never_served_from_the_cluster_after_its_ttl(cluster, s3_server, s3):
    fs, prefix = s3
    old, new = b"a" * (2 * BLOCK), b"b" * (2 * BLOCK)
    fs.pipe(f"{prefix}/obj", old)
    clock = ManualClock()
    with _node(s3_server, prefix, cluster.url, ttl=30, clock=clock) as first:
        assert first.read("obj") == old
        _published(first)
        fs.pipe(f"{prefix}/obj", new)
        clock.advance(31)
        assert first.read("obj") == new
        assert first.stats()["cluster_bytes"] == 0
    with _node(s3_server, prefix, cluster.url) as second:
        assert second.read("obj") == new


def test_a_damaged_or_foreign_cluster_value_is_a_miss_and_refetched(cluster, s3_server, s3):
    fs, prefix = s3
    data = random.Random(2).randbytes(BLOCK)
    fs.pipe(f"{prefix}/obj", data)
    with _node(s3_server, prefix, cluster.url) as first:
        assert first.read("obj") == data
        _published(first)
        info = first.info("obj")
        from igtcache.policies import BlockKey
        name = first.source.cluster.key_name(BlockKey("obj", info["version"], 0))
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    value = bytearray(client.get(name))
    value[-1] ^= 0xFF  # one flipped byte in the block
    client.set(name, bytes(value))
    with _node(s3_server, prefix, cluster.url) as second:
        assert second.read("obj") == data
        stats = second.stats()
        assert stats["cluster"]["corrupt"] == 1
        assert stats["remote_bytes"] == len(data)
    with _node(s3_server, prefix, cluster.url, cluster_prefix="another-deployment") as other:
        assert other.read("obj") == data
        assert other.stats()["cluster_bytes"] == 0  # another deployment's keys are never seen
    client.close()


def test_an_unreachable_cluster_gives_misses_not_errors_or_hangs(s3_server, s3):
    fs, prefix = s3
    data = random.Random(3).randbytes(2 * BLOCK)
    fs.pipe(f"{prefix}/obj", data)
    started = time.monotonic()
    with _node(s3_server, prefix, "redis://127.0.0.1:1") as node:
        for _ in range(3):
            node.invalidate("obj")
            assert node.read("obj") == data
        assert node.stats()["cluster"]["state"] in ("down", "degraded")
    assert time.monotonic() - started < 20


def test_many_nodes_missing_one_block_fetch_it_from_the_remote_once(cluster, s3_server, s3):
    fs, prefix = s3
    data = random.Random(4).randbytes(BLOCK)
    fs.pipe(f"{prefix}/obj", data)
    nodes = [_node(s3_server, prefix, cluster.url) for _ in range(4)]
    try:
        for node in nodes:
            node.info("obj")
        barrier = threading.Barrier(len(nodes))
        results = [None] * len(nodes)

        def read(i: int) -> None:
            barrier.wait()
            results[i] = nodes[i].read("obj")

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(nodes))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results == [data] * len(nodes)
        assert sum(node.stats()["remote_fetches"] for node in nodes) == 1
        assert sum(node.stats()["cluster_fetches"] for node in nodes) == len(nodes) - 1
    finally:
        for node in nodes:
            node.close()


def test_igt_does_not_publish_a_one_pass_scan(cluster, s3_server, s3):
    fs, prefix = s3
    files = {f"scan/part-{i}": random.Random(i).randbytes(8 * BLOCK) for i in range(3)}
    fs.pipe({f"{prefix}/{name}": data for name, data in files.items()})
    with _node(s3_server, prefix, cluster.url, policy="igt", memory_bytes=2 * MiB) as node:
        for name, data in files.items():
            for offset in range(0, len(data), BLOCK // 2):
                assert node.read(name, offset, BLOCK // 2) == data[offset:offset + BLOCK // 2]
        _published(node)
        published = node.stats()["cluster"]["published"]
    total_blocks = sum(len(d) // BLOCK for d in files.values())
    assert published < total_blocks / 2  # once the scan is recognised, its blocks stay off the cluster


def test_two_node_daemons_share_blocks_through_the_cluster_tier(cluster, s3_server, s3, tmp_path):
    """Real daemons, each with its own socket and cache dir, on one bucket and one cluster."""
    import json

    from igtcache.daemon.process import DaemonProcess
    from igtcache.daemon_client import DaemonClient

    from .test_daemon import http_get

    fs, prefix = s3
    data = random.Random(5).randbytes(2 * BLOCK + 3)
    fs.pipe(f"{prefix}/obj", data)
    args = ["--remote", f"ds=s3://{prefix}", "--storage-options", json.dumps(s3_server.storage_options()),
            "--memory", "8MiB", "--disk", "16MiB", "--block-size", str(BLOCK), "--cluster", cluster.url]
    nodes = [DaemonProcess(tmp_path / f"node{i}.sock", [*args, "--cache-dir", str(tmp_path / f"cache{i}")])
             for i in range(2)]
    try:
        for node in nodes:
            node.start()
        with DaemonClient(nodes[0].socket_path, "ds") as first:
            assert first.read("obj") == data
            deadline = time.monotonic() + 10
            while first.daemon_stats()["remotes"]["ds"]["cluster"]["published"] < 3:  # the publish queue drains
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with DaemonClient(nodes[1].socket_path, "ds") as second:
            assert second.read("obj") == data
            stats = second.daemon_stats()["remotes"]["ds"]
        assert stats["remote_bytes"] == 0 and stats["cluster_bytes"] == len(data)
        assert stats["cluster"]["state"] == "up"
        status, body = http_get(nodes[1].socket_path, "/metrics")
        assert status == 200 and b'igtcache_cluster_state{remote="ds",state="up"} 1' in body
    finally:
        for node in nodes:
            node.stop()
