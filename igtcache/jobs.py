"""Which job a read belongs to: one rule for the engine, the client and the daemon.

In the reading process (``Cache``, ``DaemonClient``): the ``job`` argument,
else ``$IGTCACHE_JOB``, else the process id (``resolve_job``). The daemon
cannot see its clients' environment, so a client resolves the job before it
sends a read; a request that still names none (curl, a foreign client) is
the connected process's job: its pid as the kernel reports it for the
socket (``SO_PEERCRED``), else ``conn-FD``, the connection's descriptor,
unique among the connections open at the time (``peer_job``).
"""

from __future__ import annotations

import os
import socket

from igtcache.peercred import peer_credentials

ENV = "IGTCACHE_JOB"


def resolve_job(job: str | None = None) -> str:
    """``job`` if given (not ``None`` or empty), else ``$IGTCACHE_JOB``, else this process's id."""
    if job is not None and job != "":
        return str(job)
    return os.environ.get(ENV) or str(os.getpid())


def peer_job(conn: socket.socket) -> str:
    """The job of a request on ``conn`` that names none: the peer's pid, else ``conn-FD``."""
    peer = peer_credentials(conn)
    if peer is not None and peer.pid > 0:
        return str(peer.pid)
    return f"conn-{conn.fileno()}"
