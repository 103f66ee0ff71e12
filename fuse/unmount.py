"""``igtcache unmount MOUNTPOINT``: take a mount away cleanly.

A mount with files still open is detached lazily: the path is free at once,
the open files keep reading until they are closed, then the mount process
exits. A mount whose process died (``ENOTCONN``) is removed as well.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys


class UnmountError(RuntimeError):
    """The mount could not be removed; the message says why."""


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def _canonical(path: str) -> str:
    """``path`` with its parent's symlinks resolved; the path itself is not
    touched, since a dead FUSE mount fails every look-up (ENOTCONN)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def is_mounted(path: str) -> bool:
    """Whether something is mounted at ``path`` (alive or not)."""
    target = _canonical(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


def unmount(mountpoint: str, *, lazy: bool = True) -> None:
    """Unmount ``mountpoint``; when it is busy and ``lazy``, detach it lazily."""
    target = _canonical(mountpoint)
    if not is_mounted(target):
        raise UnmountError(f"{mountpoint} is not mounted")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    commands = [[tool, "-u", target], [tool, "-u", "-z", target]] if tool else [["umount", target], ["umount", "-l", target]]
    if not lazy:
        commands = commands[:1]
    error = ""
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0 or not is_mounted(target):
            return
        error = result.stderr.strip() or f"{command[0]} exited with status {result.returncode}"
    raise UnmountError(error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="igtcache unmount", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("--no-lazy", dest="lazy", action="store_false",
                        help="fail with EBUSY instead of detaching a mount with open files")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        unmount(args.mountpoint, lazy=args.lazy)
    except (UnmountError, OSError) as exc:
        print(f"igtcache unmount: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
