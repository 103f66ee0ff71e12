"""What a daemon checks before it serves: the socket's directory and lock file, its
file-descriptor limit, and its budgets against this machine.

Each check fails with a ``StartError`` whose message says what is wrong and
what to do, so that ``igtcache serve`` exits with one line, never a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import stat
from pathlib import Path
from typing import BinaryIO

from igtcache.peercred import user_name
from igtcache.sizes import format_size

log = logging.getLogger("igtcache.daemon")

#: Descriptors kept out of ``--max-connections``' share for the caches (LMDB, remote connections,
#: the trace files) and the metrics port; a quarter of the limit where that is less.
RESERVED_FDS = 256
#: Most connections served at once unless ``--max-connections`` says otherwise.
DEFAULT_MAX_CONNECTIONS = 1024


class StartError(RuntimeError):
    """The daemon cannot start; the message says why and what to do."""


def check_socket_dir(directory: Path) -> None:
    """Refuse a socket directory where another user could replace the socket.

    The directory must be a real directory (not a symlink) owned by this user
    or root, and neither it nor any directory above it may be writable by
    others unless sticky (like ``/tmp``), where only an entry's owner may
    rename or remove it.
    """
    info = directory.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise StartError(f"socket directory {directory} is a symlink; give --socket a path in a real directory")
    me = os.geteuid()
    resolved = directory.resolve()
    for place in (resolved, *resolved.parents):
        info = place.stat()
        what = f"socket directory {place}" if place == resolved else f"{place} (above socket directory {resolved})"
        if info.st_uid not in (me, 0):
            raise StartError(f"{what} belongs to {user_name(info.st_uid)}, who could replace the socket; "
                             f"choose a --socket in a directory owned by {user_name(me)} or root")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            raise StartError(
                f"{what} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}): any of them could "
                f"replace the socket and answer your clients. Use a directory only {user_name(me)} can write "
                f"(chmod go-w {place}, or a --socket under $XDG_RUNTIME_DIR), or a sticky one owned by "
                f"{user_name(me)} or root, such as /tmp")


def open_lock_file(path: Path) -> BinaryIO:
    """Open (or create, mode 0600) the socket's lock file without following a link planted there.

    It must be a regular file of this user's with no other name (a hard link to
    another file would be truncated when the lock is taken). Nothing is written
    to it here: the caller truncates it only once it holds the lock.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StartError(f"lock file {path} is a symbolic link; a daemon never makes one. Remove it "
                             f"(rm {path}) and start again") from None
        raise StartError(f"cannot open lock file {path}: {exc.strerror}") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to {user_name(info.st_uid)}, not {user_name(os.geteuid())}"
    elif info.st_nlink != 1:
        problem = f"has {info.st_nlink} names (hard links)"
    if problem:
        os.close(fd)
        raise StartError(f"lock file {path} {problem}; a daemon never makes such a file. "
                         f"Remove it (rm {path}) and start again")
    os.set_blocking(fd, True)
    return open(fd, "r+b", buffering=0)  # unbuffered: a full disk fails the write, not a later close


def raise_nofile_limit() -> int:
    """Raise the soft limit on open files to the hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(requested: int | None, nofile: int) -> int:
    """How many connections to serve at once: ``requested`` if the descriptors allow, else the
    default (``DEFAULT_MAX_CONNECTIONS`` or what the limit leaves after the caches' share)."""
    reserve = min(RESERVED_FDS, nofile // 4)
    room = nofile - reserve
    if requested is None:
        if room < 1:
            raise StartError(f"the open-file limit ({nofile}) leaves no room for connections; "
                             "raise it (ulimit -n, LimitNOFILE= in a systemd unit)")
        return min(DEFAULT_MAX_CONNECTIONS, room)
    if requested > room:
        raise StartError(f"--max-connections {requested} needs {requested + reserve} open files, and this daemon "
                         f"may open {nofile} (its hard limit); lower --max-connections to at most {max(room, 0)} "
                         "or raise the limit (ulimit -Hn, LimitNOFILE= in a systemd unit)")
    return requested


def check_memory(memory_bytes: int, inflight_bytes: int) -> None:
    """Refuse memory tiers (``memory_bytes``, all remotes') larger than this machine's RAM; warn when
    they and the responses in flight together may not fit."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    if memory_bytes > ram:
        raise StartError(f"--memory {format_size(memory_bytes)} is more than this machine's RAM "
                         f"({format_size(ram)}); give at most that, less what jobs need")
    if memory_bytes + inflight_bytes > ram:
        log.warning("--memory %s plus --max-inflight %s is more than this machine's RAM (%s)",
                    format_size(memory_bytes), format_size(inflight_bytes), format_size(ram))


def check_disk(cache_dirs: dict[str, int]) -> None:
    """Refuse disk tiers that cannot fit on their file system; warn when they may fill it.

    ``cache_dirs`` maps each remote's cache directory to its disk budget. Budgets on one
    file system add up; what a cache already holds there counts as room.
    """
    by_device: dict[int, list[tuple[str, int]]] = {}
    for path, budget in cache_dirs.items():
        existing = _existing(Path(path))
        by_device.setdefault(os.stat(existing).st_dev, []).append((path, budget))
    for tiers in by_device.values():
        first = tiers[0][0]
        fs = os.statvfs(_existing(Path(first)))
        total, free = fs.f_frsize * fs.f_blocks, fs.f_frsize * fs.f_bavail
        wanted = sum(budget for _path, budget in tiers)
        held = sum(_bytes_under(Path(path)) for path, _budget in tiers)
        where = ", ".join(path for path, _budget in tiers)
        if wanted > total:
            raise StartError(f"--disk {format_size(wanted)} for {where} is more than its whole file system "
                             f"({format_size(total)}, {format_size(free)} free); give at most the free space, "
                             "or another --cache-dir")
        if wanted > free + held:
            log.warning("--disk %s for %s is more than the %s free there (plus %s the cache already holds); "
                        "when the file system fills, the disk tier stops storing and reads go to the remote",
                        format_size(wanted), where, format_size(free), format_size(held))


def bind_metrics(host: str, port: int) -> socket.socket:
    """The listening TCP socket for ``--metrics-port``, bound now so that a bad address is a start error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StartError(f"--metrics-host {host!r} is not an address this machine can bind: {exc.strerror}") from None
    family, kind, proto, _name, address = infos[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        listener.listen(64)
    except OSError as exc:
        listener.close()
        hint = "another process listens there; choose another --metrics-port" if exc.errno == errno.EADDRINUSE \
            else "choose another --metrics-host or --metrics-port"
        raise StartError(f"cannot serve metrics on {host}:{port}: {exc.strerror}; {hint}") from None
    listener.setblocking(False)
    return listener


def _existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists."""
    while not path.exists():
        path = path.parent
    return path


def _bytes_under(path: Path) -> int:
    """Bytes allocated to the files under ``path`` (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def share_disk_tier(directory: Path, socket_mode: int, group: int | None) -> None:
    """Give a disk tier (``directory``, in the daemon's cache directory) the access its socket gives: whoever may use the daemon may read its blocks
    in their own process (``igtcache.short_circuit``), nobody else. A class of users (group, others)
    that may write the socket may traverse the tier's directories, read its data file and write its
    lock file (LMDB readers register there); a class that may not gets no access at all.
    """
    def widen(owner_bits: int, read: int, write: int) -> int:
        mode = owner_bits
        for shift in (3, 0):  # group, others
            if socket_mode & (0o2 << shift):
                mode |= (read | write) << shift
        return mode

    lmdb_dir = directory / "blocks.lmdb"
    traverse = widen(0o700, 0o5, 0)
    for path, mode in ((directory.parent, traverse), (directory, traverse), (lmdb_dir, traverse),
                       (lmdb_dir / "data.mdb", widen(0o600, 0o4, 0)), (lmdb_dir / "lock.mdb", widen(0o600, 0o4, 0o2))):
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
