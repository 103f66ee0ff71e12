"""How many connections the daemon serves at once, and how it turns away the rest.

Every open connection, binary or HTTP, holds one of ``ConnectionSlots``. Past
the cap a new connection is told so in the protocol it speaks (``BUSY`` and
a message for a binary client, ``503`` for HTTP) and closed; the refusals in
progress are bounded too, and one that sends nothing within
``REFUSAL_WAIT`` seconds is closed without a word.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading

from igtcache.daemon.protocol import BUSY, MAGIC, MAX_BUSY_MESSAGE

REFUSAL_WAIT = 1.0
MAX_REFUSALS = 64


class ConnectionSlots:
    """A count of open connections bounded by ``limit``; thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take a slot for a new connection; False if all ``limit`` are taken."""
        with self._lock:
            if self.in_use >= self.limit:
                return False
            self.in_use += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.in_use -= 1

    def counts(self) -> tuple[int, int]:
        """Connections open and the most allowed."""
        return self.in_use, self.limit


class Refusals:
    """Turns away connections past the cap, at most ``MAX_REFUSALS`` at a time."""

    def __init__(self, limit: int) -> None:
        self.message = (f"the igtcache daemon already serves {limit} connections (its --max-connections); "
                        "retry later, close idle clients, or raise --max-connections")
        self._pending: set[asyncio.Task] = set()  # the loop keeps only weak references to its tasks

    def refuse(self, conn: socket.socket) -> None:
        """Start turning ``conn`` away (on the running loop), or close it at once if too many are pending."""
        if len(self._pending) >= MAX_REFUSALS:
            conn.close()
            return
        task = asyncio.get_running_loop().create_task(self._refuse(conn))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _refuse(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            head = await asyncio.wait_for(loop.sock_recv(conn, len(MAGIC)), REFUSAL_WAIT)
            if head and MAGIC.startswith(head):
                await loop.sock_sendall(conn, BUSY + self.message.encode()[:MAX_BUSY_MESSAGE])
            elif head:
                body = json.dumps({"error": "DaemonUnavailable", "message": self.message}).encode()
                await loop.sock_sendall(conn, b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                                              b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                                        % (len(body), body))
                with contextlib.suppress(BlockingIOError):
                    conn.recv(65536)  # the rest of the request: closing on unread bytes would reset the connection
        except (OSError, asyncio.TimeoutError):
            pass  # the client left or said nothing: nothing to tell it
        finally:
            conn.close()
