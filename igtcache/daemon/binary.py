"""Serving the binary protocol (``protocol.py``) on one connection, in its own thread.

A thread per connection keeps the hit path short: a read goes from the
socket to ``Cache.read_pieces`` and back with no event-loop hand-off, and the
bytes leave through one ``sendmsg`` of the header and the cached blocks
themselves (views of them where a read starts or ends inside a block).

No connection holds its thread forever: one idle between requests for
``Timeouts.idle`` is closed, and so is one whose request, once its first
byte has arrived, is not whole within ``Timeouts.frame`` (after an error
response saying so), or whose client takes nothing of a response for
``Timeouts.idle``. The socket stays blocking, bounded by the kernel's
``SO_RCVTIMEO``/``SO_SNDTIMEO``: a Python socket timeout would add a
``poll()`` to every receive and send of the hit path.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass

from igtcache.daemon.protocol import (
    ERROR, OK_BYTES, OK_JSON, OP_READ, OP_READ_MANY, OP_REPORT, OPS, REQUEST, RESPONSE, BadRequest,
    decode_json, decode_read, error_body, kernel_timeout, max_payload,
)
from igtcache.daemon.service import Service
from igtcache.errors import INTERNAL, error_row
from igtcache.jobs import peer_job

log = logging.getLogger(__name__)

#: Most pieces one ``sendmsg`` gathers (the kernel's IOV_MAX is 1024); a read of more is joined first.
MAX_GATHER = 512


@dataclass(frozen=True)
class Timeouts:
    """Seconds a connection may sit idle (between requests, or not reading a response), and a
    request may take from its first byte to its last."""

    idle: float
    frame: float


class _Unfinished(Exception):
    """A request's first byte arrived, its last did not in time."""


def serve_connection(conn: socket.socket, service: Service, timeouts: Timeouts) -> None:
    """Answer requests until the client closes the connection, idles or stalls past ``timeouts``,
    or the daemon shuts the connection's reading side."""
    conn.settimeout(None)
    kernel_timeout(conn, socket.SO_RCVTIMEO, timeouts.idle)
    kernel_timeout(conn, socket.SO_SNDTIMEO, timeouts.idle)
    header = bytearray(REQUEST.size)
    job = peer_job(conn)
    try:
        while True:
            try:
                request = _next_request(conn, header, timeouts)
            except (BadRequest, _Unfinished) as exc:
                # The stream cannot be re-synchronized after a frame we cannot size or finish: answer, hang up.
                error = exc if isinstance(exc, BadRequest) else BadRequest(
                    f"request not whole within {timeouts.frame:g} s; closing the connection")
                service.count("malformed", error)
                _send(conn, ERROR, error_body(error))
                return
            if request is None:
                return
            op, payload = request
            name = OPS[op]
            try:
                if op == OP_READ:
                    reply = service.read(**decode_read(bytes(payload)), peer_job=job)
                elif op == OP_READ_MANY:
                    reply = service.read_many(decode_json(bytes(payload)), peer_job=job)
                elif op == OP_REPORT:
                    body = json.dumps(service.report(payload)).encode()
                else:
                    body = json.dumps(service.call(name, decode_json(bytes(payload)))).encode()
            except Exception as exc:  # noqa: BLE001 - every failure becomes an error response
                service.count(name, exc)
                if error_row(exc) is INTERNAL:
                    log.exception("%s failed", name)
                _send(conn, ERROR, error_body(exc))
                continue
            service.count(name)
            if op in (OP_READ, OP_READ_MANY):
                with reply:  # its bytes count against the response budget until they have left
                    _send(conn, OK_BYTES, reply.pieces)
            else:
                _send(conn, OK_JSON, body)
    except OSError:
        pass  # the client went away or stopped reading (SO_SNDTIMEO), or the daemon is shutting it down


def _next_request(conn: socket.socket, header: bytearray, timeouts: Timeouts) -> tuple[int, bytearray] | None:
    """The next request's operation and payload (``header`` is scratch space); ``None`` when the
    client closed the connection or left it idle. ``BadRequest`` for a frame that cannot be sized,
    ``_Unfinished`` for one that stalls."""
    try:
        got = conn.recv_into(header)
    except BlockingIOError:  # SO_RCVTIMEO: idle
        return None
    if got == 0:
        return None
    deadline = time.monotonic() + timeouts.frame
    if not _fill(conn, memoryview(header)[got:], deadline, timeouts):
        return None
    op, length = REQUEST.unpack(header)
    if op not in OPS:
        raise BadRequest(f"unknown operation {op}")
    if length > max_payload(op):
        raise BadRequest(f"request payload of {length} bytes is over the limit of {max_payload(op)}")
    payload = bytearray(length)
    if not _fill(conn, memoryview(payload), deadline, timeouts):
        return None
    return op, payload


def _fill(conn: socket.socket, view: memoryview, deadline: float, timeouts: Timeouts) -> bool:
    """Fill ``view`` by ``deadline`` (else ``_Unfinished``); False if the client closed the connection first.

    A client sends a request in one piece, so what is already there usually fills it: one
    non-blocking receive. Only a request that trickles in waits, each wait bounded by the deadline.
    """
    if not view.nbytes:
        return True
    try:
        got = conn.recv_into(view, view.nbytes, socket.MSG_DONTWAIT)
    except BlockingIOError:
        got = -1  # nothing there yet
    if got == 0:
        return False
    if got == view.nbytes:
        return True
    got = max(got, 0)
    try:
        while got < view.nbytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Unfinished
            kernel_timeout(conn, socket.SO_RCVTIMEO, remaining)
            try:
                n = conn.recv_into(view[got:])
            except BlockingIOError:
                raise _Unfinished from None
            if n == 0:
                return False
            got += n
    finally:
        kernel_timeout(conn, socket.SO_RCVTIMEO, timeouts.idle)
    return True


def _send(conn: socket.socket, status: int, body: bytes | list[bytes | memoryview]) -> None:
    """A response: its header and body (or the body's pieces, gathered by one ``sendmsg``)."""
    pieces = [body] if isinstance(body, bytes) else body
    if len(pieces) > MAX_GATHER:
        pieces = [b"".join(pieces)]
    buffers = [RESPONSE.pack(status, sum(map(len, pieces))), *pieces]
    sent = conn.sendmsg(buffers)
    for buffer in buffers:  # the rest of what one sendmsg did not take
        if sent >= len(buffer):
            sent -= len(buffer)
            continue
        conn.sendall(memoryview(buffer)[sent:])
        sent = 0
