"""The FUSE caches users run today, mounted over an S3 server for the benchmarks to read next to ``igtcache mount``.

- ``rclone``: ``rclone mount --vfs-cache-mode full`` (whole files cached on
  local disk as they are read);
- ``s3fs``: s3fs-fuse with ``-o use_cache`` (whole files downloaded to a
  local directory on open).

Both are Debian packages (``apt-get install rclone s3fs``). ``mount_peer``
starts one in the foreground as a child process, returns once the kernel
lists the mount, and on leaving unmounts it (``fusermount3 -u``, lazily if
busy) and waits for the process to exit, killing it if it does not. A mount
that never comes up is killed and reported with the end of its log. The
server's credentials are the benchmarks' dummy ones (``testing``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from igtcache.fuse.available import fuse_unusable
from igtcache.fuse.unmount import UnmountError, is_mounted, unmount

PEERS = ("rclone", "s3fs")
#: What each peer is in a table of results.
LABELS = {"rclone": "rclone mount --vfs-cache-mode full", "s3fs": "s3fs-fuse -o use_cache"}
KEY = SECRET = "testing"
READY_TIMEOUT = 30.0  # seconds a peer may take to mount
EXIT_TIMEOUT = 15.0  # seconds a peer may take to exit once unmounted


class PeerMountError(RuntimeError):
    """A peer did not mount; the message has the end of its log."""


def peer_unusable(peer: str) -> str | None:
    """Why ``peer`` cannot be mounted here, or ``None`` if it can."""
    if (why := fuse_unusable()) is not None:
        return why
    if shutil.which(peer) is None:
        return f"{peer} is not installed (apt-get install {peer})"
    return None


def _rclone(endpoint: str, bucket: str, mountpoint: str, cache_dir: str,
            cache_bytes: int | None) -> tuple[list[str], dict[str, str]]:
    """rclone's command line and environment (its S3 remote ``M`` is configured through the environment)."""
    # with AWS_CA_BUNDLE set, rclone fails (LoadCustomCABundleError) before it reaches the server
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env.update({"RCLONE_CONFIG_M_TYPE": "s3", "RCLONE_CONFIG_M_PROVIDER": "Other",
                "RCLONE_CONFIG_M_ACCESS_KEY_ID": KEY, "RCLONE_CONFIG_M_SECRET_ACCESS_KEY": SECRET,
                "RCLONE_CONFIG_M_ENDPOINT": endpoint, "RCLONE_CONFIG_M_FORCE_PATH_STYLE": "true"})
    command = ["rclone", "mount", f"m:{bucket}", mountpoint, "--vfs-cache-mode", "full",
               "--cache-dir", cache_dir, "--read-only", "--config", "/dev/null"]
    if cache_bytes is not None:
        # rclone trims its cache to the bound once per poll (default a minute): poll often enough to hold it.
        # A size without a unit is KiB to rclone.
        command += ["--vfs-cache-max-size", f"{cache_bytes}B", "--vfs-cache-poll-interval", "1s"]
    return command, env


def _s3fs(endpoint: str, bucket: str, mountpoint: str, cache_dir: str,
          cache_bytes: int | None) -> tuple[list[str], dict[str, str]]:
    """s3fs-fuse's command line and environment. Its cache has no size bound, so ``cache_bytes`` is not used."""
    passwd = Path(cache_dir).parent / "s3fs.passwd"
    passwd.touch(mode=0o600)  # s3fs refuses a credentials file that others can read
    passwd.write_text(f"{KEY}:{SECRET}\n")
    command = ["s3fs", bucket, mountpoint, "-f", "-o", f"url={endpoint}", "-o", "use_path_request_style",
               "-o", f"passwd_file={passwd}", "-o", f"use_cache={cache_dir}", "-o", "ro"]
    return command, dict(os.environ)


COMMANDS = {"rclone": _rclone, "s3fs": _s3fs}


@contextlib.contextmanager
def mount_peer(peer: str, endpoint: str, bucket: str, mountpoint: str | os.PathLike, workdir: str | os.PathLike,
               *, cache_bytes: int | None = None) -> Iterator[str]:
    """Mount ``bucket`` of the S3 server at ``endpoint`` with ``peer`` at ``mountpoint`` (an existing empty
    directory) for the ``with`` block; yields the mountpoint.

    The peer's cache and log live under ``workdir``. ``cache_bytes`` bounds
    rclone's cache (s3fs-fuse has no such bound). Raises ``PeerMountError``
    if it does not mount within ``READY_TIMEOUT`` seconds.
    """
    mountpoint, workdir = os.fspath(mountpoint), Path(workdir)
    cache_dir = workdir / f"{peer}-cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    command, env = COMMANDS[peer](endpoint, bucket, mountpoint, str(cache_dir), cache_bytes)
    log_path = workdir / f"{peer}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True)
    try:
        _wait_mounted(process, mountpoint, log_path)
        yield mountpoint
    finally:
        _stop(process, mountpoint)


def _wait_mounted(process: subprocess.Popen, mountpoint: str, log_path: Path) -> None:
    """Return once ``mountpoint`` is mounted; ``PeerMountError`` if ``process`` exits or times out first."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not is_mounted(mountpoint):
        if process.poll() is not None:
            reason = f"exit status {process.returncode}"
        elif time.monotonic() > deadline:
            process.kill()
            reason = f"not mounted after {READY_TIMEOUT:.0f} s"
        else:
            time.sleep(0.05)
            continue
        raise PeerMountError(f"{process.args[0]} did not mount ({reason}): {_tail(log_path)}")


def _stop(process: subprocess.Popen, mountpoint: str) -> None:
    """Unmount ``mountpoint`` if mounted and see ``process`` exit (it does once unmounted), killing it if it
    lingers."""
    with contextlib.suppress(UnmountError):
        if is_mounted(mountpoint):
            unmount(mountpoint)
    try:
        process.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(log_path: Path, lines: int = 5) -> str:
    """The last ``lines`` lines of a peer's log, or a note that it wrote none."""
    text = log_path.read_text(errors="replace").strip()
    return " | ".join(text.splitlines()[-lines:]) or "no output"
