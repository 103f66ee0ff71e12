"""Whether FUSE mounts can work here, and if not, why."""

from __future__ import annotations

import os
import shutil


def fuse_unusable() -> str | None:
    """Why ``igtcache mount`` cannot work on this machine, or ``None`` if it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is absent (no FUSE in this kernel or container)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if not shutil.which("fusermount3"):
        return "fusermount3 is missing (apt-get install fuse3)"
    try:
        import igtcache.fuse.lib  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None
