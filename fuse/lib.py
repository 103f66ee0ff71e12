"""mfusepy bound to libfuse 3, with two changes to its hot path.

mfusepy looks for libfuse 2 first; where both are installed it would load the
old one. ``FUSE_LIBRARY_PATH`` (set before the import) forces libfuse 3 unless
the user chose a library already.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

if not os.environ.get("FUSE_LIBRARY_PATH"):
    _libfuse3 = ctypes.util.find_library("fuse3")
    if _libfuse3:
        os.environ["FUSE_LIBRARY_PATH"] = _libfuse3

try:
    import mfusepy
except (ImportError, OSError) as exc:  # OSError: mfusepy found no libfuse at all
    raise ImportError(
        f"FUSE mounts need mfusepy and libfuse 3 ({exc}); "
        "install them with `pip install 'igtcache[fuse]'` and `apt-get install fuse3`"
    ) from exc

FuseOSError = mfusepy.FuseOSError
Operations = mfusepy.Operations
fuse_get_context = mfusepy.fuse_get_context

__all__ = ["FUSE", "FuseOSError", "Operations", "fuse_get_context", "keep_thread_state"]


class FUSE(mfusepy.FUSE):
    """``mfusepy.FUSE`` that lets operations with ``read_into(path, buffer,
    offset, fi) -> int`` fill libfuse's reply buffer themselves, instead of
    returning ``bytes`` that mfusepy then copies into it."""

    def read(self, path, buf, size, offset, fip) -> int:
        read_into = getattr(self.operations, "read_into", None)
        if read_into is None:
            return super().read(path, buf, size, offset, fip)
        buffer = memoryview((ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))).cast("B")
        fi = fip.contents if self.raw_fi else fip.contents.fh
        return read_into(None if path is None else path.decode(self.encoding, self.errors), buffer, offset, fi)


_pinned: set[int] = set()
_pinned_lock = threading.Lock()


def keep_thread_state() -> None:
    """Keep this libfuse worker thread's Python thread state between callbacks.

    ctypes runs a callback from a foreign thread under ``PyGILState_Ensure``
    and deletes the thread state it created when the callback returns, so by
    default every request pays for a new thread state and frame stack (an
    ``mmap``/``munmap`` pair and tens of microseconds). One extra ``Ensure``
    that is never released keeps the state alive for the thread's life; the
    GIL is still released after each callback. Call it from a callback, in a
    loop whose worker threads are never retired (``max_idle_threads`` equal
    to ``max_threads``), so that no state is left behind by a thread that ends.
    """
    tid = threading.get_native_id()
    if tid in _pinned:
        return
    with _pinned_lock:
        _pinned.add(tid)
    ctypes.pythonapi.PyGILState_Ensure()
