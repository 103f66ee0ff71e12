"""Serving the binary protocol (``protocol.py``) on one connection, in its own thread.

A thread per connection keeps the hit path short: a read goes from the
socket to ``Cache.read_pieces`` and back with no event-loop hand-off, and the
bytes leave through one ``sendmsg`` of the header and the cached blocks
themselves (views of them where a read starts or ends inside a block).
"""

from __future__ import annotations

import json
import logging
import socket

from igtcache.daemon.protocol import (
    ERROR, MAX_PAYLOAD, OK_BYTES, OK_JSON, OP_READ, OPS, REQUEST, RESPONSE, BadRequest,
    decode_json, decode_read, error_body,
)
from igtcache.daemon.service import Service

log = logging.getLogger(__name__)

#: Most pieces one ``sendmsg`` gathers (the kernel's IOV_MAX is 1024); a read of more is joined first.
MAX_GATHER = 512


def serve_connection(conn: socket.socket, service: Service) -> None:
    """Answer requests until the client closes the connection or the daemon shuts its reading side."""
    header = bytearray(REQUEST.size)
    try:
        while _recv_into(conn, header):
            op, length = REQUEST.unpack(header)
            if op not in OPS or length > MAX_PAYLOAD:
                # The stream cannot be re-synchronized after a frame we cannot size: answer, then hang up.
                error = BadRequest(f"unknown operation {op}" if op not in OPS else
                                   f"request payload of {length} bytes is over the limit of {MAX_PAYLOAD}")
                service.count("malformed", error)
                _send(conn, ERROR, error_body(error))
                return
            payload = bytearray(length)
            if not _recv_into(conn, payload):
                return
            name = OPS[op]
            try:
                if op == OP_READ:
                    status, body = OK_BYTES, service.read(**decode_read(bytes(payload)))
                else:
                    status, body = OK_JSON, json.dumps(service.call(name, decode_json(bytes(payload)))).encode()
            except Exception as exc:  # noqa: BLE001 - every failure becomes an error response
                service.count(name, exc)
                if not isinstance(exc, (OSError, ValueError, TypeError)):
                    log.exception("%s failed", name)
                _send(conn, ERROR, error_body(exc))
                continue
            service.count(name)
            _send(conn, status, body)
    except OSError:
        pass  # the client went away, or the daemon is shutting this connection down


def _recv_into(conn: socket.socket, buffer: bytearray) -> bool:
    """Fill ``buffer``; False if the peer closed the connection first."""
    view, got = memoryview(buffer), 0
    while got < len(buffer):
        n = conn.recv_into(view[got:], len(buffer) - got, socket.MSG_WAITALL)
        if n == 0:
            return False
        got += n
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
