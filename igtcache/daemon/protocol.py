"""The daemon's binary wire protocol, shared by the server and ``DaemonClient``.

The daemon's socket speaks HTTP (aiohttp: curl, ``/metrics``, the stats
command) and this protocol, told apart by the first bytes of a connection: a
binary client opens with ``MAGIC``, the server answers ``MAGIC``, then frames
follow on the persistent connection, one response per request, in order. A
daemon that already serves its ``--max-connections`` answers ``BUSY`` instead,
then a UTF-8 message saying so, and closes the connection.

Request:  ``op`` (u8), payload length (u32), payload.
  - ``OP_READ`` payload: offset (u64), size (i64, -1 = to the end), then the
    lengths (u16 each) and UTF-8 bytes of remote, path, job and hint; an
    empty job is the connected process's (``igtcache.jobs.peer_job``).
  - ``OP_REPORT`` payload: hits a client served itself (``igtcache.hit_report``),
    up to ``MAX_REPORT`` bytes.
  - every other op: a JSON object of arguments. ``OP_READ_MANY``'s are
    ``remote``, ``job`` and ``reads``, a list of ``[path, offset, size]``.
Response: ``status`` (u8), body length (u64), body.
  - ``OK_BYTES``: the bytes read, as they are (the hit path copies no byte
    through JSON or base64); for ``OP_READ_MANY``, the length of each
    range's bytes (u64 each), then the bytes of every range in order.
  - ``OK_JSON``: a JSON value.
  - ``ERROR``: JSON ``{"error": wire name, "message": text}``, the wire
    name from ``igtcache.errors`` (the client raises the same type).

Everything is little-endian. A request the server cannot frame (unknown op,
payload over ``MAX_PAYLOAD``, a frame not finished within the daemon's
frame timeout) gets an ``ERROR`` and the connection is closed; any other bad
request gets an ``ERROR`` and the connection stays usable. A connection idle
between frames for the daemon's idle timeout is closed without a word
(``DaemonClient`` reconnects).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

# BadRequest, DaemonError and DaemonUnavailable are re-exported: they are this protocol's errors,
# defined with the rest of the error table.
from igtcache.errors import BadRequest, DaemonError, DaemonUnavailable, error_row, exception_from_wire
from igtcache.hit_report import MAX_REPORT

MAGIC = b"IGTCv1\r\n"
BUSY = b"IGTCbusy"  # as long as MAGIC
MAX_BUSY_MESSAGE = 1024
REQUEST = struct.Struct("<BI")
RESPONSE = struct.Struct("<BQ")
READ_ARGS = struct.Struct("<QqHHHH")
MAX_PAYLOAD = 64 << 10

OP_READ = 1
OP_INFO = 2
OP_LS = 3
OP_INVALIDATE = 4
OP_PREFETCH = 5
OP_STATS = 6
OP_HEALTH = 7
OP_REMOTES = 8
OP_REPORT = 9
OP_READ_MANY = 10
OP_RESIDENCY = 11
OPS = {
    OP_READ: "read", OP_INFO: "info", OP_LS: "ls", OP_INVALIDATE: "invalidate",
    OP_PREFETCH: "prefetch", OP_STATS: "stats", OP_HEALTH: "health", OP_REMOTES: "remotes",
    OP_REPORT: "report", OP_READ_MANY: "read_many", OP_RESIDENCY: "residency",
}
LENGTHS = struct.Struct("<Q")

_TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds

OK_BYTES = 0
OK_JSON = 1
ERROR = 2


def encode_read(remote: str, path: str, offset: int, size: int, job: str, hint: str | None) -> bytes:
    """A whole ``OP_READ`` request frame."""
    parts = [s.encode("utf-8", "surrogatepass") for s in (remote, path, job, hint or "")]
    args = READ_ARGS.pack(offset, size, *(len(p) for p in parts))
    payload_len = len(args) + sum(len(p) for p in parts)
    return b"".join([REQUEST.pack(OP_READ, payload_len), args, *parts])


def decode_read(payload: bytes) -> dict[str, Any]:
    """The arguments of an ``OP_READ`` payload; ``BadRequest`` if it is malformed."""
    try:
        offset, size, *lengths = READ_ARGS.unpack_from(payload)
    except struct.error:
        raise BadRequest("read request too short") from None
    if READ_ARGS.size + sum(lengths) != len(payload):
        raise BadRequest("read request lengths do not add up to its payload")
    fields, at = [], READ_ARGS.size
    for length in lengths:
        try:
            fields.append(payload[at:at + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest("read request strings must be UTF-8") from None
        at += length
    remote, path, job, hint = fields
    return {"remote": remote, "path": path, "offset": offset, "size": size, "job": job, "hint": hint or None}


def encode_json_request(op: int, args: dict[str, Any]) -> bytes:
    return encode_request(op, json.dumps(args).encode())


def encode_request(op: int, payload: bytes) -> bytes:
    """A whole request frame of ``op`` with ``payload``."""
    return REQUEST.pack(op, len(payload)) + payload


def max_payload(op: int) -> int:
    """The most payload bytes a request of ``op`` may carry."""
    return MAX_REPORT if op == OP_REPORT else MAX_PAYLOAD


def split_many(body: bytes, count: int) -> list[bytes]:
    """The bytes of each range of an ``OP_READ_MANY`` response of ``count`` ranges."""
    head = LENGTHS.size * count
    lengths = struct.unpack_from(f"<{count}Q", body) if count else ()
    if head + sum(lengths) != len(body):
        raise DaemonError(f"the daemon's answer to a read of {count} ranges does not add up")
    out, at = [], head
    for length in lengths:
        out.append(body[at:at + length])
        at += length
    return out


def decode_json(payload: bytes) -> dict[str, Any]:
    """A JSON object of arguments; ``BadRequest`` if it is anything else."""
    try:
        args = json.loads(payload) if payload else {}
    except (ValueError, RecursionError):  # RecursionError: arrays or objects nested too deep to parse
        raise BadRequest("request payload is not valid JSON") from None
    if not isinstance(args, dict):
        raise BadRequest("request payload must be a JSON object")
    return args


def error_body(exc: BaseException) -> bytes:
    """The JSON body of an ``ERROR`` response (and of an HTTP error): ``exc``'s wire name and message."""
    return json.dumps({"error": error_row(exc).wire, "message": str(exc)}).encode()


def raise_error(body: bytes) -> None:
    """Raise the exception an ``ERROR`` body describes, of the type the daemon raised."""
    try:
        err = json.loads(body)
        name, message = err["error"], err["message"]
    except (ValueError, KeyError, TypeError):
        raise DaemonError(f"malformed error response from the daemon: {body[:200]!r}") from None
    raise exception_from_wire(str(name), str(message))


def kernel_timeout(conn: socket.socket, option: int, seconds: float) -> None:
    """Bound each blocking receive (``SO_RCVTIMEO``) or send and connect (``SO_SNDTIMEO``) on ``conn``
    by ``seconds``: the call then fails with ``EAGAIN`` (``BlockingIOError``). Unlike a Python socket
    timeout, it costs no ``poll()`` per call."""
    micros = max(1, round(seconds * 1e6))  # a zero timeval would mean "never"
    conn.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(micros // 1_000_000, micros % 1_000_000))
