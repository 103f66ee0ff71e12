"""``igtcache mount REMOTE MOUNTPOINT``: the cache as a file system.

Training code that only knows paths reads through the cache unchanged.
Without ``--foreground`` the command returns once the mount is ready and a
detached process serves it; ``igtcache unmount MOUNTPOINT`` ends it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import subprocess
import sys
import time
from typing import Any

from igtcache.cli_advice import remote_advice, socket_advice
from igtcache.policies import LIVE_POLICIES
from igtcache.sizes import size_argument

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0  # seconds a background mount may take to come up

EPILOG = """\
backends:
  By default the mount attaches to the node daemon when one answers on the
  default socket ($IGTCACHE_SOCKET, else under $XDG_RUNTIME_DIR or /tmp) and
  serves REMOTE (named as the daemon names it, or by URL); else it runs the
  cache engine in the mount process, as --embedded does. With the daemon, the
  cache options below are the daemon's own business and are ignored.

consistency:
  The mount keeps directory listings for --ttl seconds and lets the kernel keep
  names and attributes for --ttl more: a change on the remote shows up in
  listings and sizes within 2 x --ttl. The engine revalidates an object's
  version after --ttl and never serves bytes of an old version once it has; a
  file opened after that does not reuse the old version's pages either.

writes (--writable):
  A file opened for writing is staged in a local temporary file and uploaded
  whole when it is closed (or fsync'ed); close() reports a failed upload as EIO.
  The cache's copy is then invalidated. Other readers see the new object after
  the upload (and, through other mounts, after their --ttl). Concurrent writers
  of one file: the last close wins. No mkdir, rename or unlink. A writable
  mount runs the engine itself (the daemon takes no uploads).

throughput:
  --readahead (the kernel's readahead window; setting it needs root) matters
  most: it decides both the size of the requests a sequential reader causes
  (up to 1 MiB; the kernel's default 128 KiB window gives 128 KiB requests)
  and how many are in flight at once on the mount's 16 worker threads. Re-reads
  of unchanged files come from the page cache at local-file speed.
  --direct-io sends each read() as one request of up to 1 MiB and bypasses the
  page cache; with no readahead a sequential reader then waits on each request,
  and shared mmap() is refused (ENODEV): for large one-off reads only.
  Requests are at most 1 MiB (libfuse 3 and the kernel's max_pages_limit),
  and the kernel moves FUSE data through the page cache 4 KiB at a time: on
  cached data the limit is that path, not the cache (docs/architecture.md).
  `igtcache bench fuse` measures both modes next to a local file and next to
  the same mount over a backend whose reads cost nothing.

examples:
  igtcache mount s3://bucket/datasets /mnt/data --cache-dir /var/cache/igtcache --disk 200GiB
  igtcache mount file:///nfs/data /mnt/data --embedded --memory 8GiB --foreground
  igtcache unmount /mnt/data
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igtcache mount", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("remote", metavar="REMOTE", help="s3://bucket/prefix, file:///data, or any fsspec URL")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--daemon", metavar="SOCKET", help="use the node daemon listening on SOCKET")
    where.add_argument("--embedded", action="store_true", help="run the cache engine inside the mount process")
    parser.add_argument("--foreground", "-f", action="store_true",
                        help="serve in this process until unmounted or SIGINT/SIGTERM")
    parser.add_argument("--allow-other", action="store_true",
                        help="let other users read the mount (non-root needs user_allow_other in /etc/fuse.conf)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--read-only", dest="writable", action="store_false", help="refuse writes with EROFS (default)")
    mode.add_argument("--writable", dest="writable", action="store_true",
                      help="upload files written through the mount when they are closed (see below)")
    parser.set_defaults(writable=False)
    parser.add_argument("--direct-io", action="store_true", help="bypass the page cache (see below)")
    parser.add_argument("--readahead", type=size_argument, default="8MiB",
                        help="kernel readahead window for sequential reads (default 8MiB)")
    parser.add_argument("--ttl", type=float, default=30.0, help="seconds metadata may be stale (default 30)")
    parser.add_argument("--log", metavar="FILE", help="where a background mount logs (default: nowhere)")
    parser.add_argument("--debug", action="store_true", help="log every FUSE request (libfuse -d)")
    cache = parser.add_argument_group("embedded cache options")
    cache.add_argument("--cache-dir", help="disk tier directory (default: memory only)")
    cache.add_argument("--memory", type=size_argument, default="512MiB", help="memory tier (default 512MiB)")
    cache.add_argument("--disk", type=size_argument, default="10GiB", help="disk tier (default 10GiB)")
    cache.add_argument("--block-size", type=size_argument, default="4MiB", help="cache block size (default 4MiB)")
    cache.add_argument("--policy", default="igt", choices=LIVE_POLICIES, help="eviction policy (default igt)")
    cache.add_argument("--retries", type=int, default=3, help="attempts per remote request (default 3)")
    cache.add_argument("--timeout", type=float, default=30.0, help="seconds per remote attempt (default 30)")
    cache.add_argument("--storage-options", type=json.loads, default=None, metavar="JSON",
                       help='fsspec options for REMOTE, e.g. \'{"anon": true}\'')
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # set by a background mount's parent
    return parser


class MountError(RuntimeError):
    """A mount could not be set up; the message says why."""


def start_background(argv: list[str], timeout: float = READY_TIMEOUT) -> subprocess.Popen:
    """Run ``igtcache mount ARGV --foreground`` in a detached process and return
    it once the mount is ready. Raises ``MountError`` with the process's error
    output if it fails or is not ready within ``timeout`` seconds."""
    ready_r, ready_w = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-m", "igtcache.fuse.cli", *argv, "--foreground", "--ready-fd", str(ready_w)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        pass_fds=(ready_w,), start_new_session=True,
        # OpenBLAS (under the engine's numpy) would otherwise keep threads spinning next to the FUSE workers.
        env={"OPENBLAS_NUM_THREADS": "1", **os.environ},
    )
    os.close(ready_w)
    errors, ready = b"", b""
    deadline = time.monotonic() + timeout
    open_fds = {ready_r, child.stderr.fileno()}
    try:
        while open_fds and time.monotonic() < deadline:
            readable, _, _ = select.select(list(open_fds), [], [], max(0.0, deadline - time.monotonic()))
            for fd in readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.discard(fd)
                elif fd == ready_r:
                    ready += chunk
                else:
                    errors += chunk
            if ready.endswith(b"\n"):
                return child
    finally:
        os.close(ready_r)
        child.stderr.close()
    if open_fds:  # neither ready nor gone
        child.kill()
        child.wait()
        reason = f"not ready after {timeout:.0f} s"
    else:  # it closed both pipes: it is exiting
        reason = f"exit status {child.wait()}"
    raise MountError(f"mount failed ({reason}): {errors.decode(errors='replace').strip() or 'no error output'}")


def _daemon_client(args):
    """A client of the node daemon for REMOTE, or None for an embedded cache.

    ``--daemon`` must work or the mount fails. Without it, a daemon found at
    the default socket is used when it serves REMOTE (by name or URL); else
    the mount warns and runs the engine itself, as it does for ``--writable``
    (the daemon takes no uploads). A REMOTE given by URL with
    ``--storage-options`` must also be the daemon's remote under those
    options: the same endpoint and credentials (``igtcache.remote_identity``)."""
    if args.embedded or (args.writable and args.daemon is None):
        return None
    from igtcache.daemon.config import default_socket_path
    from igtcache.daemon_client import DaemonClient, DaemonError

    socket_path = args.daemon or default_socket_path()
    if args.daemon is None and not os.path.exists(socket_path):
        return None
    try:
        client = DaemonClient(socket_path)
        name = _served_as(client.remotes, args.remote)
        if name is None:
            client.close()
            served = ", ".join(f"{n}={r['url']}" for n, r in sorted(client.remotes.items()))
            raise MountError(f"the daemon at {socket_path} does not serve {args.remote} (it serves {served})")
        if name != args.remote and args.storage_options is not None:
            reason = _not_the_same(client.remotes[name], args.remote, args.storage_options)
            if reason is not None:
                client.close()
                raise MountError(f"the daemon at {socket_path} serves {args.remote} as {name!r}, but {reason}")
        return client.for_remote(name)
    except (DaemonError, MountError) as exc:
        if args.daemon is not None:
            advice = socket_advice(socket_path, "--daemon") if isinstance(exc, DaemonError) else None
            fallback = "mount with --embedded to run the cache in the mount process"
            raise MountError(f"{exc}; {advice}; or {fallback}" if advice else f"{exc}; {fallback}") from None
        log.warning("%s; running the cache in the mount process instead", exc)
        return None


def _not_the_same(served: dict[str, Any], url: str, storage_options: dict) -> str | None:
    """Why the daemon's remote ``served`` is not ``url`` under ``storage_options``; None if it is."""
    from igtcache.remote import Remote
    from igtcache.remote_identity import credentials_identity, mismatch

    remote = Remote.from_url(url, storage_options)
    return mismatch(served, remote.identity, credentials_identity(remote.fs))


def _served_as(remotes: dict[str, dict[str, Any]], remote: str) -> str | None:
    """The daemon's name for ``remote`` (given as a name or as a URL)."""
    if remote in remotes:
        return remote
    for name, served in remotes.items():
        if served["url"].rstrip("/") == remote.rstrip("/"):
            return name
    return None


def _backend(args) -> tuple[Any, Any]:
    """(backend, uploader or None) for the parsed arguments."""
    client = _daemon_client(args)
    if client is not None:
        return client, None  # the daemon takes no uploads
    from igtcache import Cache, CacheDirInUse

    try:
        cache = Cache(
            args.remote, storage_options=args.storage_options, cache_dir=args.cache_dir,
            memory_bytes=args.memory, disk_bytes=args.disk, block_size=args.block_size,
            policy=args.policy, ttl=args.ttl, retries=args.retries, timeout=args.timeout,
        )
    except CacheDirInUse as exc:
        raise MountError(f"{exc}: stop that process, or give this mount another --cache-dir (or read through "
                         "the daemon that holds it, if that is one: drop --embedded)") from None

    def upload(path: str, local: str) -> None:
        cache.remote.fs.put_file(local, cache.remote.full_path(path))

    return cache, upload


def _check_remote(backend: Any, remote: str, through_daemon: bool) -> None:
    """Fail before mounting when REMOTE's root cannot be read (no credentials, a wrong endpoint,
    access denied), instead of mounting a file system whose every read is EIO. A missing root
    (an empty prefix) and a daemon that stops answering are left to the mount, as before."""
    from igtcache import RemoteError
    from igtcache.daemon_client import DaemonError

    try:
        backend.info("")
    except (FileNotFoundError, IsADirectoryError, DaemonError):
        return
    except (RemoteError, PermissionError, TimeoutError) as exc:
        raise MountError(f"cannot read {remote}: {exc}\n{remote_advice(remote, through_daemon)}") from None


def _ready_signal(args):
    """What to run once mounted: in a background mount, stop writing to the
    parent's pipe (logging goes to --log or nowhere), then tell it we are ready."""
    if args.ready_fd is None:
        return None

    def ready() -> None:
        target = os.open(args.log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(target, 1)
        os.dup2(target, 2)
        os.close(target)
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)

    return ready


def _serve(args) -> int:
    from igtcache.fuse.mount import CacheFS
    from igtcache.fuse.runner import serve

    if not os.path.isdir(args.mountpoint):
        raise MountError(f"mount point {args.mountpoint!r} is not a directory; mount on an existing empty "
                         f"directory (mkdir -p {args.mountpoint})")
    backend, uploader = _backend(args)
    try:
        if args.writable and uploader is None:
            raise MountError("--writable cannot go through the daemon (it takes no uploads); drop --daemon")
        _check_remote(backend, args.remote, through_daemon=uploader is None)
        ops = CacheFS(backend, ttl=args.ttl, writable=args.writable, uploader=uploader, direct_io=args.direct_io)
        serve(
            ops, os.path.abspath(args.mountpoint), read_only=not args.writable, allow_other=args.allow_other,
            readahead=args.readahead, fsname=f"igtcache:{args.remote}", debug=args.debug,
            on_ready=_ready_signal(args),
        )
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="igtcache mount: %(levelname)s: %(message)s")
    try:
        if not args.foreground:
            start_background(argv)
            return 0
        return _serve(args)
    except (MountError, RuntimeError, OSError, ValueError, ImportError) as exc:
        print(f"igtcache mount: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
