"""Errors people can act on: the real ``igtcache`` command, run as a user would, fails with a
message that names what was wrong and what to do, a non-zero status and no traceback."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
from typing import Callable

import pytest

from igtcache.daemon.process import DaemonProcess

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def run_cli(*args: str, env: dict[str, str] | None = None,
            preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """``python -m igtcache.cli ARGS`` as a user runs it, its output captured."""
    return subprocess.run([sys.executable, "-m", "igtcache.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, preexec_fn=preexec_fn, stdin=subprocess.DEVNULL)


def assert_actionable(result: subprocess.CompletedProcess, *advice: str) -> None:
    """Failed, with every piece of ``advice`` in its error output and no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    for text in advice:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"


def without_credentials(tmp_path) -> dict[str, str]:
    """This environment with no AWS credentials anywhere botocore looks (and no instance metadata)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
               AWS_CONFIG_FILE=str(tmp_path / "no-config"), HOME=str(tmp_path))
    return env


def _without_dac_override() -> None:
    """In the child, as root: give up the capabilities that let root connect to any socket."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def mountpoint(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    return str(path)


# ------------------------------------------------------------------ the daemon


def test_a_missing_daemon_says_how_to_start_one_or_name_its_socket(tmp_path, mountpoint):
    sock = str(tmp_path / "none.sock")
    assert_actionable(run_cli("stats", "--socket", sock), f"no igtcache daemon at {sock}", "igtcache serve",
                      "--socket or $IGTCACHE_SOCKET")
    assert_actionable(run_cli("mount", "data", mountpoint, "--daemon", sock, "--foreground"),
                      f"no igtcache daemon at {sock}", "igtcache serve", "--daemon or $IGTCACHE_SOCKET",
                      "--embedded")


def test_a_socket_without_permission_says_whom_to_ask(tmp_path, mountpoint):
    sock = str(tmp_path / "d.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock)
    listener.listen()
    os.chmod(sock, 0)
    preexec = _without_dac_override if os.geteuid() == 0 else None
    try:
        stats = run_cli("stats", "--socket", sock, preexec_fn=preexec)
        mount = run_cli("mount", "data", mountpoint, "--daemon", sock, "--foreground", preexec_fn=preexec)
    except subprocess.SubprocessError as exc:  # prctl refused: root here cannot give up its override
        pytest.skip(f"cannot run the command without root's file-permission override: {exc}")
    finally:
        listener.close()
    for result in (stats, mount):
        assert_actionable(result, "Permission denied", f"you may not connect to {sock}", "mode 0000",
                          "--socket-group GROUP")


def test_a_bad_daemon_timeout_in_the_environment_is_named(tmp_path):
    env = {**os.environ, "IGTCACHE_DAEMON_TIMEOUT": "soon"}
    assert_actionable(run_cli("stats", "--socket", str(tmp_path / "d.sock"), env=env),
                      "$IGTCACHE_DAEMON_TIMEOUT must be a number of seconds")


# ------------------------------------------------------------------ the remote


def test_a_mount_of_a_remote_without_credentials_says_which_to_give(tmp_path, mountpoint):
    result = run_cli("mount", "s3://igtcache-no-credentials/data", mountpoint, "--embedded", "--foreground",
                     "--retries", "1", env=without_credentials(tmp_path))
    assert_actionable(result, "cannot read s3://igtcache-no-credentials/data", "NoCredentialsError",
                      "$AWS_ACCESS_KEY_ID", "--storage-options")


def test_a_mount_through_a_daemon_without_credentials_says_to_fix_the_daemon(tmp_path, mountpoint):
    env = without_credentials(tmp_path)
    args = ["--remote", "data=s3://igtcache-no-credentials/data", "--memory", "8MiB", "--disk", "0"]
    with DaemonProcess(tmp_path / "run" / "d.sock", args, env=env) as daemon:
        result = run_cli("mount", "data", mountpoint, "--daemon", daemon.socket_path, "--foreground", env=env)
    assert_actionable(result, "cannot read data", "NoCredentialsError",
                      "the daemon reads data with its own credentials", "restart it", "--embedded")


# ------------------------------------------------------------------ the cache directory


@pytest.fixture
def daemon_holding(tmp_path):
    """A daemon serving ``file://REMOTE`` as ``data`` with its disk tier in CACHE/data."""
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "a.bin").write_bytes(b"a" * 1000)
    args = ["--remote", f"data=file://{remote}", "--cache-dir", str(tmp_path / "cache"),
            "--memory", "8MiB", "--disk", "16MiB"]
    with DaemonProcess(tmp_path / "run" / "d.sock", args) as daemon:
        daemon.remote, daemon.cache = remote, tmp_path / "cache"
        yield daemon


def test_a_mount_on_a_cache_dir_in_use_names_the_holder_and_the_way_out(daemon_holding, mountpoint):
    result = run_cli("mount", f"file://{daemon_holding.remote}", mountpoint, "--embedded", "--foreground",
                     "--cache-dir", str(daemon_holding.cache / "data"))
    assert_actionable(result, f"pid {daemon_holding.pid}", "another --cache-dir", "drop --embedded")


def test_a_second_daemon_on_a_cache_dir_in_use_says_what_to_do(daemon_holding, tmp_path):
    result = run_cli("serve", "--socket", str(tmp_path / "run2" / "d.sock"), "--remote",
                     f"data=file://{daemon_holding.remote}", "--cache-dir", str(daemon_holding.cache),
                     "--memory", "8MiB", "--disk", "16MiB")
    assert_actionable(result, f"pid {daemon_holding.pid}", "--cache-dir")


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("command, help_of", [
    (["serve", "--remote", "memory://x"], "serve"), (["stats"], "stats"), (["mount", "a", "b"], "mount"),
    (["cluster", "status"], "cluster"), (["bench", "engine"], "bench engine"),
])
def test_an_unknown_option_points_at_the_commands_help(command, help_of):
    assert_actionable(run_cli(*command, "--no-such-option"), "unrecognized arguments: --no-such-option",
                      f"`igtcache {help_of} --help`")


@pytest.mark.parametrize("args, advice", [
    (["serve", "--remote", "memory://x", "--memory", "3XB"], "expected e.g. 4096, 64KiB"),
    (["serve", "--remote", "memory://x", "--block-size", "1000"], "give a multiple of 4KiB from 4KiB to 64MiB"),
    (["serve"], "give --remote URL"),
    (["frobnicate"], "commands:"),
])
def test_a_bad_value_says_what_is_allowed(args, advice):
    assert_actionable(run_cli(*args), advice)


def test_a_missing_mount_point_says_to_create_it(tmp_path):
    missing = str(tmp_path / "nowhere")
    assert_actionable(run_cli("mount", "file:///", missing, "--embedded", "--foreground"),
                      f"mkdir -p {missing}")
