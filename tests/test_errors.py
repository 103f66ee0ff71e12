"""One error table (``igtcache.errors``): an engine error keeps its type through the daemon,
and gets its row's HTTP status from the HTTP API and its row's errno from the mount."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import urllib.parse
import uuid

import pytest

from igtcache import Cache, CacheDirInUse, RemoteError
from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import DaemonClient
from igtcache.disk_tier import DiskFull
from igtcache.errors import (
    INTERNAL, ROWS, BadRequest, DaemonError, DaemonUnavailable, InternalError, UnknownRemote, error_row,
    exception_from_wire,
)
from igtcache.local_s3 import free_port
from igtcache.remote import VersionChanged

from .conftest import BUCKET


class _NewRemoteFailure(RemoteError):
    """An engine error added after the table: it travels as its nearest ancestor with a row."""


@pytest.mark.parametrize("exc, wire, status, number", [
    (FileNotFoundError("x"), "FileNotFoundError", 404, errno.ENOENT),
    (IsADirectoryError("x"), "IsADirectoryError", 400, errno.EISDIR),
    (NotADirectoryError("x"), "NotADirectoryError", 400, errno.ENOTDIR),
    (PermissionError("x"), "PermissionError", 403, errno.EACCES),
    (ValueError("x"), "ValueError", 400, errno.EINVAL),
    (TypeError("x"), "TypeError", 400, errno.EINVAL),
    (asyncio.TimeoutError("x"), "TimeoutError", 504, errno.EIO),
    (RemoteError("x"), "RemoteError", 502, errno.EIO),
    (_NewRemoteFailure("x"), "RemoteError", 502, errno.EIO),
    (VersionChanged("x", "v1", "v2"), "VersionChanged", 409, errno.ESTALE),
    (DiskFull("x"), "DiskFull", 507, errno.ENOSPC),
    (CacheDirInUse("x"), "CacheDirInUse", 503, errno.EBUSY),
    (BadRequest("x"), "BadRequest", 400, errno.EINVAL),
    (UnknownRemote("x"), "UnknownRemote", 404, errno.ENOENT),
    (ConnectionRefusedError(errno.ECONNREFUSED, "x"), "OSError", 500, errno.EIO),
    (DaemonUnavailable("x"), "OSError", 500, errno.EIO),
    (KeyError("x"), "InternalError", 500, errno.EIO),
    (AssertionError("x"), "InternalError", 500, errno.EIO),
])
def test_each_error_has_one_row(exc, wire, status, number):
    row = error_row(exc)
    assert (row.wire, row.status, row.errno) == (wire, status, number)


def test_every_row_comes_back_from_its_wire_name_as_its_own_type():
    assert len({row.wire for row in ROWS}) == len({row.cls for row in ROWS}) == len(ROWS)
    for row in ROWS:
        exc = exception_from_wire(row.wire, "the message")
        assert type(exc) is row.cls and str(exc) == "the message" and exc.args == ("the message",)
        assert error_row(exc) is row
    assert error_row(InternalError("x")) is INTERNAL
    unknown = exception_from_wire("ErrorOfANewerDaemon", "what happened")
    assert type(unknown) is DaemonError and "ErrorOfANewerDaemon" in str(unknown)


# ---------------------------------------------------------------------- through a live daemon

@pytest.fixture(scope="module")
def served(s3_server, tmp_path_factory):
    """The same objects on S3 (``s3``) and in a directory (``f``), and a remote that is down (``down``)."""
    work = tmp_path_factory.mktemp("errors")
    root = f"{BUCKET}/errors-{uuid.uuid4().hex[:8]}"
    fs = s3_server.filesystem()
    local = work / "local"
    (local / "dir").mkdir(parents=True)
    for name in ("one.bin", "dir/two.bin"):
        fs.pipe_file(f"{root}/{name}", b"bytes of " + name.encode())
        (local / name).write_bytes(b"bytes of " + name.encode())
    down = {**s3_server.storage_options(), "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}", "region_name": "us-east-1"},
            "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    remotes = {"s3": (f"s3://{root}", s3_server.storage_options()), "f": (f"file://{local}", {}),
               "down": (f"s3://{BUCKET}/down", down)}
    (work / "igtcache.toml").write_text("".join(
        f'[remotes.{name}]\nurl = "{url}"\nstorage_options = {_toml(options)}\n'
        for name, (url, options) in remotes.items()))
    with DaemonProcess(work / "d.sock", ["--config", str(work / "igtcache.toml"), "--disk", "0"]) as daemon:
        daemon.remotes = remotes
        yield daemon


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def _http_get(sock: str, target: str) -> tuple[int, dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(60)
        conn.connect(sock)
        conn.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _raised(call) -> BaseException:
    with pytest.raises(Exception) as failure:
        call()
    return failure.value


CASES = [
    ("s3", "read", "missing.bin", FileNotFoundError),
    ("f", "read", "missing.bin", FileNotFoundError),
    ("s3", "info", "dir", IsADirectoryError),
    ("f", "read", "dir", IsADirectoryError),
    ("f", "info", "one.bin/x", NotADirectoryError),
    ("s3", "read", "../one.bin", ValueError),
    ("f", "ls", "a\x00b", ValueError),
    ("down", "read", "x.bin", RemoteError),
]


@pytest.mark.parametrize("remote, op, path, expected", CASES, ids=[f"{c[0]}-{c[1]}-{c[3].__name__}" for c in CASES])
def test_an_engine_error_keeps_its_type_status_and_errno_through_the_daemon(served, remote, op, path, expected):
    url, options = served.remotes[remote]
    engine = Cache(url, storage_options=options, disk_bytes=0, memory_bytes=1 << 20)
    try:
        in_process = _raised(lambda: getattr(engine, op)(path))
    finally:
        engine.close()
    assert type(in_process) is expected
    row = error_row(in_process)

    with DaemonClient(served.socket_path, remote) as client:
        assert type(_raised(lambda: getattr(client, op)(path))) is expected
        if expected is not ValueError:  # the mount refuses such names itself, before the backend
            mount = pytest.importorskip("igtcache.fuse.mount")
            ops = mount.CacheFS(client, ttl=0, context=lambda: (0, 0, 0))
            with pytest.raises(OSError) as failure:
                ops.open("/" + path, _OpenForReading())
            assert failure.value.errno == row.errno
    status, body = _http_get(served.socket_path,
                             f"/v1/remotes/{remote}/{op}?path={urllib.parse.quote(path, safe='')}")
    assert (status, body["error"]) == (row.status, row.wire)


class _OpenForReading:
    flags = 0  # O_RDONLY
    fh = direct_io = keep_cache = 0


def test_an_unknown_remote_is_its_own_error_on_both_protocols(served):
    from igtcache.daemon import protocol as P

    with pytest.raises(UnknownRemote, match="serves no remote 'nope'"):
        DaemonClient(served.socket_path, "nope")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(60)
        conn.connect(served.socket_path)
        conn.sendall(P.MAGIC + P.encode_read("nope", "one.bin", 0, 1, "j", None))
        replies = conn.makefile("rb")
        assert replies.read(len(P.MAGIC)) == P.MAGIC
        status, length = P.RESPONSE.unpack(replies.read(P.RESPONSE.size))
        assert status == P.ERROR
        with pytest.raises(UnknownRemote, match="unknown remote 'nope'"):
            P.raise_error(replies.read(length))
    assert _http_get(served.socket_path, "/v1/remotes/nope/info?path=one.bin")[0] == 404
