"""``DaemonClient``: the node daemon's cache, with the same methods as ``Cache``.

It speaks the daemon's binary protocol (``igtcache.daemon.protocol``) over
persistent Unix-socket connections, one per thread at a time from a small
pool, so it is safe to share between threads. After a ``fork`` the child
drops the parent's connections and opens its own. Every read carries a job
id: the one given to the call, else the client's, else ``$IGTCACHE_JOB``,
else the id of the calling process (``igtcache.jobs.resolve_job``).

A failed call raises what the engine raised in the daemon, of the same type
(``igtcache.errors``). If the daemon goes away mid-request, turns the
connection away (it serves its ``--max-connections``) or does not answer
within the client's timeout (``timeout=``, else ``$IGTCACHE_DAEMON_TIMEOUT``,
else 60 s), the call raises ``DaemonUnavailable``; the next call connects
again, so a restarted daemon is picked up without a new client (and so is a
connection the daemon closed after its idle timeout).

Short-circuit reads: where the daemon has a disk tier that this process may
read, the client serves hits from it in its own process
(``igtcache.short_circuit``: verified, never stale past the TTL) and reports
them to the daemon in batches; everything else goes over the socket. Turn it
off with ``short_circuit=False`` or ``$IGTCACHE_SHORT_CIRCUIT=0``.

Before it sends a byte, the client asks the kernel who serves the socket
(``SO_PEERCRED``): it must run as this user or root, or as the user named by
``expected_uid=`` or ``$IGTCACHE_DAEMON_UID``; anything else is an
``UntrustedDaemon`` (a ``DaemonUnavailable``), since a process that took the
socket's place could answer reads with bytes of its choosing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pwd
import socket
import threading
from typing import Any

from igtcache.daemon.config import default_socket_path
from igtcache.daemon.protocol import (
    BUSY, ERROR, MAGIC, MAX_BUSY_MESSAGE, MAX_PAYLOAD, OK_BYTES, OK_JSON, OP_HEALTH, OP_INFO, OP_INVALIDATE, OP_LS,
    OP_PREFETCH, OP_READ_MANY, OP_REMOTES, OP_REPORT, OP_RESIDENCY, OP_STATS, RESPONSE, encode_json_request,
    encode_read, encode_request, kernel_timeout, raise_error, split_many,
)
from igtcache.errors import DaemonError, DaemonUnavailable, UnknownRemote, UntrustedDaemon
from igtcache.jobs import resolve_job
from igtcache.peercred import peer_credentials
from igtcache.remote import check_range, normalize_path
from igtcache.short_circuit import DiskTierReader, ShortCircuitUnavailable, attach

__all__ = ["DaemonClient", "DaemonError", "DaemonUnavailable", "UntrustedDaemon"]

DEFAULT_TIMEOUT = 60.0
TIMEOUT_ENV = "IGTCACHE_DAEMON_TIMEOUT"
UID_ENV = "IGTCACHE_DAEMON_UID"
SHORT_CIRCUIT_ENV = "IGTCACHE_SHORT_CIRCUIT"
NORMALIZED_PATHS = 1 << 16  # paths a client remembers normalized, for the hit path

log = logging.getLogger(__name__)


def client_timeout(timeout: float | None = None) -> float:
    """Seconds a call waits for the daemon: ``timeout``, else ``$IGTCACHE_DAEMON_TIMEOUT``, else 60
    (``math.inf``: for ever)."""
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV)
        if not text:
            return DEFAULT_TIMEOUT
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(f"${TIMEOUT_ENV} must be a number of seconds, e.g. 60, not {text!r}") from None
    if not timeout > 0:
        raise ValueError(f"the daemon client's timeout must be a positive number of seconds, not {timeout}")
    return timeout


def trusted_uids(expected_uid: int | str | None = None) -> frozenset[int]:
    """Users a daemon may run as: this one, root, and ``expected_uid`` (a uid or user name), else
    ``$IGTCACHE_DAEMON_UID``."""
    named = expected_uid if expected_uid is not None else os.environ.get(UID_ENV) or None
    uids = {os.geteuid(), 0}
    if named is not None:
        text = str(named)
        try:
            uids.add(int(text) if text.isdigit() else pwd.getpwnam(text).pw_uid)
        except KeyError:
            raise ValueError(f"the daemon's expected user {text!r} (expected_uid= or ${UID_ENV}) "
                             "is no user on this machine") from None
    return frozenset(uids)


class _Pool:
    """Idle connections to one socket, reset in a forked child."""

    def __init__(self, path: str, timeout: float, trusted: frozenset[int]) -> None:
        self.path = path
        self.timeout = timeout
        self.trusted = trusted
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.peer_uid: int | None = None  # who the daemon runs as, once connected

    def get(self) -> tuple[socket.socket, bool]:
        """A connection, and whether it was reused (and so may have gone stale)."""
        with self._lock:
            if self._pid != os.getpid():
                for conn in self._idle:
                    conn.close()  # the parent's connection stays open in the parent; never shut it down here
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def put(self, conn: socket.socket) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connect(self) -> socket.socket:
        """A new connection, its peer checked and its handshake done; kernel timeouts bound each
        connect, send and receive (the socket stays blocking: no ``poll()`` per call)."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if math.isfinite(self.timeout):
                kernel_timeout(conn, socket.SO_RCVTIMEO, self.timeout)
                kernel_timeout(conn, socket.SO_SNDTIMEO, self.timeout)  # connect() waits this long too
            conn.connect(self.path)
            self._check_peer(conn)
            conn.sendall(MAGIC)
            answer = _recv_exact(conn, len(MAGIC))
            if answer == BUSY:
                message = conn.recv(MAX_BUSY_MESSAGE, socket.MSG_WAITALL).decode(errors="replace")
                raise DaemonUnavailable(message or f"the igtcache daemon at {self.path} is busy")
        except DaemonError:
            conn.close()
            raise
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            conn.close()
            raise DaemonUnavailable(f"no igtcache daemon at {self.path} ({exc.strerror}); "
                                    "start one with `igtcache serve`") from None
        except PermissionError as exc:
            conn.close()
            raise DaemonUnavailable(f"you may not connect to the igtcache daemon at {self.path} ({exc.strerror}): "
                                    "run as the "
                                    "daemon's user, or have it started with --socket-group GROUP for a group "
                                    "you are in") from None
        except OSError as exc:
            conn.close()
            raise DaemonUnavailable(f"cannot connect to the igtcache daemon at {self.path}: "
                                    f"{_describe(exc, self.timeout)}") from None
        if answer != MAGIC:
            conn.close()
            raise DaemonError(f"{self.path} does not speak the igtcache protocol (got {answer!r})")
        return conn

    def _check_peer(self, conn: socket.socket) -> None:
        peer = peer_credentials(conn)
        uid = peer.uid if peer is not None else os.stat(self.path).st_uid  # no SO_PEERCRED: the socket's owner
        self.peer_uid = uid
        if uid not in self.trusted:
            me = os.geteuid()
            expected = "root" if me == 0 else f"you ({_user(me)}) or root"
            raise UntrustedDaemon(
                f"the process serving {self.path} runs as {_user(uid)}, not as {expected}; it may have taken "
                f"the daemon's place, so nothing was sent to it. If {_user(uid)} runs this node's daemon, "
                f"trust it with {UID_ENV}={uid} (or DaemonClient(expected_uid={uid}))")


class DaemonClient:
    """A remote served by the daemon on ``socket_path``, used like a ``Cache``.

    ``remote_name`` picks one of the daemon's remotes (``None``: its only
    one; with several, only the daemon-wide calls work until ``for_remote``).
    ``job`` tags every read that names no job of its own. ``timeout`` bounds
    each wait for the daemon to accept, answer or take bytes (default
    ``$IGTCACHE_DAEMON_TIMEOUT``, else 60 s; ``math.inf`` waits for ever).
    ``expected_uid`` (a uid or user name; default ``$IGTCACHE_DAEMON_UID``)
    is a user the daemon may run as besides this one and root.
    ``short_circuit`` (default ``$IGTCACHE_SHORT_CIRCUIT``, else on) serves
    hits from the daemon's disk tier in this process where it may.
    Raises ``DaemonUnavailable`` if no trusted daemon answers in time,
    ``UnknownRemote`` (a ``ValueError``) if it does not serve ``remote_name``.
    """

    def __init__(self, socket_path: str | os.PathLike | None = None, remote_name: str | None = None,
                 job: str | None = None, *, timeout: float | None = None, expected_uid: int | str | None = None,
                 short_circuit: bool | None = None, _pool: _Pool | None = None) -> None:
        self.socket_path = os.fspath(socket_path) if socket_path is not None else default_socket_path()
        self.job = job
        self._pool = _pool or _Pool(self.socket_path, client_timeout(timeout), trusted_uids(expected_uid))
        self._remotes = {r["name"]: r for r in self._call(OP_REMOTES, {})}
        if remote_name is None and len(self._remotes) == 1:
            remote_name = next(iter(self._remotes))
        if remote_name is not None and remote_name not in self._remotes:
            raise UnknownRemote(f"the daemon at {self.socket_path} serves no remote {remote_name!r}; "
                                f"it serves {sorted(self._remotes)}")
        self.remote_name = remote_name
        if short_circuit is None:
            short_circuit = os.environ.get(SHORT_CIRCUIT_ENV, "1") not in ("0", "false", "no", "off")
        self.short_circuit = short_circuit
        self._disk = self._attach_disk() if short_circuit and remote_name is not None else None
        self._normalized: dict[str, str] = {}  # paths as given -> as the remote names them
        self._default_job = (-1, "")  # (pid, job) of reads that name none

    def _attach_disk(self) -> DiskTierReader | None:
        """A reader of the remote's disk tier in this process, or ``None`` (one log line saying why)."""
        remote = self._remotes[self.remote_name]
        if remote.get("disk_tier") is None:
            return None
        try:
            return attach(remote["disk_tier"], remote=self.remote_name, block_size=remote["block_size"],
                          remote_id=remote["identity"], owner=self._pool.peer_uid, report=self._send_report)
        except ShortCircuitUnavailable as exc:
            log.info("reading %s through the daemon at %s, not from its disk tier: %s",
                     remote["url"], self.socket_path, exc)
            return None

    @property
    def short_circuited(self) -> bool:
        """Whether this client serves hits from the daemon's disk tier itself."""
        return self._disk is not None

    @property
    def served_here(self) -> int:
        """Reads this process served from the daemon's disk tier (by every client of that tier)."""
        return self._disk.served if self._disk is not None else 0

    @property
    def remotes(self) -> dict[str, dict[str, Any]]:
        """Every remote the daemon serves: ``name -> {name, url, protocols, root, block_size, max_read}``."""
        return dict(self._remotes)

    @property
    def url(self) -> str:
        """The URL of the remote this client reads."""
        return self._remotes[self._remote()]["url"]

    @property
    def block_size(self) -> int:
        """The block size of the remote's cache in the daemon."""
        return self._remotes[self._remote()]["block_size"]

    def for_remote(self, remote_name: str) -> "DaemonClient":
        """A client of another remote of the same daemon, sharing this one's connections."""
        return DaemonClient(self.socket_path, remote_name, self.job, short_circuit=self.short_circuit,
                            _pool=self._pool)

    # ------------------------------------------------------------------ Cache's API

    def read(self, path: str, offset: int = 0, size: int = -1, *,
             job: str | None = None, hint: str | None = None) -> bytes:
        """Bytes ``[offset, offset+size)`` of ``path``; fewer at end of object; ``size=-1`` to the end."""
        check_range(offset, size)
        if self._disk is not None and (found := self._from_disk(path, offset, size, job, None)) is not None:
            return found
        if size == -1 or size > self._max_read():
            if size == -1:
                size = max(0, self.info(path)["size"] - offset)
            if size > self._max_read():
                buffer = bytearray(size)
                return bytes(memoryview(buffer)[:self.readinto(path, offset, buffer, job=job, hint=hint)])
        return self._exchange(encode_read(self._remote(), path, offset, size, self._job(job), hint), into=None)

    def readinto(self, path: str, offset: int, buffer, *, job: str | None = None, hint: str | None = None) -> int:
        """Read up to ``len(buffer)`` bytes at ``offset`` straight into ``buffer``; the count read.

        Reads over the daemon's ``--max-read`` go as several requests.
        """
        view = memoryview(buffer).cast("B")
        if self._disk is not None and (found := self._from_disk(path, offset, view.nbytes, job, view)) is not None:
            return found
        done, chunk = 0, self._max_read()
        while done < view.nbytes:
            want = min(chunk, view.nbytes - done)
            request = encode_read(self._remote(), path, offset + done, want, self._job(job), hint)
            got = self._exchange(request, into=view[done:done + want])
            done += got
            if got < want:
                break
        return done

    def read_many(self, reads: list[tuple[str, int, int]], *, job: str | None = None) -> list[bytes]:
        """The bytes of each ``(path, offset, size)`` range (``size`` -1: to the end), in order:
        hits from the disk tier, the rest in as few round trips as ``--max-read`` allows.
        Fails as a whole if any range fails."""
        for _, offset, size in reads:
            check_range(offset, size)
        found: list[bytes | None] = [
            self._from_disk(path, offset, size, job, None) if self._disk is not None else None
            for path, offset, size in reads]
        batch: list[int] = []
        batch_bytes = request_bytes = 0
        for i in [i for i, data in enumerate(found) if data is None]:
            path, offset, size = reads[i]
            if size < 0 or size > self._max_read():
                found[i] = self.read(path, offset, size, job=job)
                continue
            entry_bytes = len(path.encode("utf-8", "surrogatepass")) + 48  # as JSON, with room for escapes
            if batch and (batch_bytes + size > self._max_read() or request_bytes + entry_bytes > MAX_PAYLOAD // 2):
                self._read_batch(reads, batch, found, job)
                batch, batch_bytes, request_bytes = [], 0, 0
            batch.append(i)
            batch_bytes += size
            request_bytes += entry_bytes
        if batch:
            self._read_batch(reads, batch, found, job)
        return found  # type: ignore[return-value]

    def info(self, path: str) -> dict[str, Any]:
        """Size and version of an object: ``{"name", "size", "type", "version"}``."""
        if self._disk is not None and (rel := self._relative(path)) is not None:
            meta = self._disk.info(rel)
            if meta is not None:
                return {"name": meta.path, "size": meta.size, "type": "file", "version": meta.version}
        return self._call(OP_INFO, {"remote": self._remote(), "path": path})

    def residency(self, path: str) -> dict[str, Any]:
        """How much of ``path`` the daemon's node tiers hold (``Cache.residency``)."""
        return self._call(OP_RESIDENCY, {"remote": self._remote(), "path": path})

    def ls(self, prefix: str = "") -> list[dict[str, Any]]:
        """A directory of the remote: ``name``, ``size``, ``type`` per entry."""
        return self._call(OP_LS, {"remote": self._remote(), "path": prefix})

    def invalidate(self, path: str) -> None:
        """Make the daemon forget everything cached about ``path``."""
        self._call(OP_INVALIDATE, {"remote": self._remote(), "path": path})
        if self._disk is not None:
            self._disk.refresh()

    def prefetch(self, path: str, offset: int = 0, size: int = -1) -> int:
        """Ask the daemon to start fetching a range; the number of blocks started."""
        return self._call(OP_PREFETCH, {"remote": self._remote(), "path": path, "offset": offset, "size": size})

    def stats(self) -> dict[str, Any]:
        """This remote's ``Cache.stats()`` in the daemon, counting every hit this process served itself."""
        self.flush_reports()
        return self._call(OP_STATS, {"remote": self._remote()})

    def flush_reports(self) -> None:
        """Report every hit served from the disk tier so far to the daemon now (it is otherwise
        reported within a fraction of a second)."""
        if self._disk is not None:
            self._disk.flush()

    def close(self) -> None:
        """Report the hits served so far and close this client's idle connections."""
        self.flush_reports()
        self._pool.close()

    def __enter__(self) -> "DaemonClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the daemon's own

    def health(self) -> dict[str, Any]:
        return self._call(OP_HEALTH, {})

    def daemon_stats(self) -> dict[str, Any]:
        """The daemon's counters and every remote's stats: ``{"daemon": ..., "remotes": {...}}``."""
        return self._call(OP_STATS, {})

    # ------------------------------------------------------------------ wire

    def _remote(self) -> str:
        if self.remote_name is None:
            raise ValueError(f"the daemon at {self.socket_path} serves {sorted(self._remotes)}; "
                             "pass remote_name= or use for_remote(name)")
        return self.remote_name

    def _max_read(self) -> int:
        return self._remotes[self._remote()]["max_read"]

    def _job(self, job: str | None) -> str:
        return resolve_job(job if job is not None else self.job)

    def _call(self, op: int, args: dict[str, Any]) -> Any:
        return self._exchange(encode_json_request(op, args), into=None)

    def _call_bytes(self, op: int, args: dict[str, Any]) -> bytes:
        body = self._call(op, args)
        if not isinstance(body, bytes):
            raise DaemonError(f"the daemon answered {op} with {type(body).__name__}, not bytes")
        return body

    def _read_batch(self, reads: list[tuple[str, int, int]], batch: list[int], found: list, job: str | None) -> None:
        """One ``OP_READ_MANY`` round trip for the ranges ``batch`` indexes."""
        args = {"remote": self._remote(), "job": self._job(job), "reads": [list(reads[i]) for i in batch]}
        for i, data in zip(batch, split_many(self._call_bytes(OP_READ_MANY, args), len(batch))):
            found[i] = data

    def _send_report(self, payload: bytes) -> None:
        self._exchange(encode_request(OP_REPORT, payload), into=None)

    def _relative(self, path: str) -> str | None:
        """``path`` as the remote names it, remembered; ``None`` for a path the daemon will refuse
        (it says what is wrong with it)."""
        rel = self._normalized.get(path)
        if rel is None:
            try:
                rel = normalize_path(path)
            except ValueError:
                return None
            if len(self._normalized) >= NORMALIZED_PATHS:
                self._normalized.clear()
            self._normalized[path] = rel
        return rel

    def _from_disk(self, path: str, offset: int, size: int, job: str | None, out: memoryview | None):
        """A read served from the disk tier in this process, or ``None`` for the daemon to serve."""
        rel = self._relative(path)
        if rel is None:
            return None
        if job:
            job = str(job)
        elif self._default_job[0] == os.getpid():
            job = self._default_job[1]
        else:
            job = self._job(None)
            self._default_job = (os.getpid(), job)
        return self._disk.read(rel, offset, size, job, out)

    def _exchange(self, request: bytes, into: memoryview | None) -> Any:
        """Send one request and read its response.

        A pooled connection the daemon closed while it sat idle (the daemon
        restarted) is dropped and the request sent again on another; every
        operation is idempotent, so that is safe.
        """
        while True:
            conn, reused = self._pool.get()
            try:
                conn.sendall(request)
                status, length = RESPONSE.unpack(_recv_exact(conn, RESPONSE.size))
                if status == OK_BYTES and into is not None:
                    if length > into.nbytes:
                        raise DaemonError(f"the daemon sent {length} bytes for a read of {into.nbytes}")
                    _recv_exact_into(conn, into[:length])
                    body: Any = length
                else:
                    body = _recv_exact(conn, length)
            except DaemonError:
                conn.close()
                raise
            except OSError as exc:
                conn.close()
                if reused and isinstance(exc, (_Closed, BrokenPipeError, ConnectionResetError)) and _sent_nothing(exc):
                    continue  # an idle connection to a daemon that has since restarted
                if isinstance(exc, (BlockingIOError, TimeoutError)):
                    raise DaemonUnavailable(f"the igtcache daemon at {self.socket_path} did not answer: "
                                            f"{_describe(exc, self._pool.timeout)}") from None
                raise DaemonUnavailable(f"the igtcache daemon at {self.socket_path} went away mid-request "
                                        f"({exc}); is it still running?") from None
            self._pool.put(conn)
            if status == ERROR:
                raise_error(body)
            if status == OK_JSON:
                return json.loads(body)
            if status == OK_BYTES:
                return body
            raise DaemonError(f"unknown response status {status} from the daemon at {self.socket_path}")


def _describe(exc: OSError, timeout: float) -> str:
    """``exc`` in words; a kernel timeout (``EAGAIN``) says how long was waited and what to do."""
    if isinstance(exc, (BlockingIOError, TimeoutError)):
        return (f"nothing for {timeout:g} s (hung or overloaded?); a longer wait: timeout= or "
                f"${TIMEOUT_ENV}")
    return str(exc)


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


class _Closed(ConnectionError):
    """The daemon closed the connection; ``at_start`` if before any byte of the response."""

    def __init__(self, at_start: bool) -> None:
        super().__init__("connection closed by the daemon")
        self.at_start = at_start


def _sent_nothing(exc: BaseException) -> bool:
    return not isinstance(exc, _Closed) or exc.at_start


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, in one copy when the socket delivers them at once."""
    data = conn.recv(n, socket.MSG_WAITALL)
    if len(data) == n:
        return data
    if not data:
        raise _Closed(at_start=True)
    chunks, got = [data], len(data)
    while got < n:
        chunk = conn.recv(n - got, socket.MSG_WAITALL)
        if not chunk:
            raise _Closed(at_start=False)
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv_exact_into(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = conn.recv_into(view[got:], view.nbytes - got, socket.MSG_WAITALL)
        if n == 0:
            raise _Closed(at_start=False)
        got += n
