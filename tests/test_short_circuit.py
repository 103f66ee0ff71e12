"""Short-circuit reads: attached clients serve disk-tier hits in their own process, against real
daemons, real LMDB and a local-file remote."""

from __future__ import annotations

import json
import multiprocessing
import os
import pwd
import random
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import DaemonClient
from igtcache.disk_format import PIECE_SIZE, encode_index, verified
from igtcache.errors import BadRequest
from igtcache.hit_report import MAX_WAITING, HitLog, decode_report, encode_report

KiB = 1 << 10
BLOCK = 64 * KiB


def _content(name: str, generation: int, size: int) -> bytes:
    return random.Random(f"{name}/{generation}").randbytes(size)


def _write(root: Path, name: str, data: bytes) -> None:
    """Replace a remote object atomically (a new inode: a new version)."""
    tmp = root / f".{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, root / name)


def _daemon(work: Path, remote: Path, *extra: str) -> DaemonProcess:
    args = ["--remote", f"data=file://{remote}", "--cache-dir", str(work / "cache"), "--memory", "1MiB",
            "--disk", "16MiB", "--block-size", "64KiB", "--log-level", "info", *extra]
    return DaemonProcess(work / "d.sock", args)


@pytest.fixture
def served(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    objects = {f"obj{i}.bin": _content(f"obj{i}.bin", 0, size)
               for i, size in enumerate([100 * KiB, 3 * BLOCK + 1234, 5 * KiB])}
    for name, data in objects.items():
        _write(remote, name, data)
    with _daemon(tmp_path, remote) as daemon:
        yield daemon, remote, objects


def _cached(client: DaemonClient, name: str, offset: int = 0, size: int = -1) -> bytes:
    """Read a range through the daemon, then until the disk tier serves it here (the daemon
    writes fetched blocks to disk in the background)."""
    data = client.read(name, offset, size)
    deadline = time.monotonic() + 10
    while True:
        served = client._disk.served
        assert client.read(name, offset, size) == data
        if client._disk.served > served:
            return data
        assert time.monotonic() < deadline, "the disk tier never served the range"
        time.sleep(0.02)


def _socket_reads(client: DaemonClient) -> int:
    return client.daemon_stats()["daemon"]["requests"].get("read", 0)


def test_hits_are_served_in_process_verified_and_reported(served):
    daemon, _remote, objects = served
    with DaemonClient(daemon.socket_path, job="trainer") as client:
        assert client.short_circuited
        for name, data in objects.items():
            assert _cached(client, name) == data  # a miss through the daemon, then a hit here
        before = _socket_reads(client)
        rng = random.Random(1)
        for _ in range(200):
            name = rng.choice(sorted(objects))
            data = objects[name]
            offset = rng.randrange(len(data))
            size = rng.choice([1, 4 * KiB, BLOCK + 7, len(data)])
            assert client.read(name, offset, size) == data[offset:offset + size]
            buffer = bytearray(size)
            got = client.readinto(name, offset, buffer)
            assert bytes(buffer[:got]) == data[offset:offset + size]
        assert client.info("obj1.bin")["size"] == len(objects["obj1.bin"])
        assert _socket_reads(client) == before  # not one read went over the socket
        stats = client.stats()  # flushes this process's reports first
        reads = stats["jobs"]["trainer"]["reads"]
        assert stats["jobs"]["trainer"]["hits"] == reads - len(objects) and reads >= 400 + 2 * len(objects)
        assert client._disk.served == reads - len(objects) - (reads - 400 - 2 * len(objects))
        assert client.read("obj2.bin", len(objects["obj2.bin"]) + 10, 5) == b""  # past the end, as a file


def test_a_read_that_needs_the_daemon_goes_to_it(served):
    daemon, remote, objects = served
    with DaemonClient(daemon.socket_path) as client:
        before = _socket_reads(client)
        assert client.read("obj0.bin") == objects["obj0.bin"]  # never read: not in the tier
        assert _socket_reads(client) == before + 1
        with pytest.raises(FileNotFoundError):
            client.read("missing.bin")
        with pytest.raises(ValueError):
            client.read("../outside", 0, 10)
        _write(remote, "obj0.bin", b"new")
        client.invalidate("obj0.bin")  # this process's next read takes a snapshot without it
        assert client.read("obj0.bin") == b"new"


def test_metadata_past_its_ttl_is_checked_by_the_daemon(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    _write(remote, "a.bin", b"first version")
    with _daemon(tmp_path, remote, "--ttl", "0.3") as daemon, DaemonClient(daemon.socket_path) as client:
        assert _cached(client, "a.bin") == b"first version"
        _write(remote, "a.bin", b"second version!")
        time.sleep(0.4)
        assert client.read("a.bin") == b"second version!"  # the tier's stamp has expired: the daemon checks
        assert _cached(client, "a.bin") == b"second version!"  # and vouched for the new version


def test_a_damaged_piece_is_never_returned(served):
    daemon, _remote, objects = served
    data = objects["obj1.bin"]  # blocks of 64 KiB, two pieces each
    with DaemonClient(daemon.socket_path) as client:
        assert _cached(client, "obj1.bin") == data
        data_file = Path(daemon.socket_path).parent / "cache" / "data" / "blocks.lmdb" / "data.mdb"
        raw = bytearray(data_file.read_bytes())
        at = raw.find(data[PIECE_SIZE + 100:PIECE_SIZE + 164])
        assert at >= 0
        with open(data_file, "r+b") as f:  # in place: every map of the file sees it
            f.seek(at)
            f.write(bytes(b ^ 0xFF for b in raw[at:at + 8]))
        time.sleep(0.1)  # past a snapshot's life: the next read takes a new one
        damaged = client._disk.damaged
        before = _socket_reads(client)
        assert client.read("obj1.bin", PIECE_SIZE + 90, 100) == data[PIECE_SIZE + 90:PIECE_SIZE + 190]
        assert client._disk.damaged == damaged + 1 and _socket_reads(client) == before + 1
        # The other pieces of the same block still verify, and are served here.
        assert client.read("obj1.bin", 2 * PIECE_SIZE, 100) == data[2 * PIECE_SIZE:2 * PIECE_SIZE + 100]
        assert _socket_reads(client) == before + 1


def test_read_many_serves_hits_here_and_the_rest_in_one_round_trip(served):
    daemon, _remote, objects = served
    with DaemonClient(daemon.socket_path) as client:
        assert _cached(client, "obj1.bin", 0, BLOCK) == objects["obj1.bin"][:BLOCK]
        before = _socket_reads(client)
        requests = client.daemon_stats()["daemon"]["requests"].get("read_many", 0)
        ranges = [("obj1.bin", 10, 100), ("obj0.bin", 5, 50), ("obj2.bin", 0, 5 * KiB), ("obj1.bin", 2 * BLOCK, 10)]
        assert client.read_many(ranges) == [objects[p][o:o + s] for p, o, s in ranges]
        assert _socket_reads(client) == before
        assert client.daemon_stats()["daemon"]["requests"]["read_many"] == requests + 1
        with pytest.raises(FileNotFoundError):
            client.read_many([("obj0.bin", 0, 1), ("missing.bin", 0, 1)])


def test_readers_racing_eviction_and_overwrites_see_one_whole_version(tmp_path):
    """Threads read random ranges through one client while the remote's objects are replaced
    and a small disk tier evicts: every read equals one version's bytes, never a mix."""
    remote = tmp_path / "remote"
    remote.mkdir()
    sizes = {f"o{i}.bin": (2 + i % 3) * BLOCK + 333 * i for i in range(10)}
    history = {name: [_content(name, 0, size)] for name, size in sizes.items()}
    for name, versions in history.items():
        _write(remote, name, versions[0])
    stop = time.monotonic() + 4
    failures: list[str] = []
    counts = [0, 0]

    def overwrite() -> None:
        rng = random.Random(7)
        while time.monotonic() < stop:
            name = rng.choice(sorted(sizes))
            data = _content(name, len(history[name]), sizes[name])
            history[name] = history[name] + [data]
            _write(remote, name, data)
            time.sleep(0.03)

    def read(client: DaemonClient, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            name = rng.choice(sorted(sizes))
            offset = rng.randrange(sizes[name])
            size = rng.choice([100, 4 * KiB, BLOCK, 2 * BLOCK + 5])
            try:
                got = client.read(name, offset, size)
            except OSError as exc:  # rewritten again while the daemon refetched it: said so, no bytes
                if "keeps changing while being read" not in str(exc):
                    failures.append(f"{name}[{offset}:+{size}]: {exc!r}")
                continue
            counts[0] += 1
            if not any(got == v[offset:offset + size] for v in history[name]):
                failures.append(f"{name}[{offset}:+{size}] matches no version")

    with _daemon(tmp_path, remote, "--ttl", "0.2", "--disk", "512KiB", "--memory", "128KiB") as daemon:
        with DaemonClient(daemon.socket_path) as client:
            threads = [threading.Thread(target=overwrite)] + [
                threading.Thread(target=read, args=(client, seed)) for seed in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            counts[1] = client._disk.served
            stats = client.stats()
    assert not failures, failures[:5]
    assert counts[0] > 200 and counts[1] > 0, counts  # both paths ran
    assert stats["evictions"] > 0 and stats["version_changes"] + stats["remote_fetches"] > 0


def _read_in_child(socket_path: str, name: str, queue) -> None:
    client = DaemonClient(socket_path)
    data = client.read(name)
    queue.put((client._disk is not None and client._disk.served, len(data), hash(data)))
    client.close()


def test_forked_children_open_their_own_snapshots(served):
    daemon, _remote, objects = served
    data = objects["obj1.bin"]
    with DaemonClient(daemon.socket_path) as client:
        assert _cached(client, "obj1.bin") == data  # the parent holds a snapshot across the fork
        served_before = client._disk.served
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        children = [ctx.Process(target=_read_in_child, args=(daemon.socket_path, "obj1.bin", queue)) for _ in range(3)]
        for child in children:
            child.start()
        results = [queue.get(timeout=60) for _ in children]
        for child in children:
            child.join(60)
            assert child.exitcode == 0
        assert results == [(1, len(data), hash(data))] * 3  # each served from the tier in its own process
        assert client.read("obj1.bin") == data and client._disk.served == served_before + 1


def test_a_killed_clients_reader_slot_is_cleared_by_the_daemon(served):
    daemon, _remote, objects = served
    with DaemonClient(daemon.socket_path) as client:
        assert _cached(client, "obj0.bin") == objects["obj0.bin"]
    script = ("import os, signal, sys\nfrom igtcache.daemon_client import DaemonClient\n"
              "c = DaemonClient(sys.argv[1])\nassert c.read('obj0.bin') and c._disk.served == 1\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    child = subprocess.run([sys.executable, "-c", script, daemon.socket_path], timeout=60)
    assert child.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 15
    while "cleared 1 reader slots of dead processes" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.2)


# ---------------------------------------------------------------------- permissions

def _modes(cache: Path) -> dict[str, int]:
    tier = cache / "data"
    return {name: stat.S_IMODE(path.stat().st_mode) for name, path in
            {"tier": tier, "env": tier / "blocks.lmdb", "data": tier / "blocks.lmdb" / "data.mdb",
             "lock": tier / "blocks.lmdb" / "lock.mdb"}.items()}


def test_the_disk_tier_is_as_private_as_the_socket(served):
    daemon, _remote, _objects = served
    assert _modes(Path(daemon.socket_path).parent / "cache") == {"tier": 0o700, "env": 0o700, "data": 0o600,
                                                                  "lock": 0o600}


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a client as another user, which needs root")
def test_a_user_who_may_not_read_the_tier_reads_through_the_socket():
    nobody = pwd.getpwnam("nobody")
    work = Path(tempfile.mkdtemp(prefix="igtcache-sc-"))
    try:
        os.chmod(work, 0o755)  # the socket's directory must be reachable by the other user
        remote = work / "remote"
        remote.mkdir()
        _write(remote, "a.bin", b"x" * 5000)
        with _daemon(work, remote, "--socket-mode", "0666") as daemon:
            cache = work / "cache"
            assert _modes(cache) == {"tier": 0o755, "env": 0o755, "data": 0o644, "lock": 0o666}
            with DaemonClient(daemon.socket_path) as client:
                assert client.read("a.bin") == b"x" * 5000
            # Imports first: the interpreter and the project may live where nobody cannot read.
            script = ("import json, logging, os, sys\nfrom igtcache.daemon_client import DaemonClient\n"
                      f"os.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})\n"
                      "logging.basicConfig(level=logging.INFO)\n"
                      "c = DaemonClient(sys.argv[1])\nd = c.read('a.bin')\nd2 = c.read('a.bin')\n"
                      "print(json.dumps([c.short_circuited, d == d2 == b'x' * 5000]))\n")

            def as_nobody() -> tuple[list, str]:
                run = subprocess.run([sys.executable, "-c", script, daemon.socket_path], capture_output=True,
                                     text=True, timeout=60, env={**os.environ, "HOME": "/tmp"})
                assert run.returncode == 0, run.stderr
                return json.loads(run.stdout), run.stderr

            assert as_nobody()[0] == [True, True]  # shared with everyone, as the socket is
            os.chmod(cache / "data", 0o700)
            result, log = as_nobody()
            assert result == [False, True]
            lines = [line for line in log.splitlines() if "not from its disk tier" in line]
            assert len(lines) == 1 and "Permission denied" in lines[0], log
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


# ---------------------------------------------------------------------- formats

def test_pieces_are_verified_at_the_cost_of_what_is_read():
    data = bytearray(random.Random(3).randbytes(4 * PIECE_SIZE + 100))
    index = encode_index(bytes(data), 1, "p", "v")
    assert verified(index, data) and verified(index, data, 5, 10)
    data[PIECE_SIZE + 3] ^= 1
    assert not verified(index, data)  # the whole block
    assert not verified(index, data, PIECE_SIZE, PIECE_SIZE + 10)  # the damaged piece
    assert not verified(index, data, 10, PIECE_SIZE + 1)  # a range that reaches into it
    assert verified(index, data, 0, PIECE_SIZE) and verified(index, data, 2 * PIECE_SIZE, len(data))
    assert not verified(index, data[:-1], 0, 10)  # a block of another length
    assert not verified(index[:30], data, 0, 10)  # a cut index


def test_hit_reports_round_trip_and_refuse_what_is_malformed():
    reads = [("job-a", "x/1.bin", "v1", 1000, 0, 100, 5.0), ("job-b", "x/2.bin", "v9", 50, 10, 40, 5.5),
             ("job-a", "x/1.bin", "v1", 1000, 100, 900, 6.0)]
    report = decode_report(encode_report("data", reads, dropped=3))
    batch = report.batch
    assert (report.remote, report.dropped) == ("data", 3)
    assert [(batch.jobs[j], batch.objects[o].path, batch.objects[o].version, batch.objects[o].size, off, size, ts)
            for j, o, off, size, ts in zip(batch.job, batch.obj, batch.offset, batch.size, batch.ts)] == reads
    payload = encode_report("data", reads)
    for bad in (payload[:-1], payload + b"x", payload[:5], b""):
        with pytest.raises(BadRequest):
            decode_report(bad)
    log = HitLog()
    for i in range(MAX_WAITING + 5):
        log.add("j", "p", "v", 10, 0, 1, float(i))
    assert len(log) == MAX_WAITING and log.dropped == 5
    taken = 0
    while (payload := log.take("data")) is not None:
        taken += len(decode_report(payload).batch.ts)
    assert taken == MAX_WAITING and log.dropped == 0
