"""The soak's readers: processes that read random ranges of the dataset in a loop and send every read back.

Kinds (``KINDS``):

- ``embedded``: threads of one process sharing an embedded ``igtcache.Cache``
  (its own cache dir) on the S3 server;
- ``client``: a ``DaemonClient`` of the daemon;
- ``fsspec``: the ``igtcache::`` fsspec plugin attached to the daemon;
- ``fuse``: plain files of an ``igtcache mount`` of the daemon, read with
  ``pread`` after dropping their pages from the kernel's page cache, so that
  reads reach the mount.

Every attempt is bounded by a client-side timeout: it runs in a thread of its
own that is left behind if it outlives the timeout. A failed read is tried
once more after ``RETRY_PAUSE_S``; its latency covers both attempts. The
parent gets ``("ready", name)``, then one ``("read", kind, key, offset, size,
t0, t1, data, error, detail)`` per read (``data`` None when ``error`` names
what the last attempt raised, ``detail`` its message), then ``("done",
name)`` once told to stop (any message, or the parent going away) or past
``stop_at``.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

KINDS = ("embedded", "client", "fsspec", "fuse")
RETRY_PAUSE_S = 0.1
KiB = 1 << 10

Read = Callable[[str, int, int], bytes]


@dataclass
class ReaderSpec:
    """What one reader process reads, and through what."""

    kind: str
    name: str
    seed: int
    bands: dict[str, int]  # key -> largest size the object may have
    block_sizes: tuple[int, ...]  # reads often straddle a boundary of one of these
    timeout: float
    stop_at: float  # time.monotonic() after which the process ends even if never told
    socket: str | None = None
    mountpoint: str | None = None
    bucket: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    ttl: float = 2.0
    threads: int = 1
    pause: float = 0.005  # seconds between one thread's reads, so that the services get the CPU too


def reader_main(spec: ReaderSpec, conn) -> None:
    """Process entry point: read until told to stop, sending each read on ``conn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    lock = threading.Lock()
    stop = threading.Event()

    def send(message: tuple) -> None:
        try:
            with lock:
                conn.send(message)
        except (OSError, EOFError):  # the parent went away
            stop.set()

    try:
        read, close = BACKENDS[spec.kind](spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the soak
        send(("failed", spec.name, f"{type(exc).__name__}: {exc}"))
        os._exit(1)
    send(("ready", spec.name))
    threads = [threading.Thread(target=_loop, args=(spec, i, read, send, stop), daemon=True)
               for i in range(spec.threads)]
    for thread in threads:
        thread.start()
    while not stop.is_set() and time.monotonic() < spec.stop_at:
        try:
            if conn.poll(0.2):
                break
        except (OSError, EOFError):
            break
    stop.set()
    for thread in threads:
        thread.join(2 * spec.timeout + RETRY_PAUSE_S + 1)
    send(("done", spec.name))
    closing = threading.Thread(target=close, daemon=True)
    closing.start()
    closing.join(5)
    os._exit(0)  # reads left behind by their timeout must not keep the process alive


def _loop(spec: ReaderSpec, index: int, read: Read, send: Callable[[tuple], None], stop: threading.Event) -> None:
    rng = random.Random(f"reader-{spec.seed}-{spec.name}-{index}")
    while not stop.is_set():
        key, offset, size = pick_range(rng, spec.bands, spec.block_sizes)
        t0 = time.monotonic()
        data, error, detail = _attempt(read, key, offset, size, spec.timeout)
        if error is not None and not stop.wait(RETRY_PAUSE_S):
            data, error, detail = _attempt(read, key, offset, size, spec.timeout)
        send(("read", spec.kind, key, offset, size, t0, time.monotonic(), data, error, detail))
        stop.wait(spec.pause)


def pick_range(rng: random.Random, bands: dict[str, int], block_sizes: tuple[int, ...]) -> tuple[str, int, int]:
    """A random object and range: a third of them just before a block boundary, sizes 1 B to 64 KiB
    (log-uniform), some past the object's end."""
    key = rng.choice(list(bands))
    band = bands[key]
    if rng.random() < 0.3:
        block = rng.choice(block_sizes)
        offset = max(0, block * rng.randint(1, max(1, band // block)) - rng.randint(1, 4 * KiB))
    else:
        offset = rng.randrange(band)
    return key, offset, int(2 ** rng.uniform(0, 16))


def _attempt(read: Read, key: str, offset: int, size: int,
             timeout: float) -> tuple[bytes | None, str | None, str | None]:
    """One read in a thread of its own, given up after ``timeout``: ``(data, None, None)`` or
    ``(None, error, message)``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["data"] = bytes(read(key, offset, size))
        except BaseException as exc:  # noqa: BLE001 - counted by the parent
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return None, "ClientTimeout", f"no answer within {timeout:g} s"
    if "error" in box:
        return None, error_name(box["error"]), str(box["error"])[:300]
    return box["data"], None, None


def error_name(exc: BaseException) -> str:
    """The exception's type, with the errno's name for a plain ``OSError`` (``OSError:EIO``)."""
    name = type(exc).__name__
    if type(exc) is OSError and exc.errno in errno.errorcode:
        name += ":" + errno.errorcode[exc.errno]
    return name


# ---------------------------------------------------------------------- backends: (read, close)

def _embedded(spec: ReaderSpec) -> tuple[Read, Callable[[], None]]:
    from igtcache import Cache

    cache = Cache(f"s3://{spec.bucket}", storage_options=spec.storage_options, cache_dir=spec.cache_dir,
                  memory_bytes=512 * KiB, disk_bytes=16 << 20, block_size=64 * KiB, ttl=spec.ttl,
                  retries=3, timeout=1.0)
    return cache.read, cache.close


def _client(spec: ReaderSpec) -> tuple[Read, Callable[[], None]]:
    from igtcache.daemon_client import DaemonClient

    clients: list[DaemonClient] = []  # made at the first read: the daemon may be down now

    def read(key: str, offset: int, size: int) -> bytes:
        if not clients:
            clients.append(DaemonClient(spec.socket, timeout=spec.timeout))
        return clients[0].read(key, offset, size)

    return read, lambda: [c.close() for c in clients]


def _fsspec(spec: ReaderSpec) -> tuple[Read, Callable[[], None]]:
    import fsspec

    fs = fsspec.filesystem("igtcache", target_protocol="s3", target_options=spec.storage_options,
                           mode="attach", socket=spec.socket, skip_instance_cache=True)
    return (lambda key, offset, size: fs.cat_file(f"{spec.bucket}/{key}", offset, offset + size)), lambda: None


def _fuse(spec: ReaderSpec) -> tuple[Read, Callable[[], None]]:
    def read(key: str, offset: int, size: int) -> bytes:
        fd = os.open(os.path.join(spec.mountpoint, key), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            chunks, got = [], 0
            while got < size and (chunk := os.pread(fd, size - got, offset + got)):
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    return read, lambda: None


BACKENDS: dict[str, Callable[[ReaderSpec], tuple[Read, Callable[[], None]]]] = {
    "embedded": _embedded, "client": _client, "fsspec": _fsspec, "fuse": _fuse,
}
