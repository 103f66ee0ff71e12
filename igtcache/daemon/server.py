"""The node daemon's life cycle: one ``Cache`` per remote, served on a Unix socket.

Start (``startup.py`` checks each step): raise the open-file limit to its
hard limit and size ``--max-connections`` within it; refuse a socket
directory other users could write; take ``SOCKET.lock`` (never through a
link; a second daemon on the socket is refused, naming the live one's pid),
replace a stale socket left by a dead daemon, check the budgets against the
machine, open the caches (the disk tier comes back as it was), bind the
socket with the requested mode (0600 unless told otherwise) before anyone
can connect, and the metrics port. Whatever fails is a ``StartError``.

Serve: the asyncio loop accepts connections, up to ``max_connections`` at
once (``admission.py``: the rest are told so and closed); a short-lived
thread reads the first bytes of each, keeps binary-protocol clients
(``protocol.MAGIC``) in that thread and hands everything else to aiohttp. A
connection that has not said which within ``frame_timeout`` is closed; so is
one idle, or with a response left unread, for ``idle_timeout``
(``binary.Timeouts``, ``HttpApi.connections``). Response bytes in flight are
bounded by ``max_inflight`` (``budget.py``).

Stop (SIGTERM or SIGINT): stop accepting and remove the socket, let in-flight
requests finish for up to ``grace`` seconds (binary connections stop reading
new requests at once), then cut what is left and close every cache, so the
disk tier is closed intact. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

from aiohttp import web

from igtcache import Cache, CacheDirInUse
from igtcache.cluster_url import parse_cluster_url
from igtcache.disk_tier import DiskTierError
from igtcache.daemon.admission import ConnectionSlots, Refusals
from igtcache.daemon.binary import Timeouts, serve_connection
from igtcache.daemon.budget import ResponseBudget
from igtcache.daemon.config import DaemonConfig, group_id
from igtcache.daemon.http_api import HttpApi
from igtcache.daemon.protocol import MAGIC
from igtcache.daemon.service import Service
from igtcache.daemon.startup import (
    StartError, bind_metrics, check_disk, check_memory, check_socket_dir, connection_cap, open_lock_file,
    raise_nofile_limit, share_disk_tier,
)
from igtcache.sizes import format_size

log = logging.getLogger("igtcache.daemon")

__all__ = ["Daemon", "StartError"]

#: Seconds between sweeps of the disk tiers' reader tables for slots of dead processes.
STALE_READER_PERIOD = 5.0


class Daemon:
    """Serves ``config``'s remotes on ``config.socket`` until SIGTERM or SIGINT (``run``)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.socket_path = Path(config.socket)
        self.service: Service | None = None
        self._lock_file = None
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._metrics_listener: socket.socket | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self._slots: ConnectionSlots | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http_factory = None

    def run(self) -> None:
        """Start, serve until a signal, stop cleanly. ``StartError`` if it cannot start."""
        try:
            self._start()
            asyncio.run(self._serve())
        finally:
            self._close()

    # ------------------------------------------------------------------ start

    def _start(self) -> None:
        cfg = self.config
        try:
            nofile = raise_nofile_limit()
            self._slots = ConnectionSlots(connection_cap(cfg.max_connections, nofile))
            log.info("open-file limit %d; up to %d connections", nofile, self._slots.limit)
            self._take_socket_lock()
            self._replace_stale_socket()
            check_memory(sum(cfg.tier_sizes(r)[0] for r in cfg.remotes), cfg.inflight_bytes)
            check_disk({d: cfg.tier_sizes(r)[1] for r in cfg.remotes if (d := cfg.remote_cache_dir(r))})
            budget = ResponseBudget(cfg.inflight_bytes, wait=cfg.frame_timeout)
            self.service = Service(self._open_caches(), cfg.max_read, budget, self._slots.counts)
            self._bind()
            if cfg.metrics_port is not None:
                self._metrics_listener = bind_metrics(cfg.metrics_host, cfg.metrics_port)
        except OSError as exc:  # ENOSPC, EACCES, EROFS... on the socket's or the caches' file systems
            raise StartError(f"cannot start: {exc}") from None

    def _take_socket_lock(self) -> None:
        directory = self.socket_path.parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True)
        check_socket_dir(directory)
        lock_path = self.socket_path.with_name(self.socket_path.name + ".lock")
        handle = open_lock_file(lock_path)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = handle.read().decode(errors="replace").strip() or "unknown"
            handle.close()
            raise StartError(f"socket {self.socket_path} is already served by a live daemon (pid {owner}); "
                             f"stop it first (kill -TERM {owner}) or choose another --socket") from None
        self._lock_file = handle
        handle.truncate(0)
        handle.write(str(os.getpid()).encode())

    def _replace_stale_socket(self) -> None:
        try:
            info = self.socket_path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise StartError(f"{self.socket_path} exists and is not a socket; refusing to replace it")
        if info.st_uid != os.geteuid():
            raise StartError(f"{self.socket_path} is a socket of another user (uid {info.st_uid}); refusing to "
                             "replace it (remove it, or choose another --socket)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2)
        try:
            probe.connect(str(self.socket_path))
        except (ConnectionRefusedError, FileNotFoundError, socket.timeout):
            log.warning("replacing stale socket %s left by a daemon that is gone", self.socket_path)
            self.socket_path.unlink(missing_ok=True)
            return
        finally:
            probe.close()
        raise StartError(f"socket {self.socket_path} is served by a live process that does not hold its lock file; "
                         "stop it first or choose another --socket")

    def _open_caches(self) -> dict[str, Cache]:
        cfg = self.config
        caches: dict[str, Cache] = {}
        try:
            if cfg.trace_dir is not None:
                os.makedirs(cfg.trace_dir, mode=0o700, exist_ok=True)  # traces name every job and path read
            for remote in cfg.remotes:
                memory, disk = cfg.tier_sizes(remote)
                cache_dir = cfg.remote_cache_dir(remote)
                caches[remote.name] = Cache(
                    remote.url, storage_options=remote.storage_options, cache_dir=cache_dir,
                    memory_bytes=memory, disk_bytes=disk, block_size=cfg.block_size,
                    policy=cfg.policy, ttl=cfg.ttl, trace_path=cfg.remote_trace_path(remote),
                    cluster=cfg.cluster, cluster_prefix=cfg.cluster_prefix, quotas=cfg.quotas,
                )
                if caches[remote.name].disk is not None:
                    group = group_id(cfg.socket_group) if cfg.socket_group is not None else None
                    share_disk_tier(caches[remote.name].disk.directory, cfg.socket_mode, group)
                where = f"disk {format_size(disk)} at {cache_dir}" if cache_dir else "no disk tier"
                if cfg.cluster:
                    where += f", cluster tier at {parse_cluster_url(cfg.cluster).redacted()}"
                log.info("serving %s as %r: memory %s, %s", remote.url, remote.name, format_size(memory), where)
        except (CacheDirInUse, ValueError, ImportError, OSError) as exc:  # ENOSPC, LMDB's ENOMEM included
            for cache in caches.values():
                cache.close()
            raise StartError(f"cannot open remote {remote.name!r} ({remote.url}): {exc}") from exc
        return caches

    def _bind(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # 0600 at bind; widened below only if asked, after the group is set
        try:
            listener.bind(str(self.socket_path))
        except OSError as exc:
            listener.close()
            raise StartError(f"cannot serve on {self.socket_path}: {exc}") from exc
        finally:
            os.umask(old_umask)
        if self.config.socket_group is not None:
            try:
                os.chown(self.socket_path, -1, group_id(self.config.socket_group))
            except (ValueError, PermissionError) as exc:
                listener.close()
                self.socket_path.unlink(missing_ok=True)
                raise StartError(f"cannot give socket to group {self.config.socket_group!r}: {exc}") from exc
        os.chmod(self.socket_path, self.config.socket_mode)
        listener.listen(256)
        listener.setblocking(False)
        self._listener = listener
        self._inode = self.socket_path.stat().st_ino
        log.info("listening on %s (mode %04o), pid %d", self.socket_path, self.config.socket_mode, os.getpid())

    # ------------------------------------------------------------------ serve

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        api = HttpApi(self.service)
        runner = web.AppRunner(api.app(), handle_signals=False, shutdown_timeout=self.config.grace)
        await runner.setup()
        self._http_factory = api.connections(runner.server, loop, self.config.idle_timeout, self._slots.give_back)
        metrics_runner = await self._start_metrics(api)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, stop)
        accept = asyncio.create_task(self._accept())
        janitor = asyncio.create_task(self._clear_stale_readers())
        await stop.wait()
        janitor.cancel()
        log.info("stopping: in-flight requests get up to %.0f s", self.config.grace)
        deadline = time.monotonic() + self.config.grace
        accept.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accept
        self._stop_listening()
        self._stopping = True
        self._shut_connections(socket.SHUT_RD)
        await runner.cleanup()
        await loop.run_in_executor(None, self._join_connections, deadline)
        if metrics_runner is not None:
            await metrics_runner.cleanup()

    async def _clear_stale_readers(self) -> None:
        """Free the disk tiers' reader slots that clients killed mid-read left behind (a slot held
        by a dead process would pin an old snapshot, and the file would grow)."""
        while True:
            for cache in self.service.caches.values():
                if cache.disk is not None:
                    try:
                        cleared = cache.disk.clear_stale_readers()  # a scan of the lock file's table: microseconds
                    except DiskTierError as exc:
                        log.warning("%s", exc)
                        continue
                    if cleared:
                        log.info("cleared %d reader slots of dead processes in %s", cleared, cache.disk.directory)
            await asyncio.sleep(STALE_READER_PERIOD)

    def _on_signal(self, stop: asyncio.Event) -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(1)
        stop.set()

    async def _start_metrics(self, api: HttpApi) -> web.AppRunner | None:
        if self._metrics_listener is None:
            return None
        runner = web.AppRunner(api.metrics_app(), handle_signals=False, access_log=None, shutdown_timeout=1)
        await runner.setup()
        await web.SockSite(runner, self._metrics_listener).start()
        log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.config.metrics_port)
        return runner

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        refusals = Refusals(self._slots.limit)
        warned = 0.0
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept a connection: %s", exc)
                    await asyncio.sleep(0.1)
                    continue
                raise
            if not self._slots.take():
                if time.monotonic() - warned > 60:
                    warned = time.monotonic()
                    log.warning("%d connections open (--max-connections); refusing more", self._slots.limit)
                refusals.refuse(conn)
                continue
            thread = threading.Thread(target=self._handle, args=(conn,), name="igtcache-conn", daemon=True)
            with self._conns_lock:
                self._conns[conn] = thread
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        """Tell the protocols apart by the first bytes; serve binary here, hand HTTP to aiohttp."""
        handed_off = False
        try:
            conn.settimeout(self.config.frame_timeout)
            head = _peek_head(conn, self.config.frame_timeout)
            if head == MAGIC and not self._stopping:
                conn.recv(len(MAGIC))
                conn.sendall(MAGIC)
                serve_connection(conn, self.service, Timeouts(self.config.idle_timeout, self.config.frame_timeout))
            elif head and not MAGIC.startswith(head) and not self._stopping:
                conn.setblocking(False)
                with self._conns_lock:
                    self._conns.pop(conn, None)
                handoff = self._loop.connect_accepted_socket(self._http_factory, conn)
                asyncio.run_coroutine_threadsafe(handoff, self._loop).add_done_callback(
                    lambda done: self._handed_off(conn, done))
                handed_off = True
        except (OSError, RuntimeError):
            pass  # the client left during the handshake, or the loop is gone (shutting down)
        finally:
            if not handed_off:
                with self._conns_lock:
                    self._conns.pop(conn, None)
                self._end(conn)

    def _handed_off(self, conn: socket.socket, done: concurrent.futures.Future) -> None:
        """Once aiohttp has the connection it gives the slot back when the connection ends; if the
        hand-off failed, that is ours to do."""
        if done.cancelled() or done.exception() is not None:
            self._end(conn)

    def _end(self, conn: socket.socket) -> None:
        conn.close()
        self._slots.give_back()

    # ------------------------------------------------------------------ stop

    def _stop_listening(self) -> None:
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        try:
            if self.socket_path.stat().st_ino == self._inode:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass

    def _shut_connections(self, how: int) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(how)
            except OSError:
                pass

    def _join_connections(self, deadline: float) -> None:
        """Wait for binary connections to finish their request; cut those still busy at ``deadline``."""
        while True:
            with self._conns_lock:
                threads = list(self._conns.values())
            if not threads:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("%d requests still in flight after the grace period; closing their connections",
                            len(threads))
                self._shut_connections(socket.SHUT_RDWR)
                cut = time.monotonic() + 1.0
                for thread in threads:
                    thread.join(max(0.0, cut - time.monotonic()))
                return
            threads[0].join(min(remaining, 0.5))

    def _close(self) -> None:
        self._stop_listening()
        if self._metrics_listener is not None:
            self._metrics_listener.close()
        if self.service is not None:
            for name, cache in self.service.caches.items():
                try:
                    cache.close()
                except Exception:  # noqa: BLE001 - close the others whatever one does
                    log.exception("closing the cache of %r failed", name)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def _peek_head(conn: socket.socket, timeout: float) -> bytes:
    """The connection's first bytes, enough to tell ``MAGIC`` from anything else, or what came of
    them within ``timeout`` seconds (a part of ``MAGIC``: a handshake never finished)."""
    deadline = time.monotonic() + timeout
    while True:
        head = conn.recv(len(MAGIC), socket.MSG_PEEK)
        if not head or len(head) == len(MAGIC) or not MAGIC.startswith(head) or time.monotonic() > deadline:
            return head
        time.sleep(0.005)

