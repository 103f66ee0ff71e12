"""Mount a ``CacheFS`` with libfuse 3 and serve it until it is unmounted.

Throughput knobs, and why they are set as they are:

- The kernel's readahead window (``/sys/class/bdi/<dev>/read_ahead_kb``, set
  after mounting: libfuse's high-level API rejects ``max_readahead``) decides
  the size of the requests a sequential buffered reader causes, up to
  ``max_read``, and how many are in flight. With the kernel's default 128 KiB
  they are 128 KiB requests one or two at a time, whatever ``max_read`` says;
  with 8 MiB, 1 MiB requests eight at a time.
- ``max_read`` 1 MiB: the largest request libfuse's buffers take.
- Multithreaded libfuse loop: concurrent requests wait on the cache
  independently. Worker threads keep their Python thread state
  (``igtcache.fuse.lib.keep_thread_state``) and are never retired.
- Reads fill libfuse's reply buffer directly where the backend can
  (``readinto``), not through an intermediate ``bytes``.
- ``keep_cache`` while an object's version is unchanged: re-reads are served
  from the page cache without a request at all.
- ``gc.freeze()`` once mounted: the long-lived objects of start-up stay out of
  the collections that the per-request allocations trigger.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from typing import Callable

from igtcache.fuse.lib import FUSE
from igtcache.fuse.mount import CacheFS

log = logging.getLogger(__name__)

DEFAULT_READAHEAD = 8 << 20
# libfuse workers, never retired (see ``keep_thread_state``): enough that requests waiting on a slow
# remote do not hold up other jobs' cached reads; more would only contend for the GIL.
THREADS = 16

_LOOP_ENDED = 8  # fuse_main()'s status when its loop stopped on an error or a signal


def serve(
    ops: CacheFS,
    mountpoint: str,
    *,
    read_only: bool = True,
    allow_other: bool = False,
    readahead: int = DEFAULT_READAHEAD,
    fsname: str = "igtcache",
    debug: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount ``ops`` at ``mountpoint`` and serve until it is unmounted or this
    process gets SIGINT/SIGTERM (libfuse then unmounts). ``on_ready`` runs once
    the mount is in place. Raises ``RuntimeError`` if mounting fails."""
    before = os.stat(mountpoint).st_dev
    stop = threading.Event()
    watcher = threading.Thread(
        target=_when_mounted, args=(ops, mountpoint, before, readahead, on_ready, stop),
        name="igtcache-mount-ready", daemon=True,
    )
    watcher.start()
    try:
        FUSE(
            ops, mountpoint, foreground=True, raw_fi=True, debug=debug,
            ro=read_only, allow_other=allow_other, default_permissions=True,
            fsname=_option_value(fsname), subtype="igtcache", max_read=ops.max_read,
            max_threads=THREADS, max_idle_threads=THREADS,
        )
    except RuntimeError as exc:
        # fuse_main() returns 8 when its loop ends by SIGINT/SIGTERM (it has unmounted): a clean exit.
        if exc.args == (_LOOP_ENDED,) and ops.initialized.is_set():
            return
        raise RuntimeError(f"libfuse could not mount {mountpoint} (fuse_main() returned {exc.args[0]}; "
                           "its own message is above)") from None
    finally:
        stop.set()


def set_readahead(mountpoint: str, nbytes: int) -> bool:
    """Set the kernel's readahead window for the file system at ``mountpoint``
    (needs root); False where it cannot."""
    dev = os.stat(mountpoint).st_dev
    knob = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(knob, "w") as f:
            f.write(str(max(4, nbytes // 1024)))
        return True
    except OSError as exc:
        log.info("cannot set readahead through %s (%s); the kernel's default stays", knob, exc)
        return False


def _when_mounted(ops, mountpoint, before, readahead, on_ready, stop) -> None:
    while not ops.initialized.wait(0.05):
        if stop.is_set():
            return
    try:
        # The kernel's INIT can be answered before the mount is attached to the tree.
        while os.stat(mountpoint).st_dev == before:
            if stop.wait(0.01):
                return
        set_readahead(mountpoint, readahead)
    except OSError as exc:  # unmounted again already
        log.debug("mount went away before it was ready: %s", exc)
        return
    gc.freeze()  # what exists now lives as long as the mount: keep it out of every collection
    if on_ready is not None:
        on_ready()


def _option_value(text: str) -> str:
    """``text`` safe inside libfuse's comma-separated ``-o`` list."""
    return "".join("_" if c in ", \t\n\\" else c for c in text)
