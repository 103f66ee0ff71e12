"""The cluster tier against a real 3-master Redis Cluster on 127.0.0.1 (started by
``igtcache.redis_cluster``), plus its pure parts (value format, keys, URL, circuit
breaker) without one. Without redis-server the cluster tests skip, except on CI
(``CI=true``), where its absence is a failure."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import wait

import pytest
import redis

from igtcache.cluster_breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from igtcache.cluster_format import HEADER_SIZE, KeySpace, decode, encode
from igtcache.cluster_tier import ClusterTier
from igtcache.cluster_url import parse_cluster_url
from igtcache.local_s3 import free_port
from igtcache.policies import BlockKey
from igtcache.redis_cluster import ClusterTLS, RedisClusterError, RedisClusterProcess, free_cluster_ports
from igtcache.redis_cluster import main as cluster_command

from .helpers import need_redis

MiB = 1 << 20
B = 1 * MiB


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need_redis()
    with RedisClusterProcess(tmp_path_factory.mktemp("redis"), maxmemory=128 * MiB) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def raw(cluster):
    """A plain synchronous cluster client, to look at and damage stored values."""
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    yield client
    client.close()


def _tier(url: str, **kwargs) -> ClusterTier:
    kwargs.setdefault("remote_id", "s3://bucket/data")
    kwargs.setdefault("block_size", B)
    kwargs.setdefault("timeout", 1.0)  # generous: a shared 2-core machine
    return ClusterTier(url, **kwargs)


def _key(index: int = 0) -> BlockKey:
    return BlockKey(f"train/{uuid.uuid4().hex}.tar", "etag-1", index)


def _published(tier: ClusterTier, key: BlockKey, data: bytes) -> None:
    assert tier.publish(key, data)
    assert tier.flush(10)


# ---- without a cluster ----


def test_value_format_round_trip_and_damage():
    data = os.urandom(1000)
    value = encode(data)
    assert len(value) == HEADER_SIZE + len(data) and decode(value) == data
    assert decode(encode(b"x")) == b"x"
    flipped = bytearray(value)
    flipped[HEADER_SIZE + 500] ^= 1
    damaged = {
        "flipped data bit": bytes(flipped),
        "bad magic": b"XXXX" + value[4:],
        "other format": value[:4] + b"\x02" + value[5:],
        "truncated": value[:-1],
        "extended": value + b"\0",
        "shorter than a header": value[: HEADER_SIZE - 1],
        "empty": b"",
    }
    for what, bad in damaged.items():
        assert decode(bad) is None, what


def test_keys_carry_remote_block_size_path_version_and_index():
    key = BlockKey("a/b.bin", "v1", 3)
    base = KeySpace("igtcache", "s3://one", 4 * MiB)
    names = {
        base.block(key),
        KeySpace("igtcache", "s3://two", 4 * MiB).block(key),
        KeySpace("igtcache", "s3://one", 1 * MiB).block(key),
        KeySpace("other", "s3://one", 4 * MiB).block(key),
        base.block(key._replace(version="v2")),
        base.block(key._replace(path="a/b.bin2")),
        base.block(key._replace(index=4)),
        base.lease(key),
    }
    assert len(names) == 8
    assert base.block(key) == KeySpace("igtcache", "s3://one", 4 * MiB).block(BlockKey("a/b.bin", "v1", 3))
    # Path and version are length-prefixed in the digest: shifting characters between them is another key.
    assert base.block(BlockKey("ab", "c", 0)) != base.block(BlockKey("a", "bc", 0))
    assert not any(c in base.block(key) for c in "{}")  # no hash tag: blocks spread over slots
    with pytest.raises(ValueError):
        KeySpace("igt{x}", "s3://one", 4 * MiB)


def test_cluster_url_parsing():
    url = parse_cluster_url("redis://127.0.0.1:7000,127.0.0.1:7001,[::1]:7002,cache-host")
    assert url.nodes == (("127.0.0.1", 7000), ("127.0.0.1", 7001), ("::1", 7002), ("cache-host", 6379))
    assert (url.username, url.password, url.tls) == (None, None, False)
    url = parse_cluster_url("rediss://igt:p%40ss%3Aword@h1:1,h2:2/?ssl_ca_certs=/ca.pem&ssl_check_hostname=false")
    assert (url.username, url.password, url.tls) == ("igt", "p@ss:word", True)
    assert url.tls_options == {"ssl_ca_certs": "/ca.pem", "ssl_check_hostname": False}
    assert "p@ss" not in url.redacted() and url.redacted().startswith("rediss://igt:***@h1:1")
    assert parse_cluster_url("redis://:secret@h:1").password == "secret"
    for bad in ("http://h:1", "redis://", "redis://h:port", "redis://h:1/0", "redis://h:1?ssl_ca_certs=/x",
                "rediss://h:1?db=2", "redis://h:70000"):
        with pytest.raises(ValueError):
            parse_cluster_url(bad)


def test_circuit_breaker_opens_probes_and_closes():
    now = [0.0]
    breaker = CircuitBreaker(failures=3, cooldown=5.0, clock=lambda: now[0])
    breaker.failure(), breaker.failure()
    assert breaker.state == CLOSED and breaker.allow()
    breaker.success()  # a success resets the run of failures
    breaker.failure(), breaker.failure()
    assert breaker.state == CLOSED
    breaker.failure()
    assert breaker.state == OPEN and not breaker.allow() and breaker.times_opened == 1
    now[0] = 5.0
    assert breaker.state == HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failure()  # the probe failed: open for another cool-down
    assert breaker.state == OPEN and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()
    now[0] = 15.0  # that probe never reported back: another one may go
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow() and breaker.times_opened == 1


def test_unreachable_cluster_is_a_miss_then_an_open_circuit():
    port = free_port()  # nothing listens there
    with _tier(f"redis://127.0.0.1:{port}", timeout=0.25, circuit_failures=2, circuit_cooldown=30) as tier:
        key = _key()
        for _ in range(2):
            assert tier.fetch_block(key, 0, B).result(5) is None
        assert tier.stats()["circuit"]["cluster"] == OPEN
        started = time.monotonic()
        assert tier.fetch_block(key, 0, B).result(5) is None
        assert tier.lease(key).result(5) is True  # no coordination possible: fetch it yourself
        assert time.monotonic() - started < 0.1
        stats = tier.stats()
        assert stats["errors"] == 2 and stats["circuit_skips"] == 2 and stats["misses"] == 3
        with pytest.raises(ValueError):
            tier.fetch_block(BlockKey("p", "v", 1), 0, B)  # not block 1's range
    assert tier.fetch_block(key, 0, B).result(1) is None  # closed: resolves at once
    assert not tier.publish(key, b"x")


def test_launcher_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="at least 3"):
        RedisClusterProcess(tmp_path, nodes=2)
    with pytest.raises(ValueError, match="0 or 1"):
        RedisClusterProcess(tmp_path, replicas=2)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisClusterError, match="apt-get install redis-server"):
        RedisClusterProcess(tmp_path).start()


# ---- against a real cluster ----


def test_round_trip_returns_exact_bytes(cluster):
    with _tier(cluster.url) as tier:
        key, last = _key(0), _key(5)
        assert tier.fetch_block(key, 0, B).result(5) is None
        data, tail = os.urandom(B), os.urandom(12_345)  # a full block, and an object's short last block
        _published(tier, key, data)
        _published(tier, last, tail)
        assert tier.fetch_block(key, 0, B).result(5) == data
        assert tier.fetch_block(last, 5 * B, 5 * B + len(tail)).result(5) == tail
        stats = tier.stats()
        assert (stats["hits"], stats["misses"], stats["published"]) == (2, 1, 2)
        assert stats["publish_bytes"] == B + len(tail) and stats["publish_queue_bytes"] == 0
        assert set(stats["circuit"].values()) == {CLOSED}
        # Asked for another length than the block has: a miss, and the value stays.
        assert tier.fetch_block(last, 5 * B, 5 * B + len(tail) - 1).result(5) is None
        assert tier.stats()["mismatched"] == 1
        assert tier.fetch_block(last, 5 * B, 5 * B + len(tail)).result(5) == tail


def test_runs_on_a_given_loop(cluster):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        threads = threading.active_count()
        with _tier(cluster.url, loop=loop) as tier:
            key, data = _key(), os.urandom(B)
            _published(tier, key, data)
            assert tier.fetch_block(key, 0, B).result(5) == data
            assert threading.active_count() == threads  # no thread of its own
        assert loop.is_running()  # the caller's loop is the caller's to stop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_other_remote_version_block_size_or_prefix_never_sees_a_block(cluster, raw):
    key = _key()
    data = os.urandom(B)
    with _tier(cluster.url) as tier:
        _published(tier, key, data)
        assert tier.fetch_block(key, 0, B).result(5) == data
        assert tier.fetch_block(key._replace(version="etag-2"), 0, B).result(5) is None
        assert tier.fetch_block(key._replace(path=key.path + ".1"), 0, B).result(5) is None
        # Blocks spread over the cluster: 30 keys land on every master.
        names = [tier.key_name(_key(i)) for i in range(30)]
        assert len({raw.get_node_from_key(name).name for name in names}) == 3
    others = [dict(remote_id="s3://bucket/other"), dict(block_size=2 * B), dict(prefix="igtcache2")]
    for kwargs in others:
        with _tier(cluster.url, **kwargs) as other:
            assert other.fetch_block(key, 0, B).result(5) is None, kwargs
            assert other.stats()["misses"] == 1 and other.stats()["errors"] == 0


def test_damaged_value_is_a_miss_deleted_and_counted(cluster, raw):
    with _tier(cluster.url) as tier:
        damages = {
            "flipped bit": lambda v: v[:HEADER_SIZE + 7] + bytes([v[HEADER_SIZE + 7] ^ 4]) + v[HEADER_SIZE + 8:],
            "truncated": lambda v: v[:-100],
            "bad magic": lambda v: b"JUNK" + v[4:],
            "not ours": lambda v: b"some other program's value",
        }
        for count, (what, damage) in enumerate(damages.items(), start=1):
            key = _key()
            _published(tier, key, os.urandom(B))
            name = tier.key_name(key)
            raw.set(name, damage(raw.get(name)))
            assert tier.fetch_block(key, 0, B).result(5) is None, what
            assert tier.stats()["corrupt"] == count, what
            deadline = time.monotonic() + 5
            while raw.exists(name) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not raw.exists(name), f"{what}: damaged value not deleted"
        assert tier.stats()["hits"] == 0


def test_publish_queue_overflow_drops_without_blocking(cluster):
    size = 4 * MiB
    with _tier(cluster.url, block_size=size, publish_queue_bytes=3 * size) as tier:
        started = time.monotonic()
        _published(tier, _key(), os.urandom(size))
        one_publish = time.monotonic() - started  # queue, SET and confirm one block
        blocks = [(_key(), os.urandom(size)) for _ in range(24)]
        calls, accepted = [], []
        for key, data in blocks:
            started = time.monotonic()
            accepted.append(tier.publish(key, data))
            calls.append(time.monotonic() - started)
        assert tier.flush(30)
        stats = tier.stats()
        assert stats["publish_dropped"] == accepted.count(False) > 0
        assert stats["published"] == 1 + accepted.count(True) and stats["publish_queue_bytes"] == 0
        # publish() never waits for Redis: the whole loop of calls took less than storing one block.
        assert sum(calls) < one_publish, (sum(calls), one_publish)
        for (key, data), ok in zip(blocks, accepted):
            assert tier.fetch_block(key, 0, size).result(5) == (data if ok else None)


def test_lease_single_flight_across_nodes(cluster):
    # A lease that cannot be asked in time counts as won (fetch it yourself): the deadline here is
    # long enough for four new clients' first commands on a loaded machine, so every one is asked.
    tiers = [_tier(cluster.url, lease_ms=1500, timeout=5.0) for _ in range(4)]
    try:
        # Only one of several concurrent lease() calls wins.
        key, data = _key(), os.urandom(B)
        futures = [tier.lease(key) for tier in tiers]
        wait(futures, 10)
        won = [f.result() for f in futures]
        assert all(t.stats()["errors"] == 0 for t in tiers)
        assert won.count(True) == 1, won
        holder = tiers[won.index(True)]
        waiters = [tier for tier, w in zip(tiers, won) if not w]
        # The others' wait_published returns the bytes once published. The holder releases
        # straight after publish(): the release waits for the queued publish.
        started = time.monotonic()
        waiting = [tier.wait_published(key, 0, B, timeout=5) for tier in waiters]
        time.sleep(0.3)
        assert holder.publish(key, data)
        holder.release(key)
        assert [f.result(10) for f in waiting] == [data] * len(waiters)
        assert time.monotonic() - started < 2.0  # well before the 5 s bound
        assert sum(t.stats()["waits_served"] for t in waiters) == len(waiters)

        # Released straight after publish() while the queue is busy: the lease stays until the
        # block is stored, so a waiter that starts now never sees "no lease, no block".
        key, data, filler = _key(), os.urandom(B), os.urandom(B)
        assert tiers[0].lease(key).result(5) is True
        for _ in range(32):
            assert tiers[0].publish(_key(), filler)
        assert tiers[0].publish(key, data)
        tiers[0].release(key)
        assert tiers[1].wait_published(key, 0, B, timeout=5).result(10) == data

        # Nobody publishes: None at the bound.
        key = _key()
        assert tiers[0].lease(key).result(5) is True
        started = time.monotonic()
        assert tiers[1].wait_published(key, 0, B, timeout=0.5).result(5) is None
        assert 0.5 <= time.monotonic() - started < 0.5 + 1.0 + 0.5  # the bound, plus at most one deadline

        # The lease expires by itself: another node may fetch then.
        time.sleep(1.5)
        assert tiers[2].lease(key).result(5) is True

        # The holder gives up without publishing: waiters learn it long before their bound.
        key = _key()
        assert tiers[0].lease(key).result(5) is True
        started = time.monotonic()
        waiting = tiers[1].wait_published(key, 0, B, timeout=5)
        time.sleep(0.2)
        tiers[0].release(key).result(5)
        assert waiting.result(10) is None
        assert time.monotonic() - started < 1.5
        assert tiers[3].lease(key).result(5) is True
        assert tiers[1].release(key).result(5) is None  # not its lease: left alone
        assert tiers[2].lease(key).result(5) is False
    finally:
        for tier in tiers:
            tier.close()


def _node_keys(tier: ClusterTier, raw, count: int = 24) -> dict[str, list[tuple[BlockKey, bytes]]]:
    """Published blocks, grouped by the node (host:port) that holds them."""
    by_node: dict[str, list] = {}
    for i in range(count):
        key, data = _key(), os.urandom(64 * 1024)
        assert tier.publish(key, data)
        by_node.setdefault(raw.get_node_from_key(tier.key_name(key)).name, []).append((key, data))
    assert tier.flush(10) and tier.stats()["published"] == count
    return by_node


def test_node_hang_and_crash_open_its_circuit_others_keep_serving(tmp_path):
    need_redis()
    timeout, cooldown = 0.25, 1.0
    with RedisClusterProcess(tmp_path, maxmemory=64 * MiB) as cluster, \
            redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0]) as raw, \
            _tier(cluster.url, block_size=64 * 1024, timeout=timeout, circuit_failures=3,
                  circuit_cooldown=cooldown) as tier:
        by_node = _node_keys(tier, raw)
        victim = f"127.0.0.1:{cluster.ports[0]}"
        assert set(by_node) == {f"127.0.0.1:{port}" for port in cluster.ports}
        healthy = [item for node, items in by_node.items() if node != victim for item in items]

        def fetch(item):
            key, data = item
            started = time.monotonic()
            got = tier.fetch_block(key, key.index * (64 * 1024), key.index * (64 * 1024) + len(data)).result(10)
            return got, time.monotonic() - started

        def victim_fails_then_opens():
            """Fetches for the victim's keys miss within the bound until its circuit opens;
            then they return at once, and every other node still serves."""
            for item in by_node[victim][:3]:
                got, took = fetch(item)
                assert got is None and took < timeout + 0.5, took
            assert tier.stats()["circuit"][victim] == OPEN
            for item in by_node[victim]:
                got, took = fetch(item)
                assert got is None and took < 0.1, took
            for item in healthy:
                got, took = fetch(item)
                assert got == item[1]

        # A hung node (SIGSTOP): every command waits out its deadline until the circuit opens.
        pid = cluster.pids[0]
        os.kill(pid, signal.SIGSTOP)
        try:
            victim_fails_then_opens()
            assert tier.stats()["timeouts"] >= 3
        finally:
            os.kill(pid, signal.SIGCONT)
        # After the cool-down one probe goes through, succeeds and closes the circuit.
        time.sleep(cooldown)
        assert [fetch(item)[0] for item in by_node[victim]] == [data for _, data in by_node[victim]]
        assert tier.stats()["circuit"][victim] == CLOSED

        # A crashed node (SIGKILL, no replica): its keys miss, its circuit opens, the rest serves.
        cluster.kill_node(0)
        victim_fails_then_opens()
        errors = tier.stats()["errors"]
        time.sleep(cooldown)
        assert fetch(by_node[victim][0])[0] is None  # the probe fails: open again
        assert tier.stats()["circuit"][victim] == OPEN and tier.stats()["errors"] == errors + 1
        assert all(fetch(item)[0] == item[1] for item in healthy)
        assert tier.stats()["circuit_opens"] == 2


def test_acl_user_and_password_in_the_url(cluster):
    user, password = "igt_acl", "p@ss:w0rd"
    for port in cluster.ports:
        cluster.cli(port, "ACL", "SETUSER", user, "on", f">{password}", "~acl:*", "+@all")
    try:
        key, data = _key(), os.urandom(B)
        hosts = ",".join(f"127.0.0.1:{port}" for port in cluster.ports)
        with _tier(f"redis://{user}:p%40ss%3Aw0rd@{hosts}", prefix="acl") as tier:
            _published(tier, key, data)
            assert tier.fetch_block(key, 0, B).result(5) == data
            assert tier.stats()["errors"] == 0
        # The URL's user is the one acting: its ACL refuses keys outside acl:*.
        with _tier(f"redis://{user}:p%40ss%3Aw0rd@{hosts}", prefix="other") as tier:
            assert tier.fetch_block(key, 0, B).result(5) is None
            assert tier.stats()["errors"] == 1
            assert set(tier.stats()["circuit"].values()) == {CLOSED}  # a refusal is an answer
        with _tier(f"redis://{user}:wrong@{hosts}", prefix="acl") as tier:
            assert tier.fetch_block(key, 0, B).result(5) is None
            assert tier.stats()["errors"] == 1 and tier.stats()["hits"] == 0
    finally:
        for port in cluster.ports:
            cluster.cli(port, "ACL", "DELUSER", user)


def _tls_files(directory) -> ClusterTLS:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the TLS cluster")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return ClusterTLS(str(cert), str(key), str(cert))  # self-signed: its own CA


def test_tls_cluster(tmp_path):
    need_redis()
    tls = _tls_files(tmp_path)
    try:
        cluster = RedisClusterProcess(tmp_path / "redis", tls=tls, maxmemory=64 * MiB).start()
    except RedisClusterError as exc:
        if "Bad directive" in str(exc):  # what a build without TLS says to --tls-port
            pytest.skip(f"redis-server was built without TLS: {exc}")
        raise
    try:
        assert cluster.url.startswith("rediss://") and cluster.url.endswith(f"?ssl_ca_certs={tls.ca}")
        key, data = _key(), os.urandom(B)
        with _tier(cluster.url) as tier:
            _published(tier, key, data)
            assert tier.fetch_block(key, 0, B).result(5) == data
        # The nodes speak TLS only: a plain connection gets nowhere.
        plain_url = "redis://" + cluster.url.split("://", 1)[1].split("?")[0]
        with _tier(plain_url, timeout=0.25) as plain:
            assert plain.fetch_block(key, 0, B).result(5) is None
            assert plain.stats()["errors"] == 1
    finally:
        cluster.stop()


def test_cluster_command_up_status_down(tmp_path, monkeypatch, capsys):
    """``up`` runs as the command does (its nodes outlive it); the rest in-process, for time."""
    need_redis()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # where the default --dir goes

    def run(*args):
        status = cluster_command([*args])
        out, err = capsys.readouterr()
        return status, out, err

    # A busy --base-port is refused, naming the port.
    port = free_cluster_ports(1)[0]  # free with its bus port, so holding it makes it busy
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        status, _, err = run("up", "--dir", str(tmp_path / "busy"), "--base-port", str(port))
    assert status == 1 and "ports busy on 127.0.0.1: " in err
    busy = err.split("ports busy on 127.0.0.1: ")[1].split(" (")[0].split(", ")
    assert str(port) in busy  # other ports of the range may be busy too on a shared machine

    directory = tmp_path / "igtcache-cluster"
    started = subprocess.run([sys.executable, "-m", "igtcache.cli", "cluster", "up", "--replicas", "1",
                              "--memory", "32MiB"], capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    url, pids, where = started.stdout.splitlines()[:3]
    try:
        assert url.startswith("redis://127.0.0.1:") and url.count(",") == 5  # 3 masters, 3 replicas
        assert "3 masters and 3 replicas, maxmemory 32 MiB each" in pids
        assert where == f"directory {directory}; stop with: igtcache cluster down {directory}"
        with _tier(url) as tier:
            key, data = _key(), os.urandom(B)
            _published(tier, key, data)
            assert tier.fetch_block(key, 0, B).result(5) == data
        status, out, _ = run("status")
        assert status == 0 and out.count("cluster_state ok") == 6, out
        assert out.count(" master ") == 3 and out.count(" replica ") == 3, out
        status, _, err = run("up", "--dir", str(directory))
        assert status == 1 and "already runs" in err
    finally:
        status, out, _ = run("down", str(directory))
    assert status == 0 and out.split()[2:] == pids.split(";")[0].split()[1:]
    assert run("status", "--dir", str(directory))[0] == 1
