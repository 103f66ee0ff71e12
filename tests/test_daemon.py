"""The node daemon as real processes on a temporary socket, against a local S3 server."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
import uuid

import pytest

from igtcache.cli import main as cli_main
from igtcache.daemon import protocol as P
from igtcache.daemon.metrics import render as render_metrics
from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import DaemonClient, DaemonUnavailable
from igtcache.local_s3 import free_port
from igtcache.stats_cmd import render as render_stats

from .conftest import BUCKET
from .helpers import binary_connection, in_threads

KiB = 1 << 10
BLOCK = 256 * KiB


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.unix_path)


def http_get(sock: str, url: str, method: str = "GET") -> tuple[int, bytes]:
    conn = _UnixHTTP(sock)
    try:
        conn.request(method, url)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _objects(prefix: str) -> dict[str, bytes]:
    rng = random.Random(prefix)
    sizes = [1, 100 * KiB, 3 * BLOCK, 3 * BLOCK + 12345, 1 << 20]
    return {f"{prefix}/obj-{i}.bin": rng.randbytes(size) for i, size in enumerate(sizes)}


@pytest.fixture(scope="module")
def served(s3_server, tmp_path_factory):
    """A daemon serving two prefixes of the test bucket as remotes ``a`` and ``b``."""
    fs = s3_server.filesystem()
    root = f"{BUCKET}/daemon-{uuid.uuid4().hex[:8]}"
    objects = {**_objects("a"), **_objects("b")}
    for name, data in objects.items():
        fs.pipe_file(f"{root}/{name}", data)
    work = tmp_path_factory.mktemp("daemon")
    metrics_port = free_port()
    args = [
        "--remote", f"a=s3://{root}/a", "--remote", f"b=s3://{root}/b",
        "--storage-options", json.dumps(s3_server.storage_options()),
        "--cache-dir", str(work / "cache"), "--memory", "16MiB", "--disk", "32MiB",
        "--block-size", str(BLOCK), "--max-read", "4MiB", "--metrics-port", str(metrics_port),
    ]
    with DaemonProcess(work / "d.sock", args) as daemon:
        daemon.objects = objects
        daemon.work = work
        daemon.metrics_port = metrics_port
        yield daemon


# ---------------------------------------------------------------------- reads

CLIENT = textwrap.dedent("""
    import json, random, sys
    from igtcache.daemon_client import DaemonClient
    sock, expected_dir, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    names = json.load(open(f"{expected_dir}/names.json"))
    expected = {name: open(f"{expected_dir}/{i}", "rb").read() for i, name in enumerate(names)}
    rng = random.Random(seed)
    client = DaemonClient(sock)
    clients = {r: client.for_remote(r) for r in ("a", "b")}
    for _ in range(150):
        name = rng.choice(names)
        data = expected[name]
        offset = rng.randrange(len(data) + 10)
        size = rng.choice([1, 4096, 256 * 1024, 300000, len(data) + 5])
        remote, path = name.split("/", 1)
        got = clients[remote].read(path, offset, size)
        if got != data[offset:offset + size]:
            sys.exit(f"mismatch: {name} offset {offset} size {size}: {len(got)} bytes")
    buffer = bytearray(5000)
    n = clients["a"].readinto("obj-4.bin", 1000, buffer)
    if bytes(buffer[:n]) != expected["a/obj-4.bin"][1000:6000]:
        sys.exit("readinto mismatch")
""")


def test_concurrent_client_processes_read_byte_exact_and_each_is_its_own_job(served, tmp_path):
    names = sorted(served.objects)
    (tmp_path / "names.json").write_text(json.dumps(names))
    for i, name in enumerate(names):
        (tmp_path / str(i)).write_bytes(served.objects[name])
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT, served.socket_path, str(tmp_path), str(seed)],
                                stderr=subprocess.PIPE, text=True) for seed in range(4)]
    for client in clients:
        _out, err = client.communicate(timeout=240)
        assert client.returncode == 0, err
    with DaemonClient(served.socket_path, "a") as client:
        stats = client.stats()
    assert {str(c.pid) for c in clients} <= set(stats["jobs"])
    assert stats["hits"] > 0 and stats["bytes_from_cache"] > 0


def test_reads_carry_the_clients_job_and_several_remotes_are_named(served):
    with DaemonClient(served.socket_path, job="trainer-7") as client:
        assert client.remote_name is None and set(client.remotes) == {"a", "b"}
        with pytest.raises(ValueError, match="pass remote_name"):
            client.read("obj-1.bin")
        b = client.for_remote("b")
        assert b.block_size == BLOCK and b.url.endswith("/b")
        assert b.read("obj-1.bin", 10, 20) == served.objects["b/obj-1.bin"][10:30]
        assert b.read("obj-1.bin", 5, 7, job="other") == served.objects["b/obj-1.bin"][5:12]
        assert b.info("obj-2.bin")["size"] == 3 * BLOCK
        assert sorted(e["name"] for e in b.ls("")) == sorted(n.split("/", 1)[1] for n in served.objects if n[0] == "b")
        assert b.prefetch("obj-4.bin") >= 0
        jobs = b.stats()["jobs"]
    assert jobs["trainer-7"]["reads"] >= 1 and jobs["other"]["reads"] == 1


def test_one_client_is_safe_to_share_between_threads(served, monkeypatch):
    monkeypatch.setenv("IGTCACHE_JOB", "threaded")
    client = DaemonClient(served.socket_path, "a")
    names = [n.split("/", 1)[1] for n in served.objects if n.startswith("a/")]
    failures: list = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            name = rng.choice(names)
            data = served.objects[f"a/{name}"]
            offset, size = rng.randrange(len(data)), rng.choice([1, 5000, BLOCK + 3])
            if client.read(name, offset, size) != data[offset:offset + size]:
                failures.append((name, offset, size))

    assert in_threads(reader, 8, timeout=120) == []
    assert not failures
    assert client.stats()["jobs"]["threaded"]["reads"] == 8 * 60
    client.close()


def test_http_api_serves_binary_reads_and_json(served):
    data = served.objects["a/obj-3.bin"]
    status, body = http_get(served.socket_path, "/v1/remotes/a/read?path=obj-3.bin&offset=7&size=300000&job=curl")
    assert status == 200 and body == data[7:300007]
    status, body = http_get(served.socket_path, "/v1/remotes/a/info?path=obj-3.bin")
    assert status == 200 and json.loads(body)["size"] == len(data)
    status, body = http_get(served.socket_path, "/v1/remotes/a/invalidate?path=obj-3.bin", method="POST")
    assert status == 200
    status, body = http_get(served.socket_path, "/health")
    assert json.loads(body)["pid"] == served.pid


# ---------------------------------------------------------------------- bad input

def _answer(conn: socket.socket) -> tuple[int, bytes]:
    status, length = P.RESPONSE.unpack(conn.recv(P.RESPONSE.size, socket.MSG_WAITALL))
    return status, conn.recv(length, socket.MSG_WAITALL) if length else b""


def _error(conn: socket.socket, frame: bytes) -> dict:
    conn.sendall(frame)
    status, body = _answer(conn)
    assert status == P.ERROR, body
    return json.loads(body)


def test_malformed_binary_requests_get_clear_errors_and_the_daemon_lives_on(served):
    conn = binary_connection(served.socket_path)
    cases = [
        (P.encode_read("a", "../../etc/passwd", 0, 10, "j", None), "ValueError", "escapes the remote root"),
        (P.encode_read("a", "x/../../../etc/passwd", 0, 10, "j", None), "ValueError", "escapes the remote root"),
        (P.encode_read("a", "/etc/passwd", 0, 10, "j", None), "FileNotFoundError", ""),  # inside the remote root
        (P.encode_read("a", "obj-1.bin", 0, 1 << 40, "j", None), "BadRequest", "--max-read"),
        (P.encode_read("a", "obj-1.bin", 1 << 62, 10, "j", None), "", ""),
        (P.encode_read("nope", "obj-1.bin", 0, 10, "j", None), "UnknownRemote", "unknown remote 'nope'"),
        (P.encode_read("a", "obj-1.bin", 0, -5, "j", None), "BadRequest", "size -5 is out of range"),
        (P.encode_read("a", "obj-1.bin", 0, 10, "j" * 1000, None), "BadRequest", "job must be"),
        (P.REQUEST.pack(P.OP_READ, 3) + b"abc", "BadRequest", "too short"),
        (P.REQUEST.pack(P.OP_READ, P.READ_ARGS.size) + P.READ_ARGS.pack(0, 1, 50, 0, 0, 0), "BadRequest", "add up"),
        (P.REQUEST.pack(P.OP_READ, P.READ_ARGS.size + 2) + P.READ_ARGS.pack(0, 1, 2, 0, 0, 0) + b"\xff\xfe",
         "BadRequest", "UTF-8"),
        (P.REQUEST.pack(P.OP_INFO, 5) + b"{nope", "BadRequest", "not valid JSON"),
        (P.encode_json_request(P.OP_INFO, {"remote": "a", "path": 42}), "BadRequest", "path must be a string"),
        (P.encode_json_request(P.OP_INFO, {"remote": "a", "path": "x" * 5000}), "BadRequest", "longer than"),
        (P.encode_json_request(P.OP_PREFETCH, {"remote": "a", "path": "obj-1.bin", "offset": "0"}),
         "BadRequest", "offset must be an integer"),
        (P.encode_json_request(P.OP_LS, {"remote": "b", "path": "../a"}), "ValueError", "escapes"),
    ]
    for frame, error, message in cases:
        if not error:
            conn.sendall(frame)  # past the end of the object: no bytes, no error
            assert _answer(conn) == (P.OK_BYTES, b"")
            continue
        answer = _error(conn, frame)
        assert answer["error"] == error and message in answer["message"], (frame[:40], answer)
    # Frames that cannot be sized: an error, then the daemon hangs up.
    for frame, message in [(P.REQUEST.pack(99, 0), "unknown operation 99"),
                           (P.REQUEST.pack(P.OP_INFO, 1 << 30), "over the limit")]:
        conn = binary_connection(served.socket_path)
        assert message in _error(conn, frame)["message"]
        assert conn.recv(1) == b""
    with DaemonClient(served.socket_path, "a") as client:
        assert client.read("obj-1.bin", 0, 5) == served.objects["a/obj-1.bin"][:5]
        assert client.stats()["reads"] > 0


def test_malformed_http_requests_get_clear_errors(served):
    for url, status, message in [
        ("/v1/remotes/a/read?path=../../etc/passwd", 400, "escapes the remote root"),
        ("/v1/remotes/a/read?path=obj-1.bin&offset=abc", 400, "offset must be an integer"),
        ("/v1/remotes/a/read?path=obj-1.bin&size=99999999999999", 400, "--max-read"),
        ("/v1/remotes/zzz/info?path=obj-1.bin", 404, "unknown remote"),
        ("/v1/remotes/a/info?path=missing.bin", 404, ""),
    ]:
        got, body = http_get(served.socket_path, url)
        assert got == status and message in json.loads(body)["message"], (url, body)
    assert http_get(served.socket_path, "/nothing/here")[0] == 404
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(30)
    raw.connect(served.socket_path)
    raw.sendall(b"\x00\x01garbage that is no protocol at all\r\n\r\n")
    status_line = raw.recv(4096).split(b"\r\n")[0]
    assert status_line.startswith(b"HTTP/1.") and b" 400 " in status_line
    raw.close()
    assert json.loads(http_get(served.socket_path, "/health")[1])["status"] == "ok"


# ---------------------------------------------------------------------- observability

def test_metrics_on_the_socket_and_on_a_local_tcp_port(served):
    with DaemonClient(served.socket_path, "a", job='odd "job"\n') as client:
        client.read("obj-1.bin", 0, 10)
    status, body = http_get(served.socket_path, "/metrics")
    text = body.decode()
    assert status == 200
    assert "igtcache_up 1.0" in text
    assert 'igtcache_tier_bytes{remote="a",tier="disk"}' in text
    assert 'job="odd \\"job\\"\\n"' in text
    names = [line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")]
    seen, previous = set(), None
    for name in names:  # every metric's samples form one group
        assert name == previous or name not in seen, name
        seen.add(name)
        previous = name
    tcp = urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=30).read().decode()
    assert "igtcache_reads_total" in tcp
    with pytest.raises(urllib.error.HTTPError) as denied:  # no cached data over TCP
        urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/v1/remotes/a/read?path=obj-1.bin", timeout=30)
    assert denied.value.code == 404


def test_stats_command_prints_tiers_ratios_and_jobs(served, capsys, tmp_path):
    with DaemonClient(served.socket_path, "b", job="stats-job") as client:
        client.read("obj-4.bin", 0, 16 * KiB)
    assert cli_main(["stats", "--socket", served.socket_path]) == 0
    out = capsys.readouterr().out
    assert f"igtcache daemon pid {served.pid}" in out
    assert "remote a" in out and "remote b" in out and "disk" in out and "hit ratio" in out
    assert "stats-job" in out
    assert cli_main(["stats", "--socket", served.socket_path, "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["remotes"]) == {"a", "b"}
    assert cli_main(["stats", "--socket", str(tmp_path / "none.sock")]) == 1
    assert "no igtcache daemon at" in capsys.readouterr().err
    watch = subprocess.Popen([sys.executable, "-m", "igtcache.cli", "stats", "--socket", served.socket_path,
                              "--watch", "0.1"], stdout=subprocess.PIPE, text=True)
    refreshes = 0
    for line in watch.stdout:
        refreshes += line.lstrip("\x1b[2J\x1b[H").startswith("igtcache daemon pid")
        if refreshes == 2:
            break
    watch.send_signal(signal.SIGINT)
    assert watch.wait(60) == 0 and refreshes == 2


def test_stats_and_metrics_show_each_access_stream_with_its_pattern():
    stream = {"path": "train/shard-1.tar", "job": "trainer-7", "level": "file", "region": None,
              "label": "sequential", "samples": 12, "visits": 20, "accesses": 80, "rate": 250.0,
              "byte_rate": 64e6, "share": 0.25}
    stats = {"daemon": {"pid": 1, "uptime_s": 5, "connections": 2, "max_connections": 1024, "inflight_bytes": 0,
                        "max_inflight_bytes": 1 << 28, "requests": {"read": 80}, "errors": {}},
             "remotes": {"r": {"reads": 80, "hits": 40, "hit_ratio": 0.5, "byte_hit_ratio": 0.5, "jobs": {},
                               "tiers": {}, "streams": [stream, {**stream, "job": None, "label": "random"}]}}}
    lines = render_stats(stats).splitlines()
    assert any(all(w in line for w in ("trainer-7", "file", "sequential", "25.0%", "train/shard-1.tar"))
               for line in lines)
    assert any(line.split()[:3] == ["*", "file", "random"] for line in lines)
    text = render_metrics(stats)
    assert ('igtcache_stream_share{remote="r",job="trainer-7",level="file",path="train/shard-1.tar",region="",'
            'pattern="sequential"} 0.25') in text


def test_serve_help_teaches_and_bad_options_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--remote train=s3://" in out and "0600" in out
    for argv, message in [([], "no remote to serve"), (["--remote", "memory://x", "--disk", "12XB"], "not a size"),
                          (["--remote", "a=memory://x", "--remote", "a=memory://y"], "two remotes are named 'a'"),
                          (["--remote", "bad name=memory://x"], "must be 1-64 of"),
                          (["--remote", "memory://x", "--storage-options", "[1]"], "JSON object")]:
        with pytest.raises(SystemExit) as exit_:
            cli_main(["serve", *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv


# ---------------------------------------------------------------------- life cycle

def test_socket_is_private_and_a_second_daemon_is_refused(served):
    assert stat.S_IMODE(os.stat(served.socket_path).st_mode) == 0o600
    second = DaemonProcess(served.socket_path, ["--remote", "memory://igt-second", "--disk", "0"])
    assert second.run_to_exit() == 1
    assert f"already served by a live daemon (pid {served.pid})" in second.log()
    assert DaemonClient(served.socket_path, "a").health()["pid"] == served.pid


def test_stale_socket_is_replaced_and_the_mode_is_configurable(tmp_path_factory):
    work = tmp_path_factory.mktemp("stale")
    path = str(work / "d.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nothing listens: what a crashed daemon leaves
    args = ["--remote", "m=memory://igt-stale", "--disk", "0", "--socket-group", str(os.getgid())]
    with DaemonProcess(path, args) as daemon:
        assert "replacing stale socket" in daemon.log()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660 and os.stat(path).st_gid == os.getgid()
        assert DaemonClient(path).health()["remotes"] == ["m"]
    not_a_socket = work / "file.sock"
    not_a_socket.write_text("keep me")
    refused = DaemonProcess(not_a_socket, args[:4])
    assert refused.run_to_exit() == 1
    assert "not a socket" in refused.log() and not_a_socket.read_text() == "keep me"


@pytest.fixture
def blackhole():
    """A TCP endpoint that accepts connections and never answers: a remote that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = threading.Event()
    held = []

    def accept() -> None:
        try:
            while True:
                held.append(server.accept()[0])
                accepted.set()
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()
    for conn in held:
        conn.close()


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def _crash_config(s3_server, root: str, hang_port: int, path) -> None:
    hang = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{hang_port}", "region_name": "us-east-1"},
            "config_kwargs": {"connect_timeout": 5, "read_timeout": 120, "retries": {"max_attempts": 1}}}
    path.write_text(textwrap.dedent(f"""
        memory = "8MiB"
        disk = "32MiB"
        block_size = "256KiB"
        [remotes.good]
        url = "s3://{root}"
        storage_options = {_toml(s3_server.storage_options())}
        [remotes.hang]
        url = "s3://{BUCKET}/hang"
        storage_options = {_toml(hang)}
    """))


def _read_in_background(sock: str, remote: str) -> tuple[threading.Thread, list]:
    outcome: list = []

    def read() -> None:
        try:
            outcome.append(DaemonClient(sock, remote).read("stuck.bin", 0, 100))
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_stop_mid_read_gives_clients_a_clear_error_and_restart_serves_the_disk_tier(
        how, s3, s3_server, blackhole, tmp_path_factory):
    fs, root = s3
    objects = {f"f{i}.bin": random.Random(i).randbytes(300 * KiB) for i in range(3)}
    for name, data in objects.items():
        fs.pipe_file(f"{root}/{name}", data)
    work = tmp_path_factory.mktemp("crash")
    hang_port, accepted = blackhole
    _crash_config(s3_server, root, hang_port, work / "igtcache.toml")
    sock = str(work / "d.sock")
    args = ["--config", str(work / "igtcache.toml"), "--cache-dir", str(work / "cache"), "--grace", "1"]
    with DaemonProcess(sock, args) as daemon:
        good = DaemonClient(sock, "good")
        for name, data in objects.items():
            assert good.read(name) == data
        thread, outcome = _read_in_background(sock, "hang")
        assert accepted.wait(60), "the read never reached the remote"
        if how == "kill -9":
            daemon.kill()
        else:
            assert daemon.stop(signal.SIGTERM) == 0
            assert not os.path.exists(sock)
        thread.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], DaemonUnavailable), outcome
        # Verified blocks whose version the daemon vouched for within the TTL are still served in
        # this process (short-circuit); whatever needs the daemon gets a clear error.
        assert good.short_circuited and good.read("f0.bin") == objects["f0.bin"]
        with pytest.raises(DaemonUnavailable, match="no igtcache daemon at"):
            good.read("not-cached.bin")

        daemon.start()
        for name, data in objects.items():
            assert good.read(name, job="after") == data
        after = good.stats()
        assert after["jobs"]["after"]["hits"] == len(objects)
        assert after["remote_bytes"] == 0 and after["tiers"]["disk"]["blocks"] >= 6
        assert ("replacing stale socket" in daemon.log()) == (how == "kill -9")


def test_daemon_benchmark_reports_every_path(capsys):
    from igtcache.bench.daemon import main as bench_main

    assert bench_main(["--size", "8MiB", "--block-size", "1MiB", "--small-reads", "50", "--rounds", "1",
                       "--files", "12", "--file-size", "10KB", "--workers", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["short_circuit"]
    assert {(r["read"], r["path"]) for r in results["hits"]} == {
        (read, path) for read in ("aligned", "unaligned", "4 KiB")
        for path in ("local file", "attached", "socket", "embedded", "HTTP API")}
    assert all(r["rate"] > 0 for r in results["hits"] + results["cat_file"] + results["loader"]["rows"])
    assert {r["path"] for r in results["cat_file"]} == {"os.pread", "fsspec file://", "igtcache:: attached"}
    assert [r["path"] for r in results["loader"]["rows"]] == ["local directory", "igtcache:: attached"]
    assert results["daemon_cpu"]["us_per_socket_read"] > 0
    assert {r["path"] for r in results["misses"]} == {"s3fs alone", "attached", "embedded"}
    # The cold object once, the hot one once, each small file once: every hit hit.
    assert results["daemon_remote_bytes"] == 2 * (8 << 20) + 12 * 10_000


def test_trace_dir_records_every_read_for_the_replay(s3_server, tmp_path):
    from igtcache.bench.trace import load_trace

    fs = s3_server.filesystem()
    root = f"{BUCKET}/traced-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(f"{root}/x.bin", b"x" * (3 * BLOCK))
    args = ["--remote", f"t=s3://{root}", "--storage-options", json.dumps(s3_server.storage_options()),
            "--disk", "0", "--memory", "16MiB", "--block-size", str(BLOCK), "--trace-dir", str(tmp_path / "traces")]
    with DaemonProcess(tmp_path / "t.sock", args) as daemon:
        with DaemonClient(daemon.socket_path, "t", job="j1") as client:
            for offset in (0, BLOCK, 2 * BLOCK):
                client.read("x.bin", offset, 100)
        daemon.kill()  # the rows are on disk as they are read, not only after a clean stop
    rows = load_trace(tmp_path / "traces" / "t.csv")
    assert [(r.job, r.path, r.offset, r.size, r.object_size) for r in rows] == [
        ("j1", "x.bin", offset, 100, 3 * BLOCK) for offset in (0, BLOCK, 2 * BLOCK)
    ]
