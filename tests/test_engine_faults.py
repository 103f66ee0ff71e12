"""Error types, remote faults against a real S3 server, consistency, and many threads."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from igtcache import Cache, RemoteError

from igtcache.local_s3 import LocalS3
from .helpers import ManualClock, file_remote, in_threads, memory_remote

BLOCK = 64 * 1024


def test_bad_ranges_and_paths_raise_value_error(tmp_path):
    remote = memory_remote()
    remote.put("f", b"0123456789")
    with Cache(**remote.cache_args()) as cache:
        with pytest.raises(ValueError, match="offset"):
            cache.read("f", -1, 5)
        with pytest.raises(ValueError, match="size"):
            cache.read("f", 0, -2)
        with pytest.raises(ValueError, match="escapes"):
            cache.read("../etc/passwd")
        with pytest.raises(TypeError):
            cache.read("f", 0.5, 1)


def test_huge_range_returns_what_exists():
    remote = memory_remote()
    remote.put("f", b"abc")
    with Cache(**remote.cache_args()) as cache:
        assert cache.read("f", 1, 1 << 62) == b"bc"


def test_missing_object_and_directory(s3):
    fs, prefix = s3
    fs.pipe(f"{prefix}/dir/obj", b"x")
    with Cache(fs, root=prefix) as cache:
        with pytest.raises(FileNotFoundError):
            cache.read("nope")
        with pytest.raises(FileNotFoundError):
            cache.info("dir/nope")
        with pytest.raises(IsADirectoryError):
            cache.read("dir")


@pytest.mark.skipif(not hasattr(os, "setuid"), reason="needs POSIX users")
def test_denied_object_raises_permission_error(tmp_path):
    """A file the reading user may not open: run as 'nobody' when we are root."""
    remote = file_remote(tmp_path)
    remote.put("secret", b"s")
    os.chmod(f"{remote.root}/secret", 0)
    os.chmod(tmp_path, 0o755)
    script = textwrap.dedent(f"""
        import os, pwd, fsspec
        from igtcache import Cache  # import before dropping privileges: /root is closed to nobody
        if os.getuid() == 0:
            os.setuid(pwd.getpwnam("nobody").pw_uid)
        with Cache(fsspec.filesystem("file"), root={remote.root!r}) as cache:
            try:
                cache.read("secret")
            except PermissionError:
                print("PermissionError")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "PermissionError", out.stderr


def test_object_overwritten_on_remote_is_never_served_stale_after_ttl(s3):
    fs, prefix = s3
    old, new = b"A" * (3 * BLOCK), b"B" * (3 * BLOCK + 5)
    fs.pipe(f"{prefix}/obj", old)
    clock = ManualClock()
    with Cache(fs, root=prefix, block_size=BLOCK, ttl=30, clock=clock) as cache:
        assert cache.read("obj") == old
        fs.pipe(f"{prefix}/obj", new)
        clock.advance(29)
        assert cache.read("obj", BLOCK - 2, 4) == b"AAAA"  # within the TTL the known version is served
        clock.advance(2)
        assert cache.read("obj", BLOCK - 2, 4) == b"BBBB"
        assert cache.read("obj") == new
        assert cache.info("obj")["size"] == len(new)


def test_a_directory_due_for_revalidation_is_listed_once_not_stat_per_read(s3):
    """Re-reading a dataset after its TTL: the first read stats its object and lists the directory in the
    background; the other reads then need no stat, and a change the listing saw is served at once."""
    fs, prefix = s3
    files = {f"ds/{i:03d}": bytes([i]) * 1000 for i in range(24)}
    fs.pipe({f"{prefix}/{name}": data for name, data in files.items()})
    clock = ManualClock()
    with Cache(fs, root=prefix, block_size=BLOCK, ttl=2.0, clock=clock) as cache:
        for name, data in files.items():
            assert cache.read(name) == data
        fs.pipe(f"{prefix}/ds/007", b"changed")
        clock.advance(2.1)
        stats = []
        real_info = cache.remote.info
        cache.remote.info = lambda path: (stats.append(path), real_info(path))[1]  # counts the real remote's stats
        assert cache.read("ds/000") == files["ds/000"]
        cache._revalidator.submit(lambda: None).result(timeout=30)  # the listing has finished
        for name, data in files.items():
            assert cache.read(name) == (b"changed" if name == "ds/007" else data)
        assert stats == ["ds/000"]


def test_remote_stopped_mid_workload_gives_clear_error_then_recovers():
    server = LocalS3().start()
    try:
        server.create_bucket("faulty")
        fs = server.filesystem()
        fs.pipe("faulty/obj", b"z" * (4 * BLOCK))
        with Cache(fs, root="faulty", block_size=BLOCK, retries=2, timeout=5) as cache:
            assert cache.read("obj", 0, BLOCK) == b"z" * BLOCK
            server.stop()
            with pytest.raises(OSError, match="obj") as failure:
                cache.read("obj", 2 * BLOCK, BLOCK)
            assert isinstance(failure.value, (RemoteError, TimeoutError))
            assert cache.read("obj", 0, BLOCK) == b"z" * BLOCK  # cached bytes still served
            server.start()
            assert cache.read("obj", 2 * BLOCK, BLOCK) == b"z" * BLOCK
            assert cache.stats()["remote_errors"] >= 1
    finally:
        server.stop()


class _BlackHole:
    """A TCP server that accepts connections and never answers: a hung remote."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self._held:
            conn.close()


def test_hung_remote_times_out_with_the_object_named():
    import s3fs

    hole = _BlackHole()
    try:
        fs = s3fs.S3FileSystem(
            key="k", secret="s", skip_instance_cache=True,
            client_kwargs={"endpoint_url": hole.endpoint, "region_name": "us-east-1"},
            config_kwargs={"connect_timeout": 1, "read_timeout": 30, "retries": {"max_attempts": 1}},
        )
        fs.retries = 1
        with Cache(fs, root="bucket", retries=2, timeout=0.5) as cache:
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="bucket/obj|'obj'"):
                cache.remote.fetch("obj", 0, 10).result()
            with pytest.raises(TimeoutError, match="'obj'"):
                cache.read("obj")  # the stat times out too, not only block fetches
            with pytest.raises(TimeoutError, match="'dir'"):
                cache.ls("dir")
            assert time.monotonic() - started < 20
    finally:
        hole.close()


def test_concurrent_misses_on_one_block_fetch_it_once(s3):
    fs, prefix = s3
    data = os.urandom(8 * BLOCK)
    fs.pipe(f"{prefix}/shared", data)
    # LRU: no readahead, so every fetch is one of the two blocks read (IGT may read ahead of them).
    with Cache(fs, root=prefix, block_size=BLOCK, policy="lru") as cache:
        cache.info("shared")
        barrier = threading.Barrier(16)
        results: list[bytes] = []

        def reader(i: int) -> None:
            barrier.wait()
            results.append(cache.read("shared", (i % 2) * BLOCK, BLOCK, job=f"job{i % 3}"))

        assert in_threads(reader, 16) == []
        assert sorted(results) == sorted([data[:BLOCK]] * 8 + [data[BLOCK:2 * BLOCK]] * 8)
        stats = cache.stats()
        assert stats["remote_fetches"] == 2
        assert set(stats["jobs"]) == {"job0", "job1", "job2"}
        assert sum(j["reads"] for j in stats["jobs"].values()) == 16


def test_many_threads_reading_different_blocks(tmp_path):
    remote = file_remote(tmp_path)
    data = os.urandom(64 * 1024)
    remote.put("big", data)
    block = 1024
    with Cache(**remote.cache_args(), cache_dir=tmp_path / "c", block_size=block,
               memory_bytes=8 * block, disk_bytes=32 * block) as cache:

        def reader(seed: int) -> None:
            for i in range(200):
                offset = ((seed * 7919 + i * 104729) % len(data))
                assert cache.read("big", offset, 3 * block) == data[offset:offset + 3 * block]

        errors = in_threads(reader, 8)
        assert not errors, errors[0]


def _mount_small_tmpfs(where) -> bool:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def test_full_cache_disk_degrades_to_remote_with_a_warning(tmp_path, caplog):
    """A real full file system: a 3 MiB tmpfs under a cache that wants 64 MiB."""
    small = tmp_path / "small"
    if not _mount_small_tmpfs(small):
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        remote = file_remote(tmp_path)
        objects = {f"o{i}": os.urandom(256 * 1024) for i in range(40)}
        for path, data in objects.items():
            remote.put(path, data)
        with Cache(**remote.cache_args(), cache_dir=small / "c", block_size=256 * 1024,
                   memory_bytes=512 * 1024, disk_bytes=64 << 20) as cache:
            for path, data in list(objects.items()) * 2:
                assert cache.read(path) == data
            stats = cache.stats()
            assert stats["disk_write_errors"] > 0
            assert stats["tiers"]["disk"]["bytes"] < 3 << 20
        assert any("serving from the remote" in r.message for r in caplog.records)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
        shutil.rmtree(small, ignore_errors=True)
