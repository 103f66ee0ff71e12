"""Who is at the other end of a Unix socket, as the kernel reports it (``SO_PEERCRED``).

The daemon uses it to name a request's job after the connected process; a
client uses it to check that the process serving the socket runs as a user it
trusts before it sends a byte.
"""

from __future__ import annotations

import pwd
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class PeerCredentials:
    """The connected process as the kernel saw it when the connection was made."""

    pid: int  # 0 when the peer lives in a pid namespace this process cannot see
    uid: int
    gid: int


def peer_credentials(conn: socket.socket) -> PeerCredentials | None:
    """``conn``'s peer, or ``None`` where the kernel cannot say (not a Unix socket, no ``SO_PEERCRED``)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None or conn.family != socket.AF_UNIX:
        return None
    try:
        return PeerCredentials(*_UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, option, _UCRED.size)))
    except OSError:
        return None


def user_name(uid: int) -> str:
    """The name of user ``uid``, or ``uid N`` where it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
