"""One table of errors for every way out of the engine: the daemon's binary
protocol, its HTTP API, ``DaemonClient`` and the FUSE mount.

Each exception the engine (or the daemon) can raise has one ``ErrorRow``: the
name the binary protocol and the HTTP API send, the HTTP status, and the
errno the mount returns. ``error_row(exc)`` finds the row of the nearest class
in the exception's MRO that has one, so an ``OSError`` subclass without a row
of its own (a new engine error) travels as its nearest ancestor's row, at
worst the generic ``OSError`` one; an exception that is no ``OSError`` and
has no row is an ``InternalError``. A new error class gets its own wire name,
status and errno with one more line in ``ROWS``.

``exception_from_wire(name, message)`` is the client's side: the exception
the daemon raised, of the same type, with the same message.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from igtcache.cache import CacheDirInUse
from igtcache.disk_tier import DiskFull
from igtcache.remote import RemoteError, VersionChanged


class DaemonError(OSError):
    """The daemon could not be reached, broke the protocol, or failed unexpectedly."""


class DaemonUnavailable(DaemonError):
    """No daemon answers on the socket, or it went away mid-request."""


class UntrustedDaemon(DaemonUnavailable):
    """The process serving the socket runs as a user the client does not trust (``SO_PEERCRED``)."""


class InternalError(DaemonError):
    """The daemon failed in a way it has no row for (a bug): its log has the traceback."""


class BadRequest(ValueError):
    """A request the daemon refuses: malformed, unframeable or out of range."""


class UnknownRemote(BadRequest):
    """A request names a remote the daemon does not serve."""


@dataclass(frozen=True)
class ErrorRow:
    """How one kind of error leaves the engine."""

    wire: str  # its name in a binary ``ERROR`` body and the HTTP JSON body
    status: int  # HTTP status
    errno: int  # what a FUSE operation fails with
    cls: type[BaseException]  # what the client raises for ``wire``


# A remote failure, a timeout, a daemon gone away or a bug is EIO at the mount:
# the errno of such an OSError describes the cache's trouble, not the file.
ROWS: tuple[ErrorRow, ...] = (
    ErrorRow("BadRequest", 400, errno.EINVAL, BadRequest),
    ErrorRow("UnknownRemote", 404, errno.ENOENT, UnknownRemote),
    ErrorRow("FileNotFoundError", 404, errno.ENOENT, FileNotFoundError),
    ErrorRow("IsADirectoryError", 400, errno.EISDIR, IsADirectoryError),
    ErrorRow("NotADirectoryError", 400, errno.ENOTDIR, NotADirectoryError),
    ErrorRow("PermissionError", 403, errno.EACCES, PermissionError),
    ErrorRow("ValueError", 400, errno.EINVAL, ValueError),
    ErrorRow("TypeError", 400, errno.EINVAL, TypeError),
    ErrorRow("TimeoutError", 504, errno.EIO, TimeoutError),
    ErrorRow("RemoteError", 502, errno.EIO, RemoteError),
    ErrorRow("VersionChanged", 409, errno.ESTALE, VersionChanged),
    ErrorRow("DiskFull", 507, errno.ENOSPC, DiskFull),
    ErrorRow("CacheDirInUse", 503, errno.EBUSY, CacheDirInUse),
    ErrorRow("OSError", 500, errno.EIO, OSError),
    ErrorRow("InternalError", 500, errno.EIO, InternalError),
)

INTERNAL = ROWS[-1]
_BY_CLASS = {row.cls: row for row in ROWS}
_BY_WIRE = {row.wire: row for row in ROWS}


def error_row(exc: BaseException) -> ErrorRow:
    """The row of ``exc``: its class's, else its nearest ancestor's, else ``INTERNAL``."""
    for cls in type(exc).__mro__:
        row = _BY_CLASS.get(cls)
        if row is not None:
            return row
    return INTERNAL


def exception_from_wire(name: str, message: str) -> BaseException:
    """The exception a daemon's error ``name`` and ``message`` stand for; a name this
    client does not know (a newer daemon) is a ``DaemonError`` naming it.

    It is of the row's class with the message as its only argument, built without the
    class's ``__init__``: an engine error may take other arguments (``VersionChanged``
    takes the path and both versions), which the wire does not carry.
    """
    row = _BY_WIRE.get(name)
    if row is None:
        return DaemonError(f"{name}: {message}")
    exc = row.cls.__new__(row.cls)
    exc.args = (message,)
    return exc
