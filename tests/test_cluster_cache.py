"""The cluster tier inside the engine: several caches (nodes) over one moto bucket
sharing one real Redis Cluster on loopback."""

from __future__ import annotations

import random
import threading
import time

import pytest
import redis

from igtcache import Cache
from igtcache.cluster_tier import ClusterTier
from igtcache.redis_cluster import RedisClusterProcess

from .helpers import need_redis


KiB, MiB = 1 << 10, 1 << 20
BLOCK = 256 * KiB
# The failure tests' tier: a generous deadline (2 shared cores) and a short circuit cool-down.
TIMEOUT, COOLDOWN = 0.5, 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need_redis()
    with RedisClusterProcess(tmp_path_factory.mktemp("redis"), maxmemory=64 * MiB) as running:
        yield running


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """Three masters with a replica each; a master unreachable for 1 s is failed over."""
    need_redis()
    with RedisClusterProcess(tmp_path_factory.mktemp("redis-replicated"), replicas=1, node_timeout_ms=1000,
                             maxmemory=64 * MiB) as running:
        yield running


def _node(s3_server, prefix, cluster_url, **kwargs) -> Cache:
    options = dict(memory_bytes=4 * MiB, block_size=BLOCK, cluster=cluster_url, policy="lru")
    options.update(kwargs)
    return Cache(s3_server.filesystem(), root=prefix, **options)


def _published(cache: Cache) -> None:
    assert cache.source.cluster.flush(10)


def _tier(url: str, prefix: str) -> ClusterTier:
    """A tier for ``Cache(cluster=...)`` with the failure tests' deadline and cool-down."""
    return ClusterTier(url, remote_id=f"s3://{prefix}", block_size=BLOCK, timeout=TIMEOUT,
                       circuit_cooldown=COOLDOWN)


def _tier_state(cache: Cache) -> dict:
    """The cluster tier's counters, circuits and state (up, degraded, down)."""
    return cache.stats()["cluster"]


def _read_blocks(cache: Cache, data: bytes) -> tuple[int, int, float]:
    """Read ``obj`` afresh, one read per block, checking every byte; returns the blocks that
    came from the cluster, those that came from the remote, and the slowest read's seconds."""
    cache.invalidate("obj")
    before, slowest = cache.stats(), 0.0
    for offset in range(0, len(data), BLOCK):
        started = time.monotonic()
        assert cache.read("obj", offset, BLOCK) == data[offset:offset + BLOCK]
        slowest = max(slowest, time.monotonic() - started)
    after = cache.stats()
    return ((after["cluster_bytes"] - before["cluster_bytes"]) // BLOCK,
            (after["remote_bytes"] - before["remote_bytes"]) // BLOCK, slowest)


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
    # Real time: the metadata a node shares expires on Redis's clock, with the node's TTL.
    with _node(s3_server, prefix, cluster.url, ttl=1.0) as first:
        assert first.read("obj") == old
        _published(first)
        fs.pipe(f"{prefix}/obj", new)
        time.sleep(1.2)
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


# A read asks the cluster at most three times (look, lease, look again), each within its
# deadline, before the remote: with room for the remote and a loaded machine.
SLOWEST_READ = 3 * TIMEOUT + 1.5


def test_a_killed_master_fails_over_and_a_running_cache_hits_again(replicated, s3_server, s3):
    """SIGKILL of a master: its replica takes over its slots and blocks, and a Cache built before
    the kill serves hits from the cluster again without a restart; every read meanwhile is right
    and prompt."""
    cluster = replicated
    assert len(cluster.master_ports) == 3 and sorted(cluster.master_of.values()) == sorted(cluster.master_ports)
    fs, prefix = s3
    blocks = 24
    data = random.Random(6).randbytes(blocks * BLOCK)
    fs.pipe(f"{prefix}/obj", data)
    with _node(s3_server, prefix, _tier(cluster.url, prefix)) as writer:
        assert writer.read("obj") == data
        _published(writer)
    cluster.wait_replicated()
    with _node(s3_server, prefix, _tier(cluster.url, prefix)) as node:
        assert _read_blocks(node, data)[:2] == (blocks, 0)
        victim = cluster.master_ports[0]
        replica = next(port for port, master in cluster.master_of.items() if master == victim)
        killed = time.monotonic()
        cluster.kill_node(victim)
        promoted = recovered = None
        slowest, most_missed = 0.0, 0
        while recovered is None:
            assert time.monotonic() - killed < 15, f"no recovery 15 s after the kill: {_tier_state(node)}"
            from_cluster, from_remote, slow = _read_blocks(node, data)
            slowest, most_missed = max(slowest, slow), max(most_missed, from_remote)
            if promoted is None and cluster.cli(replica, "role").startswith("master"):
                promoted = time.monotonic() - killed
            if promoted is not None and from_cluster == blocks and _tier_state(node)["state"] == "up":
                recovered = time.monotonic() - killed
        print(f"failover: replica promoted {promoted:.2f} s after the kill, all hits again at "
              f"{recovered:.2f} s; slowest read {slowest * 1000:.0f} ms")
        cluster.wait_ok()
        circuits = _tier_state(node)["circuit"]
        assert f"127.0.0.1:{replica}" in circuits and f"127.0.0.1:{victim}" not in circuits, circuits
        assert 0 < most_missed < blocks  # the victim's blocks came from the remote for a while, no others
        assert slowest < SLOWEST_READ, slowest
        assert recovered - promoted < COOLDOWN + 3.0, (promoted, recovered)


def test_the_whole_cluster_down_then_back_on_its_ports(s3_server, s3, tmp_path):
    """Every node stopped: reads come from the remote and the state is "down". The nodes started
    again on the same ports (empty): after the cool-down the state is "up" and hits resume."""
    need_redis()
    fs, prefix = s3
    blocks = 12
    data = random.Random(7).randbytes(blocks * BLOCK)
    fs.pipe(f"{prefix}/obj", data)
    with RedisClusterProcess(tmp_path, node_timeout_ms=1000, maxmemory=64 * MiB) as cluster, \
            _node(s3_server, prefix, _tier(cluster.url, prefix)) as node:
        assert node.read("obj") == data
        _published(node)
        assert _read_blocks(node, data)[:2] == (blocks, 0)
        for port in cluster.ports:
            cluster.kill_node(port)
        for _ in range(3):
            from_cluster, from_remote, slowest = _read_blocks(node, data)
            assert (from_cluster, from_remote) == (0, blocks) and slowest < SLOWEST_READ, slowest
        assert _tier_state(node)["state"] == "down", _tier_state(node)["circuit"]

        for port in cluster.ports:
            cluster.restart_node(port)
        cluster.wait_ok()
        back = time.monotonic()
        while _tier_state(node)["state"] != "up":
            assert time.monotonic() - back < COOLDOWN + 5, _tier_state(node)["circuit"]
            _read_blocks(node, data)  # the probes after the cool-down close the circuits
        _read_blocks(node, data)  # nothing persisted: these reads publish the blocks again
        _published(node)
        assert _read_blocks(node, data)[:2] == (blocks, 0)


def test_many_nodes_missing_one_block_fetch_it_from_the_remote_once(cluster, s3_server, s3):
    fs, prefix = s3
    data = random.Random(4).randbytes(BLOCK)
    fs.pipe(f"{prefix}/obj", data)
    # A deadline generous enough that no lease or lookup is given up on a loaded machine.
    tiers = [ClusterTier(cluster.url, remote_id=f"s3://{prefix}", block_size=BLOCK, timeout=2.0) for _ in range(4)]
    nodes = [_node(s3_server, prefix, tier) for tier in tiers]
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


def test_a_stat_one_node_made_is_shared_with_the_others_within_its_ttl(cluster, s3_server, s3):
    fs, prefix = s3
    data = random.Random(6).randbytes(BLOCK + 9)
    fs.pipe(f"{prefix}/obj", data)
    with _node(s3_server, prefix, cluster.url, ttl=60) as first, _node(s3_server, prefix, cluster.url, ttl=60) as second:
        assert first.read("obj") == data
        _published(first)
        stats_made = []
        real_info = second.remote.info
        second.remote.info = lambda path: (stats_made.append(path), real_info(path))[1]
        assert second.read("obj") == data
        assert stats_made == []  # the first node's stat stood for the second's
        assert second.stats()["cluster"]["meta_hits"] == 1
        assert second.info("obj")["version"] == first.info("obj")["version"]
    with _node(s3_server, prefix, cluster.url, ttl=60, cluster_prefix="elsewhere") as other:
        stats_made = []
        real_info = other.remote.info
        other.remote.info = lambda path: (stats_made.append(path), real_info(path))[1]
        assert other.read("obj") == data
        assert stats_made == ["obj"]  # another deployment's metadata is never used
