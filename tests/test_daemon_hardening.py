"""The daemon on a shared node, tried as a hostile local user and an unlucky operator would:
links planted at its lock file, sockets in directories others can write, impostors on the
socket, idle connections by the hundred, hung daemons, clients that never read, prefetches of
whole datasets, bad options and full disks. Real daemons on real sockets; tests that play
another user (``nobody``) or mount a file system run as root and are skipped otherwise."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import resource
import socket
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from igtcache.cli import main as cli_main
from igtcache.daemon import protocol as P
from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import (
    TIMEOUT_ENV, UID_ENV, DaemonClient, DaemonUnavailable, UntrustedDaemon, client_timeout,
)
from igtcache.errors import BadRequest
from igtcache.local_s3 import free_port

from .helpers import binary_connection

KiB, MiB = 1 << 10, 1 << 20
MEMORY_ONLY = ["--remote", "m=memory://igt-hardening", "--disk", "0", "--memory", "8MiB"]
NOBODY = pwd.getpwnam("nobody").pw_uid
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="plays another user or mounts a file system: needs root")


def _refused(sock: Path, args: list[str], **kwargs) -> str:
    """Run a daemon that must refuse to start; its log, checked to be one clear line (exit status 1)."""
    daemon = DaemonProcess(sock, args, **kwargs)
    try:
        status = daemon.run_to_exit(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        pytest.fail(f"the daemon started instead of refusing:\n{daemon.log()}")
    finally:
        log = daemon.log()
        Path(daemon.log_path).unlink(missing_ok=True)
    errors = [line for line in log.splitlines() if "INFO" not in line and "WARNING" not in line]
    assert status == 1 and "Traceback" not in log and len(errors) == 1, log
    return errors[0]


def _within(seconds: float, call: Callable[[], object]) -> object:
    """``call()``'s result or exception, failing the test if it has not returned within ``seconds``."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting after {seconds} s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * KiB for line in f if line.startswith("VmRSS:"))


def _http_status(path: str, request: bytes) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(path)
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# ---------------------------------------------------------------------- the lock file

def test_a_link_planted_at_the_lock_file_is_refused_and_its_target_left_alone(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / "d.sock.lock").symlink_to(victim)
    assert "is a symbolic link" in _refused(run / "d.sock", MEMORY_ONLY)
    assert victim.read_text() == "precious\n"
    (run / "d.sock.lock").unlink()
    os.link(victim, run / "d.sock.lock")  # a second name for the victim: truncating it would empty the victim
    assert "has 2 names" in _refused(run / "d.sock", MEMORY_ONLY)
    assert victim.read_text() == "precious\n"


@as_root
def test_a_lock_file_of_another_user_is_refused_and_a_fresh_one_is_private(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    lock = run / "d.sock.lock"
    lock.write_text("12345")
    os.chown(lock, NOBODY, NOBODY)
    assert "belongs to nobody" in _refused(run / "d.sock", MEMORY_ONLY)
    lock.unlink()
    with DaemonProcess(run / "d.sock", MEMORY_ONLY) as daemon:
        assert lock.read_text() == str(daemon.pid) and lock.stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------------- the socket's directory

@pytest.mark.parametrize("mode", [0o777, 0o770, 0o730])
def test_a_socket_directory_others_can_write_is_refused(tmp_path, mode):
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, mode)
    message = _refused(run / "d.sock", MEMORY_ONLY)
    assert f"socket directory {run} is writable by other users (mode {mode:04o})" in message
    assert "chmod go-w" in message and "sticky" in message
    assert not (run / "d.sock").exists()


def test_a_directory_above_that_others_can_write_is_refused_and_a_sticky_one_is_fine(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    (shared / "mine").mkdir(mode=0o700)
    message = _refused(shared / "mine" / "d.sock", MEMORY_ONLY)
    assert f"{shared} (above socket directory {shared / 'mine'}) is writable by other users" in message
    os.chmod(shared, 0o1777)  # sticky, like /tmp: no one may rename or remove what is not theirs
    with DaemonProcess(shared / "mine" / "d.sock", MEMORY_ONLY) as daemon:
        assert DaemonClient(daemon.socket_path).health()["pid"] == daemon.pid


@as_root
def test_a_sticky_directory_of_another_user_is_refused(tmp_path):
    run = tmp_path / "theirs"
    run.mkdir()
    os.chown(run, NOBODY, NOBODY)
    os.chmod(run, 0o1777)
    assert f"socket directory {run} belongs to nobody" in _refused(run / "d.sock", MEMORY_ONLY)


# ---------------------------------------------------------------------- an impostor on the socket

def _serve_as_impostor(listener: socket.socket, report: int) -> None:
    """What the impostor does: reports the first bytes of each connection on ``report``, then speaks
    the protocol, serving one remote (``memory://``) whose every read is ``b"impostor"``."""
    remotes = json.dumps([{"name": "m", "url": "memory://igt-impostor", "protocols": ["memory"], "root": "",
                           "identity": "memory://", "credentials": "sha256:0", "block_size": MiB,
                           "max_read": MiB}]).encode()
    while True:
        conn, _ = listener.accept()
        first = conn.recv(len(P.MAGIC), socket.MSG_WAITALL)
        os.write(report, len(first).to_bytes(1, "little") + first)
        if first != P.MAGIC:
            conn.close()
            continue
        conn.sendall(P.MAGIC)
        while header := conn.recv(P.REQUEST.size, socket.MSG_WAITALL):
            op, length = P.REQUEST.unpack(header)
            conn.recv(length, socket.MSG_WAITALL) if length else b""
            status, body = (P.OK_BYTES, b"impostor") if op == P.OP_READ else (P.OK_JSON, remotes)
            conn.sendall(P.RESPONSE.pack(status, len(body)) + body)
        conn.close()


@contextlib.contextmanager
def _impostor(directory: Path, uid: int) -> Iterator[tuple[str, Callable[[int], list[bytes]]]]:
    """A process running as ``uid`` that serves ``directory/d.sock`` as a daemon would; yields the
    socket's path and ``first_bytes(n)``: what each of its first ``n`` connections sent it first."""
    path = str(directory / "d.sock")
    ready_r, ready_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the impostor: no threads, no logging, nothing but sockets
        try:
            os.setgid(uid)
            os.setuid(uid)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(16)
            os.write(ready_w, b"ready")
            _serve_as_impostor(listener, report_w)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(report_w)
    report = os.fdopen(report_r, "rb", buffering=0)
    seen: list[bytes] = []
    try:
        assert os.read(ready_r, 5) == b"ready"

        def first_bytes(n: int) -> list[bytes]:
            while len(seen) < n:
                length = report.read(1)[0]
                seen.append(report.read(length) if length else b"")
            return seen

        yield path, first_bytes
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(ready_r)
        report.close()


@as_root
def test_clients_refuse_a_socket_served_by_another_user_unless_told_to_trust_it(monkeypatch, caplog):
    import fsspec

    monkeypatch.delenv(UID_ENV, raising=False)
    theirs = Path(tempfile.mkdtemp(prefix="igt-impostor-"))  # in /tmp: where nobody can reach it
    os.chown(theirs, NOBODY, NOBODY)
    with contextlib.ExitStack() as cleanup, _impostor(theirs, NOBODY) as (sock, first_bytes):
        cleanup.callback(shutil.rmtree, theirs)
        with pytest.raises(UntrustedDaemon, match=r"runs as nobody \(uid 65534\), not as root; .* nothing was sent"):
            DaemonClient(sock)
        assert first_bytes(1) == [b""]  # it connected and sent nothing at all

        # The fsspec plugin reads its own remote instead, and says why.
        memory = fsspec.filesystem("memory")
        memory.pipe_file("/igt-impostor/x.bin", b"the real bytes")
        caplog.set_level(logging.INFO, logger="igtcache.clients.fsspec_plugin")
        igt = fsspec.filesystem("igtcache", target_protocol="memory", socket=sock, skip_instance_cache=True)
        assert igt.cat_file("/igt-impostor/x.bin") == b"the real bytes"
        assert "runs as nobody" in caplog.text
        with pytest.raises(UntrustedDaemon):
            fsspec.filesystem("igtcache", target_protocol="memory", socket=sock, mode="attach",
                              skip_instance_cache=True).cat_file("/igt-impostor/x.bin")

        # Trusted by name or through the environment, it is talked to: the check is what protected.
        assert DaemonClient(sock, expected_uid="nobody").read("x.bin", 0, 8) == b"impostor"
        monkeypatch.setenv(UID_ENV, str(NOBODY))
        assert DaemonClient(sock).read("x.bin", 0, 8) == b"impostor"
        assert first_bytes(5) == [b"", b"", b"", P.MAGIC, P.MAGIC]  # the plugin's two looks sent nothing either


# ---------------------------------------------------------------------- connections and timeouts

def test_idle_connections_past_the_cap_are_turned_away_and_leave_the_daemon_its_descriptors(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    files = {f"f{i}.bin": os.urandom(1000 + i) for i in range(40)}
    for name, value in files.items():
        (data / name).write_bytes(value)
    args = ["--remote", f"f=file://{data}", "--disk", "0", "--memory", "8MiB", "--block-size", "64KiB"]

    def low_limit() -> None:  # a soft limit of 64 under a hard one of 256, as a login shell might leave it
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 256))

    with DaemonProcess(tmp_path / "d.sock", args, preexec=low_limit) as daemon:
        limits = Path(f"/proc/{daemon.pid}/limits").read_text()
        assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == [
            ["256", "256"]], "the soft limit is raised to the hard one"
        reader = DaemonClient(daemon.socket_path, "f")  # its one connection, made before the flood
        cap = reader.daemon_stats()["daemon"]["max_connections"]
        assert cap == 256 - 64  # what the limit leaves after the caches' share
        idle = [binary_connection(daemon.socket_path) for _ in range(cap - 1)]
        assert reader.daemon_stats()["daemon"]["connections"] == cap
        with pytest.raises(DaemonUnavailable, match=rf"already serves {cap} connections \(its --max-connections\)"):
            _within(30, lambda: DaemonClient(daemon.socket_path, timeout=20))
        status, body = _http_status(daemon.socket_path, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and "--max-connections" in json.loads(body)["message"]
        for name, value in files.items():  # cold reads open files: the daemon has descriptors for them
            assert reader.read(name) == value
        for conn in idle[:5]:
            conn.close()
        deadline = time.monotonic() + 30
        while reader.daemon_stats()["daemon"]["connections"] > cap - 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert DaemonClient(daemon.socket_path).health()["pid"] == daemon.pid
        for conn in idle[5:]:
            conn.close()
        assert "Traceback" not in daemon.log()


def test_max_connections_beyond_the_open_file_limit_is_refused(tmp_path):
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    message = _refused(tmp_path / "d.sock", [*MEMORY_ONLY, "--max-connections", "1000"], preexec=low_limit)
    assert "--max-connections 1000 needs 1064 open files" in message and "at most 192" in message


@pytest.fixture
def hung_daemon(tmp_path):
    """A socket whose process answers the handshake and then nothing, and one whose process never
    even accepts: ``(silent_after_handshake, never_accepts)``."""
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(8)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.bind(str(tmp_path / "stuck.sock"))
    stuck.listen(0)
    held = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = silent.accept()
                conn.recv(len(P.MAGIC), socket.MSG_WAITALL)
                conn.sendall(P.MAGIC)
                held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    yield str(tmp_path / "silent.sock"), str(tmp_path / "stuck.sock")
    silent.close()
    stuck.close()
    for conn in held:
        conn.close()


def test_a_hung_daemon_ends_in_daemon_unavailable_never_a_hang(hung_daemon, monkeypatch):
    silent, stuck = hung_daemon
    monkeypatch.setenv(TIMEOUT_ENV, "0.5")  # what the mount and the fsspec plugin go by
    with pytest.raises(DaemonUnavailable, match="did not answer: nothing for 0.5 s"):
        _within(30, lambda: DaemonClient(silent))
    for path in (silent, stuck):
        started = time.monotonic()
        with pytest.raises(DaemonUnavailable, match="nothing for 0.5 s"):
            _within(30, lambda: DaemonClient(path, timeout=0.5))
        assert time.monotonic() - started < 5
    monkeypatch.delenv(TIMEOUT_ENV)
    assert client_timeout() == 60
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="must be a number of seconds"):
        DaemonClient(silent)


# ---------------------------------------------------------------------- response memory and prefetch

BIG, STALLED, INFLIGHT = 24 * MiB, 8, 48 * MiB


@pytest.fixture
def big_objects_daemon(tmp_path):
    """A daemon serving eight 24 MiB files with an 8 MiB memory tier, responses bounded to 48 MiB in
    flight, stalled clients cut after 4 s."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(STALLED):
        (data / f"big{i}.bin").write_bytes(os.urandom(BIG))
    args = ["--remote", f"f=file://{data}", "--disk", "0", "--memory", "8MiB", "--block-size", "4MiB",
            "--max-read", "24MiB", "--max-inflight", "48MiB", "--idle-timeout", "4", "--frame-timeout", "2"]
    with DaemonProcess(tmp_path / "d.sock", args) as daemon:
        daemon.data = (data / "big0.bin").read_bytes()
        yield daemon


def _stall_binary(path: str, i: int) -> socket.socket:
    conn = binary_connection(path)
    conn.sendall(P.encode_read("f", f"big{i}.bin", 0, BIG, "stalled", None))
    return conn


def _stall_http(path: str, i: int) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    conn.sendall(b"GET /v1/remotes/f/read?path=big%d.bin&size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (i, BIG))
    return conn


@pytest.mark.parametrize("stall", [_stall_binary, _stall_http], ids=["binary", "http"])
def test_clients_that_never_read_hold_no_more_than_the_inflight_budget(big_objects_daemon, stall):
    daemon = big_objects_daemon
    with DaemonClient(daemon.socket_path, "f") as client:
        assert client.read("big0.bin") == daemon.data  # warm: the first answer's buffers are the baseline
        before = _rss(daemon.pid)
        stalled = [stall(daemon.socket_path, i) for i in range(STALLED)]  # each its own object: no bytes shared
        peak, deadline = before, time.monotonic() + 3
        while time.monotonic() < deadline:
            peak = max(peak, _rss(daemon.pid))
            assert client.daemon_stats()["daemon"]["inflight_bytes"] <= INFLIGHT
            time.sleep(0.1)
        # Without the budget: each client's 24 MiB, 192 MiB in all (and more over HTTP, which joined them).
        assert peak - before < INFLIGHT + 40 * MiB, (before >> 20, peak >> 20)
        # Meanwhile a read finds no room and is told to retry; stalled clients are cut after the idle
        # timeout, and then it gets its room again.
        deadline = time.monotonic() + 60
        while True:
            try:
                assert client.read("big0.bin") == daemon.data
                break
            except TimeoutError as exc:
                assert "--max-inflight" in str(exc) and time.monotonic() < deadline
        for conn in stalled:
            conn.close()
    assert "Traceback" not in daemon.log()


def test_a_prefetch_is_bounded_by_max_read_like_a_read(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "big.bin").write_bytes(b"x" * (8 * MiB))
    args = ["--remote", f"f=file://{data}", "--disk", "0", "--memory", "16MiB", "--block-size", "1MiB",
            "--max-read", "2MiB"]
    with DaemonProcess(tmp_path / "d.sock", args) as daemon, DaemonClient(daemon.socket_path, "f") as client:
        with pytest.raises(BadRequest, match="prefetch of 8388608 bytes is more than this daemon's --max-read"):
            client.prefetch("big.bin")
        with pytest.raises(BadRequest, match="--max-read"):
            client.prefetch("big.bin", 0, 3 * MiB)
        assert client.prefetch("big.bin", 0, 2 * MiB) == 2
        deadline = time.monotonic() + 30
        while client.stats()["remote_bytes"] < 2 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.stats()["remote_bytes"] == 2 * MiB


# ---------------------------------------------------------------------- options and start-time failures

@pytest.mark.parametrize("argv, message", [
    (["--block-size", "1"], "give a multiple of 4KiB from 4KiB to 64MiB"),
    (["--block-size", "5000"], "give a multiple of 4KiB from 4KiB to 64MiB"),
    (["--block-size", "128MiB"], "give a multiple of 4KiB from 4KiB to 64MiB"),
    (["--max-read", "1"], "give 64KiB to 4GiB"),
    (["--max-read", "8MiB", "--max-inflight", "4MiB"], "must be at least --max-read"),
    (["--metrics-port", "99999"], "--metrics-port must be a TCP port from 1 to 65535"),
    (["--metrics-port", "0"], "--metrics-port must be a TCP port from 1 to 65535"),
    (["--ttl", "nan"], "--ttl must be a number of seconds, 0 or more"),
    (["--ttl", "-1"], "--ttl must be a number of seconds, 0 or more"),
    (["--grace", "inf"], "--grace must be a number of seconds from 0 to 86400"),
    (["--idle-timeout", "0"], "--idle-timeout and --frame-timeout must be positive"),
    (["--max-connections", "0"], "--max-connections must be 1 or more"),
    (["--socket", "/tmp/" + "s" * 120], "--socket must be a path of 1 to 107 bytes"),
    (["--socket-group", "no-such-group-igt"], "no such group on this machine"),
    (["--cluster", "http://127.0.0.1:1"], "must start with redis:// or rediss://"),
])
def test_bad_options_are_usage_errors_that_say_what_is_allowed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["serve", "--remote", "memory://igt-options", "--disk", "0", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err, argv


def test_budgets_and_ports_the_machine_cannot_honour_are_one_line_errors(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    file_remote = ["--remote", f"f=file://{data}", "--cache-dir", str(tmp_path / "cache")]
    sock = tmp_path / "run" / "d.sock"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in _refused(
            sock, [*MEMORY_ONLY, "--metrics-port", str(port)])
    assert "choose another --metrics-host" in _refused(
        sock, [*MEMORY_ONLY, "--metrics-host", "203.0.113.1", "--metrics-port", str(free_port())])
    assert "--memory 1 PiB is more than this machine's RAM" in _refused(sock, [*MEMORY_ONLY, "--memory", "1PiB"])
    assert "is more than its whole file system" in _refused(sock, [*file_remote, "--disk", "1PiB"])
    assert not sock.exists()


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 4 MiB tmpfs with 1 MiB left."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        (where / "filler").write_bytes(b"\0" * (3 * MiB))
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@as_root
def test_a_full_disk_at_start_is_a_one_line_error(tmp_path, full_tmpfs):
    data = tmp_path / "data"
    data.mkdir()
    small = full_tmpfs
    with contextlib.suppress(OSError):  # fill what is left
        with open(small / "rest", "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    remote = ["--remote", f"f=file://{data}"]
    assert "No space left on device" in _refused(tmp_path / "d.sock", [*remote, "--cache-dir", str(small / "c"),
                                                                       "--disk", "1MiB"])
    assert "No space left on device" in _refused(small / "d.sock", [*remote, "--disk", "0"])
    (small / "rest").unlink()  # 1 MiB free again: a disk tier larger than that starts, with a warning
    with DaemonProcess(tmp_path / "d.sock", [*remote, "--cache-dir", str(small / "c"), "--disk", "2MiB"]) as daemon:
        assert "--disk 2 MiB for" in daemon.log() and "is more than the" in daemon.log()
