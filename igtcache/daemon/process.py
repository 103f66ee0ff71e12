"""``igtcache serve`` as a child process, for tests, benchmarks and scripts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from igtcache.daemon.protocol import DaemonError
from igtcache.daemon_client import DaemonClient


class DaemonProcess:
    """A daemon started with ``igtcache serve --socket SOCKET ARGS...``; ``start()`` returns once it answers.

    Its log (stderr) goes to a temporary file, read with ``log()``. Use it as a
    context manager, or call ``stop()``/``kill()``: a daemon is never left behind.
    ``preexec`` runs in the child before the daemon starts (e.g. to lower a limit).
    """

    def __init__(self, socket_path: str | os.PathLike, args: list[str], env: dict[str, str] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        self.socket_path = os.fspath(socket_path)
        self.args = list(args)
        self.env = env
        self.preexec = preexec
        self.process: subprocess.Popen | None = None
        fd, self.log_path = tempfile.mkstemp(prefix="igtcache-serve-", suffix=".log")
        os.close(fd)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _spawn(self) -> None:
        command = [sys.executable, "-m", "igtcache.cli", "serve", "--socket", self.socket_path, *self.args]
        with open(self.log_path, "ab") as log:  # appending: the child's writes never overwrite each other
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                                            preexec_fn=self.preexec)

    def start(self, timeout: float = 60.0) -> "DaemonProcess":
        """Start it and wait until it serves; ``RuntimeError`` with its log if it exits or never answers."""
        self._spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"igtcache serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                with DaemonClient(self.socket_path, short_circuit=False) as client:
                    if client.health()["pid"] == self.process.pid:
                        return self
            except (DaemonError, ValueError):
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"igtcache serve did not answer within {timeout:.0f} s:\n{self.log()}")

    def run_to_exit(self, timeout: float = 60.0) -> int:
        """Run a daemon expected to refuse to start; its exit status."""
        self._spawn()
        return self.process.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal it and wait for it to exit; its exit status (killed if it outlives ``timeout``)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """``kill -9``, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        """Everything the daemon has written to stdout and stderr so far."""
        with open(self.log_path, "rb") as log:
            return log.read().decode(errors="replace")

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
        Path(self.log_path).unlink(missing_ok=True)
