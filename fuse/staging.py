"""Files open for writing through a ``--writable`` mount.

The bytes are staged in a local temporary file and uploaded whole when the
writer closes (or fsyncs) the file: object stores take whole objects, not
ranges. Readers see the new object once the upload has finished.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Callable

Uploader = Callable[[str, str], None]  # (path relative to the remote root, local file to upload)

_CHUNK = 64 << 20


class StagedFile:
    """One open-for-writing file: a local temporary copy and whether it differs
    from what the remote holds."""

    def __init__(self, path: str, staging_dir: str, initial: Callable[[int, int], bytes] | None = None) -> None:
        """``initial(offset, size)`` reads the current object, copied in first
        (``None`` starts empty, as for a new file or ``O_TRUNC``)."""
        self.path = path
        self._lock = threading.Lock()
        self._fd, self.local = tempfile.mkstemp(dir=staging_dir, prefix="staged-")
        self.dirty = initial is None  # a new, empty file is still uploaded
        try:
            offset = 0
            while initial is not None:
                chunk = initial(offset, _CHUNK)
                if not chunk:
                    break
                os.pwrite(self._fd, chunk, offset)
                offset += len(chunk)
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def read(self, size: int, offset: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def write(self, data: bytes, offset: int) -> int:
        with self._lock:
            self.dirty = True
            return os.pwrite(self._fd, data, offset)

    def truncate(self, length: int) -> None:
        with self._lock:
            self.dirty = True
            os.ftruncate(self._fd, length)

    def upload(self, uploader: Uploader) -> bool:
        """Upload if changed since the last upload; True if it uploaded."""
        with self._lock:
            if not self.dirty:
                return False
            uploader(self.path, self.local)
            self.dirty = False
            return True

    def close(self) -> None:
        os.close(self._fd)
        os.unlink(self.local)
