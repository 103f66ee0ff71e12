"""Random and malformed input against a live daemon, over its binary protocol and its HTTP API.

Every bad request must get a clear error (a known wire name, never an internal
error) or cost only its own connection; meanwhile a well-behaved client keeps
reading correct bytes, the daemon's memory stays within a bound, and a
connection that stops in the middle of a request holds no thread past the
daemon's timeouts. Hypothesis runs derandomized, so CI sees the same examples.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igtcache.daemon import protocol as P
from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import DaemonClient
from igtcache.errors import INTERNAL, ROWS

from .conftest import BUCKET
from .helpers import binary_connection, unix_connection

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB
MAX_READ = 512 * KiB
IDLE_TIMEOUT, FRAME_TIMEOUT = 3.0, 1.0
RSS_GROWTH_BOUND = 16 * MiB  # a fuzz run's allowance: ~40 KiB leaked per request over its few hundred exceeds it
WIRE_NAMES = {row.wire for row in ROWS} - {INTERNAL.wire}
REMOTES = ("s3", "f")
OBJECTS = {
    "one.bin": b"1",
    "small.bin": bytes(range(256)) * 400,
    "blocks.bin": bytes((i * 7) % 251 for i in range(3 * BLOCK + 123)),
    "dir/nested.bin": bytes((i * 13) % 241 for i in range(300 * KiB)),
    "empty.bin": b"",
}

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@pytest.fixture(scope="module")
def daemon(s3_server, tmp_path_factory):
    """A daemon serving the same objects from S3 (``s3``) and a local directory (``f``), with short timeouts."""
    work = tmp_path_factory.mktemp("fuzz")
    fs = s3_server.filesystem()
    root = f"{BUCKET}/fuzz-{uuid.uuid4().hex[:8]}"
    local = work / "local"
    for name, data in OBJECTS.items():
        fs.pipe_file(f"{root}/{name}", data)
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    (work / "igtcache.toml").write_text(
        f'[remotes.s3]\nurl = "s3://{root}"\nstorage_options = {_toml(s3_server.storage_options())}\n'
        f'[remotes.f]\nurl = "file://{local}"\n')
    args = ["--config", str(work / "igtcache.toml"), "--cache-dir", str(work / "cache"),
            "--memory", "8MiB", "--disk", "32MiB", "--block-size", str(BLOCK), "--max-read", str(MAX_READ),
            "--idle-timeout", str(IDLE_TIMEOUT), "--frame-timeout", str(FRAME_TIMEOUT),
            "--trace-dir", str(work / "traces")]  # every accepted read's job, path and hint also reach a file
    with DaemonProcess(work / "d.sock", args) as process:
        with DaemonClient(process.socket_path, short_circuit=False) as client:
            for remote in REMOTES:  # every object cached: later reads add no cached bytes
                for name, data in OBJECTS.items():
                    assert client.for_remote(remote).read(name) == data
        yield process


# ---------------------------------------------------------------------- the daemon, observed from outside

def _proc_status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _rss(pid: int) -> int:
    return _proc_status(pid, "VmRSS") * KiB


def _well_behaved_read(daemon, remote: str, name: str, offset: int, size: int) -> None:
    """A normal client still gets exactly the right bytes and the daemon's stats and metrics (which
    show every job and stream the bad requests left behind), from the same daemon process."""
    assert daemon.process.poll() is None, daemon.log()
    # Over the socket only: this module counts the daemon's connections and threads, and a
    # short-circuit client's hit reports would keep a connection of their own.
    with DaemonClient(daemon.socket_path, remote, job="well-behaved", short_circuit=False) as client:
        assert client.read(name, offset, size) == OBJECTS[name][offset:offset + size]
        assert client.daemon_stats()["daemon"]["pid"] == daemon.pid
    status, _headers, body = _http_exchange(daemon, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and b"igtcache_up 1" in body, body[:300]


def _no_internal_errors(daemon) -> None:
    log = daemon.log()
    assert "Traceback" not in log, log[-4000:]


def _expected_read(remote, path, offset, size, job, hint) -> bytes | str:
    """What a read must return: the bytes, or the wire name of the error it must get ("": any)."""
    if not all(_is_utf8(text) for text in (remote, path, job, hint)):
        return "BadRequest"
    if remote not in REMOTES:
        return "UnknownRemote"
    if "\x00" in path or ".." in path.split("/"):
        return "ValueError"
    if not (0 <= offset < 1 << 63 and -1 <= size < 1 << 63) or len(job) > 256 or len(hint) > 64:
        return "BadRequest"
    name = "/".join(part for part in path.split("/") if part not in ("", "."))
    if name not in OBJECTS:
        return ""  # not found, a directory, a name the remote refuses: any clear error
    data = OBJECTS[name]
    want = max(0, len(data) - offset) if size == -1 else size
    if want > MAX_READ:
        return "BadRequest"
    return data[offset:offset + want]


# ---------------------------------------------------------------------- strategies

def _weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each picked in proportion to its weight."""
    return st.sampled_from([strategy for weight, strategy in choices for _ in range(weight)]).flatmap(lambda s: s)


_names = st.sampled_from(sorted(OBJECTS))
_weird_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates: not UTF-8 on the wire
_paths = _weighted(
    (6, _names),
    (1, _names.map(lambda n: "/" + n)),
    (1, _names.map(lambda n: "./" + n.replace("/", "//"))),
    (1, _names.map(lambda n: "../" + n)),
    (1, _names.map(lambda n: "dir/../" + n)),
    (3, st.sampled_from(["", "/", ".", "..", "dir", "dir/", "missing.bin", "/etc/passwd", "../../etc/passwd",
                         "one.bin/x", "a\x00b", "one.bin\x00", "x" * 300, "/".join(["d" * 200] * 6),
                         "dir/" + "n" * 256])),
    (2, _weird_text),
)
_offsets = _weighted((6, st.integers(0, 4 * BLOCK)), (1, st.integers(0, (1 << 64) - 1)),
                     (1, st.sampled_from([BLOCK - 1, BLOCK, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])))
_sizes = _weighted((6, st.integers(-1, 2 * BLOCK)), (1, st.integers(-(1 << 63), (1 << 63) - 1)),
                   (1, st.sampled_from([MAX_READ, MAX_READ + 1, -2, -(1 << 63), (1 << 63) - 1])))
_remotes = _weighted((8, st.sampled_from(REMOTES)), (1, st.sampled_from(["", "nope", "S3", "f/..", "s3\x00"])),
                     (1, _weird_text))
_jobs = _weighted((6, st.sampled_from(["", "job-1"])), (1, st.just("j" * 257)), (2, _weird_text))
_hints = _weighted((6, st.sampled_from(["", "sequential", "random"])), (1, st.just("h" * 65)), (2, _weird_text))
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | _weird_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_weird_text, inner, max_size=4),
    max_leaves=12,
)


def _is_utf8(text: str) -> bool:
    """Whether ``text`` has a UTF-8 encoding (no lone surrogate), as every string on the wire must."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def _read_frames(draw):
    args = draw(_remotes), draw(_paths), draw(_offsets), draw(_sizes), draw(_jobs), draw(_hints)
    return "answered", P.encode_read(*args), _expected_read(*args)


@st.composite
def _raw_read_frames(draw):
    lengths = draw(st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4))
    offset, size = draw(st.integers(0, (1 << 64) - 1)), draw(st.integers(-(1 << 63), (1 << 63) - 1))
    payload = P.READ_ARGS.pack(offset, size, *lengths) + draw(st.binary(max_size=200))
    payload = payload[:draw(st.integers(0, len(payload)))]
    return "answered", P.REQUEST.pack(P.OP_READ, len(payload)) + payload, None


@st.composite
def _json_frames(draw):
    op = draw(st.sampled_from([op for op in P.OPS if op != P.OP_READ]))
    args = draw(st.fixed_dictionaries({
        "remote": _weighted((4, _remotes), (1, _json)), "path": _weighted((4, _paths), (1, _json)),
        "offset": _weighted((4, _offsets), (1, _json)), "size": _weighted((4, _sizes), (1, _json)),
    }))
    for key in draw(st.sets(st.sampled_from(sorted(args)))):  # some left out
        del args[key]
    args.update(draw(st.dictionaries(_weird_text, _json, max_size=2)))
    payload = draw(_weighted(
        (8, st.just(json.dumps(args).encode())),
        (1, st.binary(max_size=300)),  # not JSON, not UTF-8
        (1, st.integers(1, 60_000).map(lambda depth: b"[" * depth)),  # nested past any parser's recursion limit
        (1, st.integers(1, 13_000).map(lambda depth: b'{"a":' * depth)),
    ))
    return "answered", P.REQUEST.pack(op, len(payload)) + payload, None


_unframeable = st.one_of(
    st.tuples(st.integers(0, 255).filter(lambda op: op not in P.OPS), st.integers(0, 100)),
    st.sampled_from(sorted(P.OPS)).flatmap(
        lambda op: st.tuples(st.just(op), st.integers(P.max_payload(op) + 1, (1 << 32) - 1))),
).map(lambda t: ("refused", P.REQUEST.pack(*t) + b"x" * min(t[1], 100), None))


@st.composite
def _truncated(draw):
    _kind, frame, _expected = draw(st.one_of(_read_frames(), _json_frames()))
    return "truncated", frame[:draw(st.integers(1, len(frame) - 1))], None


_frames = _weighted((8, _read_frames()), (2, _raw_read_frames()), (6, _json_frames()), (1, _unframeable),
                    (1, _truncated()))
_good_reads = st.tuples(st.sampled_from(REMOTES), _names, st.integers(0, 2 * BLOCK), st.integers(0, 2 * BLOCK))


# ---------------------------------------------------------------------- binary protocol

def _recv_exact(conn: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer if the daemon closes the connection first."""
    data = b""
    while len(data) < n and (chunk := conn.recv(n - len(data))):
        data += chunk
    return data


def _response(conn: socket.socket) -> tuple[int, bytes] | None:
    """The next response, or ``None`` if the daemon closed the connection instead."""
    try:
        head = _recv_exact(conn, P.RESPONSE.size)
    except ConnectionResetError:
        return None
    if not head:
        return None
    status, length = P.RESPONSE.unpack(head)
    assert status in (P.OK_BYTES, P.OK_JSON, P.ERROR) and length <= MAX_READ + (1 << 20), (status, length)
    body = _recv_exact(conn, length)
    assert len(body) == length, f"the daemon closed the connection mid-response ({len(body)} of {length} bytes)"
    return status, body


def _error_name(body: bytes) -> str:
    error = json.loads(body)
    assert isinstance(error["message"], str) and error["error"] in WIRE_NAMES, error
    return error["error"]


def _closed(conn: socket.socket) -> bool:
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def _check_answer(frame: bytes, expected: bytes | str | None, answer: tuple[int, bytes] | None) -> None:
    """``answer`` is what ``expected`` says (``None``: any well-formed answer that is no internal error)."""
    assert answer is not None, f"the daemon hung up on an answerable request {frame[:60]!r}"
    status, body = answer
    if status == P.ERROR:
        name = _error_name(body)
        assert not isinstance(expected, bytes), (frame[:60], body)
        assert not expected or name == expected, (frame[:60], expected, body)
    elif status == P.OK_JSON:
        json.loads(body)
    else:
        assert expected is None or body == expected, (frame[:60], expected, len(body))


@FUZZ
@given(frames=st.lists(_frames, min_size=1, max_size=6), good=_good_reads)
def _fuzz_binary(daemon, frames, good) -> None:
    with binary_connection(daemon.socket_path) as conn:
        for kind, frame, expected in frames:
            conn.sendall(frame)
            if kind == "truncated":
                conn.shutdown(socket.SHUT_WR)  # the client gave up mid-frame: the daemon drops the connection
                assert _closed(conn)
                break
            answer = _response(conn)
            if kind == "refused":
                assert answer is not None and answer[0] == P.ERROR and _error_name(answer[1]) == "BadRequest"
                assert _closed(conn)
                break
            _check_answer(frame, expected, answer)
    _well_behaved_read(daemon, *good)


def test_random_and_malformed_binary_frames_get_clear_errors(daemon):
    before = _rss(daemon.pid)
    _fuzz_binary(daemon)
    grown = _rss(daemon.pid) - before
    assert grown < RSS_GROWTH_BOUND, f"RSS grew by {grown / MiB:.1f} MiB"
    _no_internal_errors(daemon)


# ---------------------------------------------------------------------- HTTP API

_OPS = {"read": "GET", "info": "GET", "ls": "GET", "stats": "GET", "invalidate": "POST", "prefetch": "POST"}
_query_values = _weighted(
    (4, _paths.map(lambda t: urllib.parse.quote(t, safe="/", errors="surrogatepass"))),
    (2, st.integers(-(1 << 70), 1 << 70).map(str)),
    (2, st.sampled_from(["", "-1", "0", "1e3", "0x10", "+5", "%ff", "%00", "%zz", "a%2F..%2F..%2Fetc", "\u00e9"])),
    (1, st.binary(max_size=20).map(lambda b: urllib.parse.quote_from_bytes(b, safe=""))),
)


@st.composite
def _http_requests(draw):
    """A raw HTTP request, and what it must be answered with: the bytes, an error's wire name,
    or ``None`` for any clear answer."""
    if draw(st.integers(0, 19)) == 0:  # not a request line at all
        line = draw(st.binary(min_size=1, max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b))
        return line + b"\r\nHost: x\r\nConnection: close\r\n\r\n", None
    op = draw(_weighted((6, st.just("read")), (4, st.sampled_from(sorted(_OPS))), (1, st.sampled_from(["", "x"]))))
    method = draw(_weighted((9, st.just(_OPS.get(op, "GET"))), (1, st.sampled_from(["PUT", "DELETE", "BREW"]))))
    remote = draw(_remotes)
    fields = {"path": draw(_names), "offset": draw(st.integers(0, 3 * BLOCK)), "size": draw(st.integers(-1, BLOCK))}
    clean = draw(st.booleans())
    if clean:
        query = urllib.parse.urlencode(fields)
    else:
        params = draw(st.lists(st.tuples(st.sampled_from(["path", "offset", "size", "job", "hint", "x"]),
                                         _query_values), max_size=5))
        query = "&".join(f"{k}={v}" for k, v in params)
    job = draw(st.sampled_from(["", "fuzz", "j" * 300]))
    headers = f"X-Igtcache-Job: {job}\r\n" if job else ""
    target = f"/v1/remotes/{urllib.parse.quote(remote, safe='', errors='surrogatepass')}/{op}?{query}"
    expected = None
    if clean and method == "GET" and op == "read" and remote in REMOTES:
        expected = _expected_read(remote, fields["path"], fields["offset"], fields["size"], job, "")
    request = f"{method} {target} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
    return request.encode(), expected


def _http_exchange(daemon, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with unix_connection(daemon.socket_path) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), data[:200]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@FUZZ
@given(requests=st.lists(_http_requests(), min_size=1, max_size=4), good=_good_reads)
def _fuzz_http(daemon, requests, good) -> None:
    for request, expected in requests:
        status, headers, body = _http_exchange(daemon, request)
        assert 200 <= status < 500, (request[:200], status, body[:300])
        if headers.get("content-type", "").startswith("application/json") and status >= 400:
            _error_name(body)
        if isinstance(expected, bytes):
            assert status == 200 and body == expected, (request[:200], status, body[:300])
        elif expected:
            assert status >= 400 and json.loads(body)["error"] == expected, (request[:200], body[:300])
    _well_behaved_read(daemon, *good)


def test_random_and_malformed_http_requests_get_clear_errors(daemon):
    before = _rss(daemon.pid)
    _fuzz_http(daemon)
    grown = _rss(daemon.pid) - before
    assert grown < RSS_GROWTH_BOUND, f"RSS grew by {grown / MiB:.1f} MiB"
    _no_internal_errors(daemon)


# ---------------------------------------------------------------------- connections that never finish

def test_connections_that_never_finish_a_frame_are_closed_and_do_not_block_others(daemon):
    for name in sorted(OBJECTS):  # what is read meanwhile below, fetched now: its pools' threads are counted
        _well_behaved_read(daemon, "f", name, 0, 1000)
    _well_behaved_read(daemon, "s3", "small.bin", 0, 100)
    threads_before = _proc_status(daemon.pid, "Threads")
    read = P.encode_read("f", "small.bin", 0, 10, "stuck", None)
    half_open = {
        "silent": b"",
        "half a handshake": P.MAGIC[:3],
        "idle after the handshake": P.MAGIC,
        "half a header": P.MAGIC + read[:3],
        "header, no payload": P.MAGIC + read[:P.REQUEST.size],
        "half a payload": P.MAGIC + read[:-4],
        "half an HTTP request line": b"GET /v1/remotes/f/read?path=sm",
        "HTTP headers never ended": b"GET /v1/stats HTTP/1.1\r\nHost: x\r\n",
    }
    conns = {}
    for name, sent in half_open.items():
        conn = unix_connection(daemon.socket_path)
        conn.sendall(sent)
        conns[name] = conn
    started = time.monotonic()
    for name in sorted(OBJECTS):  # served meanwhile, over both protocols
        _well_behaved_read(daemon, "f", name, 0, 1000)
    with unix_connection(daemon.socket_path) as http:
        http.sendall(b"GET /v1/remotes/s3/read?path=small.bin&size=100 HTTP/1.1\r\n"
                     b"Host: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := http.recv(1 << 16):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(OBJECTS["small.bin"][:100])
    assert _proc_status(daemon.pid, "Threads") >= threads_before + 4  # the binary ones each hold a thread now

    bound = IDLE_TIMEOUT + FRAME_TIMEOUT + 5  # the handshake, then one timeout, plus slack for a loaded machine
    for name, conn in conns.items():
        conn.settimeout(max(0.1, started + bound - time.monotonic()))
        try:
            answer = conn.recv(1 << 16)
            if answer.startswith(P.MAGIC):
                answer = answer[len(P.MAGIC):] or conn.recv(1 << 16)
            if answer and answer[0] == P.ERROR:  # an unfinished binary frame is named before the hang-up
                assert b"not whole within" in answer, answer
                answer = conn.recv(1 << 16)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), (name, answer)
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(f"{name}: still open {bound:.0f} s later")
        finally:
            conn.close()
    deadline = time.monotonic() + 10
    while _proc_status(daemon.pid, "Threads") > threads_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _proc_status(daemon.pid, "Threads") <= threads_before
    with DaemonClient(daemon.socket_path, short_circuit=False) as client:
        while client.daemon_stats()["daemon"]["connections"] > 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # a connection a client just closed may take a moment to be noticed
        assert client.daemon_stats()["daemon"]["connections"] == 1  # this one
    _well_behaved_read(daemon, "s3", "blocks.bin", BLOCK - 5, 10)


def _drain(conn: socket.socket) -> int:
    """Bytes left to read on ``conn`` until the daemon closes it."""
    conn.settimeout(30)
    received = 0
    try:
        while chunk := conn.recv(1 << 16):
            received += len(chunk)
    except ConnectionResetError:
        pass
    return received


def test_clients_that_never_read_their_answers_are_cut(daemon):
    threads_before = _proc_status(daemon.pid, "Threads")
    name = "dir/nested.bin"
    asked = 4 * len(OBJECTS[name])  # several times what a socket buffers
    binary = binary_connection(daemon.socket_path)
    binary.sendall(P.encode_read("f", name, 0, -1, "never-reads", None) * 4)
    http = unix_connection(daemon.socket_path)
    http.sendall(f"GET /v1/remotes/f/read?path={name} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * 4)
    started = time.monotonic()
    _well_behaved_read(daemon, "s3", name, 5, 2 * BLOCK)  # served meanwhile

    deadline = time.monotonic() + 2 * IDLE_TIMEOUT + 5
    while _proc_status(daemon.pid, "Threads") > threads_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _proc_status(daemon.pid, "Threads") <= threads_before, "a thread still waits on a client that never reads"
    time.sleep(max(0.0, started + IDLE_TIMEOUT + 2 - time.monotonic()))  # the HTTP one is cut by then too
    for conn in (binary, http):
        with conn:
            assert _drain(conn) < asked, "the daemon held the answers until the client read them"
    _well_behaved_read(daemon, "f", name, 0, 10)
