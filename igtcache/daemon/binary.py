"""Serving the binary protocol (``protocol.py``) on one connection, in its own thread.

A thread per connection keeps the hit path short: a read goes from the
socket to ``Cache.read`` and back with no event-loop hand-off, and the bytes
leave through one ``sendmsg`` of the header and the cached block itself.
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


def _send(conn: socket.socket, status: int, body: bytes) -> None:
    header = RESPONSE.pack(status, len(body))
    sent = conn.sendmsg([header, body])
    if sent < len(header):
        conn.sendall(header[sent:])
        sent = len(header)
    if sent - len(header) < len(body):
        conn.sendall(memoryview(body)[sent - len(header):])
