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
import struct

ENV = "IGTCACHE_JOB"

_UCRED = struct.Struct("3i")  # pid, uid, gid


def resolve_job(job: str | None = None) -> str:
    """``job`` if given (not ``None`` or empty), else ``$IGTCACHE_JOB``, else this process's id."""
    if job is not None and job != "":
        return str(job)
    return os.environ.get(ENV) or str(os.getpid())


def peer_job(conn: socket.socket) -> str:
    """The job of a request on ``conn`` that names none: the peer's pid, else ``conn-FD``."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is not None and conn.family == socket.AF_UNIX:
        try:
            pid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, option, _UCRED.size))[0]
        except OSError:
            pid = 0
        if pid > 0:  # 0: the peer lives in a pid namespace this one cannot see
            return str(pid)
    return f"conn-{conn.fileno()}"
