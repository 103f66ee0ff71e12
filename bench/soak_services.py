"""The processes and mounts a soak runs against, each one that can be taken away and brought back.

- ``MotoProcess``: moto's S3 server as a child process on a fixed port of
  127.0.0.1 (moto keeps objects in memory: a restarted server is empty);
- ``DaemonRig``: ``igtcache serve`` on one remote, restarted with the same or
  another block size;
- ``mount_tmpfs``/``mount_fuse``: a small tmpfs (a file system that can fill
  up) and an ``igtcache mount`` of the daemon.

Everything started here is handed to a ``contextlib.ExitStack`` to undo.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from igtcache.daemon.process import DaemonProcess
from igtcache.local_s3 import free_port

REMOTE = "data"  # the bucket's name on the daemon


class MotoProcess:
    """moto's S3 server in its own process, so that it can be killed and started again on the same port."""

    def __init__(self, log_path: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start it and return once it answers; ``RuntimeError`` if it does not within ``timeout``."""
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto exited with {self._process.returncode}; log: {self.log_path}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"moto did not answer on {self.endpoint} within {timeout:.0f} s")

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def storage_options(self) -> dict[str, Any]:
        """s3fs options for this server: dummy credentials, short timeouts, no retries of s3fs's own."""
        return {
            "key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            "config_kwargs": {"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 1}},
        }

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 3}))


class DaemonRig:
    """``igtcache serve`` of ``s3://BUCKET`` as remote ``data``: started, killed, stopped cleanly,
    and started again, with its block size changed at will."""

    def __init__(self, socket_path: str, cache_dir: str, bucket: str, storage_options: dict[str, Any],
                 *, block_size: int, ttl: float, memory: int, disk: int) -> None:
        self.socket_path = socket_path
        self.cache_dir = cache_dir
        self.block_size = block_size
        self._base = ["--remote", f"{REMOTE}=s3://{bucket}", "--storage-options", json.dumps(storage_options),
                      "--cache-dir", cache_dir, "--memory", str(memory), "--disk", str(disk),
                      "--ttl", str(ttl), "--grace", "1", "--log-level", "warning"]
        self.process: DaemonProcess | None = None
        self._logs: list[str] = []

    def start(self, block_size: int | None = None, timeout: float = 30.0) -> None:
        """Start it (with ``block_size`` from now on, if given) and return once it answers."""
        if block_size is not None:
            self.block_size = block_size
        self.process = DaemonProcess(self.socket_path, [*self._base, "--block-size", str(self.block_size)])
        self._logs.append(self.process.log_path)
        self.process.start(timeout)

    def kill(self) -> None:
        """``kill -9``."""
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        """SIGTERM: a clean shutdown (killed if it takes over 30 s)."""
        if self.process is not None:
            self.process.stop(timeout=30)

    def running(self) -> bool:
        return self.process is not None and self.process.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The end of the current daemon's log."""
        return "\n".join(self.process.log().splitlines()[-lines:]) if self.process else ""

    def logged_errors(self, limit: int = 5) -> list[str]:
        """The first ``limit`` distinct errors any of its runs logged, each with its traceback."""
        found: dict[str, str] = {}
        for path in self._logs:
            for block in _error_blocks(Path(path).read_text(errors="replace")):
                found.setdefault(block.splitlines()[-1], block)
        return list(found.values())[:limit]

    def close(self) -> None:
        self.kill()
        for path in self._logs:
            Path(path).unlink(missing_ok=True)


def _error_blocks(log: str) -> list[str]:
    """Each ``ERROR`` record of a daemon log with the lines that follow it (its traceback)."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in log.splitlines():
        if ": ERROR: " in line:
            current = [line]
            blocks.append(current)
        elif current is not None and not line.startswith("igtcache: "):
            current.append(line)
        else:
            current = None
    return ["\n".join(block) for block in blocks]


def mount_tmpfs(path: str, size: str, stack: contextlib.ExitStack) -> str | None:
    """Mount a tmpfs of ``size`` at ``path`` (unmounted when ``stack`` closes); ``None``, or why not."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"mount -t tmpfs failed: {done.stderr.strip() or done.returncode}"
    stack.callback(subprocess.run, ["umount", "-l", path], capture_output=True)
    return None


def mount_fuse(socket_path: str, mountpoint: str, ttl: float, stack: contextlib.ExitStack) -> str | None:
    """``igtcache mount`` the daemon's remote at ``mountpoint`` (unmounted when ``stack`` closes);
    ``None``, or why it cannot be mounted here."""
    from igtcache.fuse.available import fuse_unusable

    why = fuse_unusable()
    if why:
        return why
    from igtcache.fuse.cli import MountError, start_background
    from igtcache.fuse.unmount import UnmountError, unmount

    try:
        process = start_background([REMOTE, mountpoint, "--daemon", socket_path, "--ttl", str(ttl),
                                    "--readahead", "256KiB"], timeout=60)
    except MountError as exc:
        return str(exc)

    def take_down() -> None:
        with contextlib.suppress(UnmountError, OSError):
            unmount(mountpoint)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    stack.callback(take_down)
    return None


def work_dir(stack: contextlib.ExitStack) -> str:
    """A temporary directory removed when ``stack`` closes (after what is mounted in it)."""
    path = tempfile.mkdtemp(prefix="igtcache-soak-")
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path
