"""One rule for a read's job (``igtcache.jobs``): the ``job`` argument, else ``$IGTCACHE_JOB``,
else the reading process's id; in the engine, through the daemon's client, and at the daemon
for requests that name none (the connected process's id)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from igtcache import Cache
from igtcache.daemon import protocol as P
from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import DaemonClient
from igtcache.jobs import resolve_job


def test_the_argument_wins_then_the_environment_then_the_process(monkeypatch):
    monkeypatch.delenv("IGTCACHE_JOB", raising=False)
    assert resolve_job(None) == resolve_job("") == str(os.getpid())
    monkeypatch.setenv("IGTCACHE_JOB", "from-env")
    assert resolve_job(None) == resolve_job("") == "from-env"
    assert resolve_job("explicit") == "explicit"


def test_the_engine_tags_reads_by_the_rule(tmp_path, monkeypatch):
    (tmp_path / "x.bin").write_bytes(b"x" * 100)
    cache = Cache(f"file://{tmp_path}", disk_bytes=0, memory_bytes=1 << 20)
    try:
        monkeypatch.delenv("IGTCACHE_JOB", raising=False)
        cache.read("x.bin", 0, 10)
        monkeypatch.setenv("IGTCACHE_JOB", "from-env")
        cache.read("x.bin", 0, 10)
        cache.read("x.bin", 0, 10, job="explicit")
        assert {job: c["reads"] for job, c in cache.stats()["jobs"].items()} == {
            str(os.getpid()): 1, "from-env": 1, "explicit": 1}
    finally:
        cache.close()


# ---------------------------------------------------------------------- through the daemon

@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    work = tmp_path_factory.mktemp("jobs")
    (work / "data").mkdir()
    (work / "data" / "x.bin").write_bytes(b"y" * 1000)
    with DaemonProcess(work / "d.sock", ["--remote", f"f=file://{work / 'data'}", "--disk", "0"]) as process:
        yield process


READER = textwrap.dedent("""
    import os, sys
    from igtcache.daemon_client import DaemonClient
    sock, job = sys.argv[1], sys.argv[2] or None
    with DaemonClient(sock, job=job) as client:
        assert client.read("x.bin", 0, 10) == b"y" * 10
    print(os.getpid())
""")


def _read_in_a_child(daemon, job: str = "", env_job: str | None = None) -> str:
    """Read once from a fresh process; its pid."""
    env = {k: v for k, v in os.environ.items() if k != "IGTCACHE_JOB"}
    if env_job is not None:
        env["IGTCACHE_JOB"] = env_job
    done = subprocess.run([sys.executable, "-c", READER, daemon.socket_path, job], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _jobs(daemon) -> dict[str, int]:
    with DaemonClient(daemon.socket_path) as client:
        return {job: c["reads"] for job, c in client.stats()["jobs"].items()}


def test_the_client_tags_reads_by_the_rule_through_the_daemon(daemon):
    plain = _read_in_a_child(daemon)
    _read_in_a_child(daemon, env_job="env-job")
    _read_in_a_child(daemon, job="explicit-job", env_job="env-job")
    jobs = _jobs(daemon)
    assert jobs[plain] == 1 and plain not in (str(os.getpid()), str(daemon.pid))  # the reader's own pid
    assert jobs["env-job"] == 1 and jobs["explicit-job"] == 1


def test_a_request_without_a_job_is_the_connected_process_s(daemon):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:  # binary, job left empty
        conn.settimeout(60)
        conn.connect(daemon.socket_path)
        conn.sendall(P.MAGIC + P.encode_read("f", "x.bin", 0, 5, "", None))
        reply = b""
        while len(reply) < len(P.MAGIC) + P.RESPONSE.size + 5 and (chunk := conn.recv(1 << 16)):
            reply += chunk
        assert reply == P.MAGIC + P.RESPONSE.pack(P.OK_BYTES, 5) + b"y" * 5
    assert _jobs(daemon).get(str(os.getpid())) == 1
    for target, job in [("/v1/remotes/f/read?path=x.bin&size=5", str(os.getpid())),
                        ("/v1/remotes/f/read?path=x.bin&size=5&job=http-job", "http-job")]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(60)
            conn.connect(daemon.socket_path)
            conn.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := conn.recv(1 << 16):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"y" * 5)
    jobs = _jobs(daemon)
    assert jobs[str(os.getpid())] == 2 and jobs["http-job"] == 1
