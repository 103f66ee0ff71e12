"""``igtcache warm`` against real daemons: over the local S3 server, and over a local directory
for a cache smaller than the dataset."""

from __future__ import annotations

import io
import json
import random
import re
import subprocess
import sys
import uuid

import pytest

from igtcache import warm as warm_cmd
from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import DaemonClient

from .conftest import BUCKET

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 256 * KiB


def _data(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


@pytest.fixture(scope="module")
def daemon(s3_server, tmp_path_factory):
    """A daemon serving a fresh prefix of the test bucket as remote ``data``, its cache larger than
    anything a test warms; ``root`` is that prefix."""
    root = f"{BUCKET}/warm-{uuid.uuid4().hex[:8]}"
    work = tmp_path_factory.mktemp("warm")
    args = ["--remote", f"data=s3://{root}", "--storage-options", json.dumps(s3_server.storage_options()),
            "--cache-dir", str(work / "cache"), "--memory", "16MiB", "--disk", "32MiB",
            "--block-size", str(BLOCK), "--max-read", "1MiB"]
    with DaemonProcess(work / "d.sock", args) as served:
        served.root = root
        served.fs = s3_server.filesystem()
        yield served


def _put(daemon, prefix: str, sizes: dict[str, int]) -> dict[str, bytes]:
    """Objects ``prefix/NAME`` of the given sizes on S3; name (relative to the remote) -> bytes."""
    objects = {f"{prefix}/{name}": _data(f"{prefix}/{name}", size) for name, size in sizes.items()}
    for name, data in objects.items():
        daemon.fs.pipe_file(f"{daemon.root}/{name}", data)
    return objects


def warm(daemon, *args: str) -> tuple[int, str, str]:
    """``igtcache warm --socket SOCKET ARGS`` in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    parsed = warm_cmd._parser().parse_args(["--socket", daemon.socket_path, *args])
    with DaemonClient(daemon.socket_path, short_circuit=False) as client:
        status = warm_cmd.run(parsed, client, out, err)
    return status, out.getvalue(), err.getvalue()


def held(daemon, names) -> dict[str, tuple[int, int]]:
    """name -> (bytes in memory, bytes on disk)."""
    with DaemonClient(daemon.socket_path, "data", short_circuit=False) as client:
        return {name: (r["memory"], r["disk"]) for name in names for r in [client.residency(name)]}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "igtcache.cli", "warm", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_warm_loads_everything_and_later_reads_are_hits(daemon):
    objects = _put(daemon, "full", {"a.bin": 3 * BLOCK + 123, "b.bin": 2 * MiB + 1, "sub/c.bin": 100 * KiB,
                                    "empty": 0})
    url = f"s3://{daemon.root}/full"
    status, out, _ = warm(daemon, url, "--recursive", "--check")
    assert status == 0
    assert "4 files" in out and "0 B (0.0%), 1 of 4 files whole" in out  # the empty one

    status, out, err = warm(daemon, url, "--recursive", "--parallel", "2")
    total = sum(map(len, objects.values()))
    assert status == 0, err
    assert re.search(rf"warmed {re.escape(url)}: 4 files, .* in [0-9.]+ s \(.*/s\): .* loaded, 0 B already cached",
                     out), out
    assert "4/4 files" in err and "(100%)" in err and "warning" not in err

    assert all(disk == len(objects[name]) for name, (_, disk) in held(daemon, objects).items())
    status, out, _ = warm(daemon, url, "-r", "--check", "--verbose")
    assert "4 of 4 files whole" in out and "(100.0%)" in out
    assert all(name in out for name in objects)

    with DaemonClient(daemon.socket_path, "data", short_circuit=False) as client:
        before = client.stats()
        for name, data in objects.items():
            assert client.read(name, 0, len(data)) == data
        after = client.stats()
    assert after["remote_bytes"] == before["remote_bytes"]
    assert after["hits"] > before["hits"] and after["misses"] == before["misses"]
    assert after["jobs"][warm_cmd.JOB]["bytes_requested"] >= total

    status, out, _ = warm(daemon, url, "-r")
    assert status == 0 and "0 B loaded" in out


def test_include_filters_and_recursive_descends(daemon):
    objects = _put(daemon, "mixed", {"a.parquet": 1000, "b.parquet": 2000, "c.json": 3000, "sub/d.parquet": 4000})
    url = f"s3://{daemon.root}/mixed"
    status, out, _ = warm(daemon, url, "--include", "*.parquet")
    assert status == 0 and "2 files" in out
    assert held(daemon, objects) == {"mixed/a.parquet": (1000, 1000), "mixed/b.parquet": (2000, 2000),
                                     "mixed/c.json": (0, 0), "mixed/sub/d.parquet": (0, 0)}
    status, out, _ = warm(daemon, "data:mixed", "-r", "--include", "sub/*")
    assert status == 0 and "1 file," in out and held(daemon, ["mixed/sub/d.parquet"])["mixed/sub/d.parquet"][1] == 4000


def test_evict_drops_the_prefix(daemon):
    objects = _put(daemon, "gone", {"x.bin": MiB, "y.bin": 5000})
    kept = _put(daemon, "kept", {"z.bin": 5000})
    assert warm(daemon, "data:gone")[0] == 0 and warm(daemon, "data:kept")[0] == 0
    status, out, _ = warm(daemon, "data:gone", "--evict")
    assert status == 0 and "dropped" in out and "2 files" in out
    assert held(daemon, objects) == {name: (0, 0) for name in objects}
    assert held(daemon, kept) == {"kept/z.bin": (5000, 5000)}
    assert "0 of 2 files whole" in warm(daemon, "data:gone", "--check")[1]


def test_a_file_failing_mid_warm_is_reported_and_the_rest_warmed(daemon, monkeypatch):
    objects = _put(daemon, "flaky", {"ok-1.bin": 5000, "vanishes.bin": 5000, "ok-2.bin": 5000})
    listed = warm_cmd.list_files

    def list_then_delete(*args, **kwargs):
        files = listed(*args, **kwargs)
        daemon.fs.rm_file(f"{daemon.root}/flaky/vanishes.bin")
        return files

    monkeypatch.setattr(warm_cmd, "list_files", list_then_delete)
    status, out, err = warm(daemon, "data:flaky")
    assert status == 1
    assert "failed: flaky/vanishes.bin" in err and "1 file failed" in out
    assert "warmed s3://" in out and "2 files" in out
    assert held(daemon, ["flaky/ok-1.bin", "flaky/ok-2.bin"]) == {n: (5000, 5000) for n in objects if "ok" in n}


def test_errors_name_what_to_do(daemon):
    _put(daemon, "some", {"a.json": 10, "deeper/b.json": 10})
    unknown = run_cli("--socket", daemon.socket_path, "s3://another-bucket/data")
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert len(unknown.stderr.splitlines()) == 1
    assert "serves no remote holding s3://another-bucket/data" in unknown.stderr
    assert f"data=s3://{daemon.root}" in unknown.stderr

    for args, message in [
        (("data:some", "--include", "*.parquet"), "holds no files matching *.parquet"),
        (("data:nothing-here",), "does not exist on the daemon's remote data"),
    ]:
        with pytest.raises(warm_cmd.WarmError, match=re.escape(message)):
            warm(daemon, *args)
    _put(daemon, "nested", {"only/inside.bin": 10})
    with pytest.raises(warm_cmd.WarmError, match="1 subdirectory: add --recursive"):
        warm(daemon, "data:nested")


def test_no_daemon_is_one_actionable_line(tmp_path):
    result = run_cli("--socket", str(tmp_path / "none.sock"), "s3://bucket/data")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "no igtcache daemon at" in result.stderr and "igtcache serve" in result.stderr


def test_a_warm_larger_than_the_cache_says_so_before_loading(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"part-{i}.bin").write_bytes(_data(str(i), MiB))
    args = ["--remote", f"local=file://{data}", "--cache-dir", str(tmp_path / "cache"), "--memory", "1MiB",
            "--disk", "2MiB", "--block-size", str(BLOCK), "--max-read", "1MiB"]
    with DaemonProcess(tmp_path / "d.sock", args) as daemon:
        seen: list[tuple[str, int]] = []

        class Recording(io.StringIO):
            def write(self, text: str) -> int:
                with DaemonClient(daemon.socket_path, short_circuit=False) as client:
                    seen.append((text, client.stats()["remote_bytes"]))
                return super().write(text)

        parsed = warm_cmd._parser().parse_args([f"file://{data}"])
        out = io.StringIO()
        with DaemonClient(daemon.socket_path, short_circuit=False) as client:
            status = warm_cmd.run(parsed, client, out, Recording())
    assert status == 0
    warning, remote_bytes = seen[0]
    assert remote_bytes == 0
    assert "larger than the node's cache" in warning and "3 MiB" in warning and "2 MiB" in warning
    assert "never evicts" in warning
    assert "not kept" in out.getvalue()  # the summary says how much did not fit
    assert "3/3 files" in "".join(text for text, _ in seen[1:])


def test_progress_shows_files_bytes_rate_and_eta():
    clock = iter([0.0, 1.0, 6.0, 7.0]).__next__
    stream = io.StringIO()
    progress = warm_cmd.Progress(4, 100, stream, tty=False, every=5.0, clock=clock)
    progress.add(10)
    assert stream.getvalue() == ""  # not yet five seconds
    progress.add(20, files=1)
    assert stream.getvalue() == "[######              ] 1/4 files, 30 B of 100 B (30%), 5 B/s, ETA 14 s\n"
    progress.note("a failure")
    assert stream.getvalue().endswith("a failure\n")

    ticks = iter([0.0, 0.5]).__next__
    tty = io.StringIO()
    progress = warm_cmd.Progress(1, 100, tty, tty=True, redraw=0.2, clock=ticks)
    progress.add(100, files=1)
    assert tty.getvalue().startswith("\r\x1b[K[####################] 1/1 files") and tty.getvalue().endswith("done")


def test_capacity_is_the_disk_tier_where_there_is_one():
    memory = {"bytes": 0, "blocks": 0, "capacity": 4 * MiB}
    assert warm_cmd.node_capacity({"tiers": {"memory": memory}}) == 4 * MiB
    assert warm_cmd.node_capacity({"tiers": {"memory": memory, "disk": {**memory, "capacity": 64 * MiB}}}) == 64 * MiB
    assert warm_cmd.capacity_warning(64 * MiB, 64 * MiB) is None
