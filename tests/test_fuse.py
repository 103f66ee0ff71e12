"""``igtcache mount``: real FUSE mounts over a local S3 server (moto), read with
ordinary file APIs and compared byte for byte with the remote."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import mmap
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from igtcache.daemon import protocol as P
from igtcache.fuse.available import fuse_unusable
from igtcache.local_s3 import LocalS3

from .conftest import BUCKET


pytestmark = pytest.mark.skipif(fuse_unusable() is not None, reason=f"FUSE unusable: {fuse_unusable()}")

MiB = 1 << 20
RNG = random.Random(6)
FILES = {
    "empty": b"",
    "one": b"x",
    "small.txt": b"hello, mount\n",
    "blocks.bin": RNG.randbytes(3 * MiB + 12345),  # spans four 1 MiB cache blocks
    "dir/a.bin": RNG.randbytes(200_000),
    "dir/sub/b.bin": RNG.randbytes(1_500_000),
    "dir/sub/c.txt": b"c" * 10,
}
CACHE = ["--embedded", "--block-size", "1MiB", "--memory", "64MiB"]


def _wait_gone(process: subprocess.Popen) -> int:
    """The mount process's exit status; a hang guard, not a timing assertion."""
    return process.wait(timeout=60)


@pytest.fixture
def mounts(tmp_path):
    """Start mounts with ``start(remote, *options)``; every one is unmounted and
    its process reaped at teardown, whatever the test did."""
    from igtcache.fuse.cli import start_background
    from igtcache.fuse.unmount import is_mounted, unmount

    started: list[tuple[Path, subprocess.Popen]] = []

    def start(remote: str, *options: str, storage_options: dict | None = None) -> tuple[Path, subprocess.Popen]:
        mountpoint = tmp_path / f"mnt{len(started)}"
        mountpoint.mkdir()
        argv = [remote, str(mountpoint), *options]
        if storage_options is not None:
            argv += ["--storage-options", json.dumps(storage_options)]
        process = start_background(argv)
        started.append((mountpoint, process))
        return mountpoint, process

    yield start
    for mountpoint, process in started:
        if is_mounted(str(mountpoint)):
            unmount(str(mountpoint))
        if process.poll() is None:
            try:
                _wait_gone(process)
            except subprocess.TimeoutExpired:
                process.kill()
                raise


@pytest.fixture
def dataset(s3_server, s3):
    """FILES on the test server; ``(fs, prefix, url, storage_options)``."""
    fs, prefix = s3
    fs.pipe({f"{prefix}/{name}": data for name, data in FILES.items()})
    return fs, prefix, f"s3://{prefix}", s3_server.storage_options()


@pytest.fixture
def mounted(dataset, mounts):
    """A read-only mount of FILES: ``(mountpoint, process)``."""
    _fs, _prefix, url, options = dataset
    return mounts(url, *CACHE, storage_options=options)


def _errno(call, *args) -> int:
    with pytest.raises(OSError) as failure:
        call(*args)
    return failure.value.errno


# ---------------------------------------------------------------------- reading


def test_open_read_pread_and_mmap_match_the_remote(mounted):
    mnt, _ = mounted
    for name, data in FILES.items():
        assert (mnt / name).read_bytes() == data, name
    data = FILES["blocks.bin"]
    rng = random.Random(1)
    fd = os.open(mnt / "blocks.bin", os.O_RDONLY)
    try:
        for _ in range(300):
            offset, size = rng.randrange(len(data)), rng.choice([1, 4096, 65536, 300_000, 2 * MiB])
            assert os.pread(fd, size, offset) == data[offset:offset + size]
        assert os.pread(fd, 100, len(data)) == b""  # at EOF
        assert os.pread(fd, 100, len(data) + 10 * MiB) == b""  # past EOF
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as view:
            assert view[:] == data
            assert view[MiB - 5:MiB + 5] == data[MiB - 5:MiB + 5]
    finally:
        os.close(fd)


def test_listing_and_attributes_follow_the_remote(mounted):
    mnt, _ = mounted
    assert sorted(os.listdir(mnt)) == ["blocks.bin", "dir", "empty", "one", "small.txt"]
    assert sorted(os.listdir(mnt / "dir" / "sub")) == ["b.bin", "c.txt"]
    for name, data in FILES.items():
        st = os.stat(mnt / name)
        assert st.st_size == len(data) and (mnt / name).is_file()
        assert st.st_mode & 0o777 == 0o444
    assert (mnt / "dir").is_dir() and (mnt / "dir" / "sub").is_dir()
    assert sorted(p.name for p in os.scandir(mnt) if p.is_dir()) == ["dir"]
    vfs = os.statvfs(mnt)
    assert vfs.f_namemax == 255
    assert vfs.f_blocks * vfs.f_frsize == 64 * MiB  # the memory tier bounds this cache


def test_tarfile_over_a_mounted_tar(s3_server, s3, mounts):
    fs, prefix = s3
    members = {f"shard/{i:03d}.bin": random.Random(i).randbytes(i * 7919) for i in range(40)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    fs.pipe(f"{prefix}/train.tar", buffer.getvalue())
    mnt, _ = mounts(f"s3://{prefix}", *CACHE, storage_options=s3_server.storage_options())
    with tarfile.open(mnt / "train.tar") as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers()} == members


def test_copytree_of_a_mounted_directory(mounted, tmp_path):
    mnt, _ = mounted
    copy = tmp_path / "copy"
    shutil.copytree(mnt / "dir", copy)
    copied = {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert copied == {name[len("dir/"):]: data for name, data in FILES.items() if name.startswith("dir/")}


READER = textwrap.dedent("""
    import hashlib, os, random, sys
    path, seed = sys.argv[1], int(sys.argv[2])
    size = os.path.getsize(path)
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    parts = {}
    for _ in range(200):
        offset = rng.randrange(size)
        parts[offset] = hashlib.sha256(os.pread(fd, 65536, offset)).hexdigest()
    with open(path, "rb") as f:
        whole = hashlib.sha256(f.read()).hexdigest()
    print(os.getpid(), whole, " ".join(f"{o}:{h}" for o, h in sorted(parts.items())))
""")


def test_several_processes_read_at_once_and_are_told_apart(mounted):
    mnt, _ = mounted
    names = ["blocks.bin", "dir/sub/b.bin", "blocks.bin", "dir/a.bin"]
    readers = [
        subprocess.Popen([sys.executable, "-c", READER, str(mnt / name), str(seed)], stdout=subprocess.PIPE, text=True)
        for seed, name in enumerate(names)
    ]
    pids = set()
    for seed, (name, reader) in enumerate(zip(names, readers)):
        out, _ = reader.communicate(timeout=120)
        assert reader.returncode == 0
        pid, whole, parts = out.split(" ", 2)
        data = FILES[name]
        assert whole == hashlib.sha256(data).hexdigest()
        for part in parts.split():
            offset, digest = part.split(":")
            assert digest == hashlib.sha256(data[int(offset):int(offset) + 65536]).hexdigest()
        pids.add(pid)
    stats = json.loads(os.getxattr(mnt, "user.igtcache.stats"))
    assert pids <= set(stats["jobs"]), "each reading process is its own job"


# ---------------------------------------------------------------------- bad input


def test_bad_names_and_operations_get_the_right_errno(mounted, tmp_path):
    mnt, _ = mounted
    assert (mnt / "dir" / ".." / "small.txt").read_bytes() == FILES["small.txt"]  # resolved by the kernel
    assert _errno(os.stat, mnt / "missing") == errno.ENOENT
    assert _errno(os.stat, mnt / "dir" / "missing" / "deeper") == errno.ENOENT
    assert _errno(os.stat, mnt / ("n" * 300)) == errno.ENAMETOOLONG
    assert _errno(os.stat, os.fsencode(mnt) + b"/bad-\xff-name") == errno.ENOENT
    assert _errno(open, mnt / "dir") == errno.EISDIR
    fd = os.open(mnt / "dir", os.O_RDONLY)
    try:
        assert _errno(os.read, fd, 10) == errno.EISDIR
    finally:
        os.close(fd)
    assert _errno(os.listdir, mnt / "small.txt") == errno.ENOTDIR
    with open(mnt / "small.txt", "rb") as f:
        f.seek(10 * MiB)
        assert f.read() == b""
    assert _errno(open, mnt / "small.txt", "wb") == errno.EROFS
    assert _errno(open, mnt / "new.txt", "wb") == errno.EROFS
    assert _errno(os.mkdir, mnt / "newdir") == errno.EROFS


def test_remote_keys_that_cannot_be_names_are_left_out(s3_server, s3, mounts):
    fs, prefix = s3
    fs.pipe({f"{prefix}/ok": b"ok", f"{prefix}/{'k' * 300}": b"long", f"{prefix}/d/../escape": b"no"})
    mnt, _ = mounts(f"s3://{prefix}", *CACHE, storage_options=s3_server.storage_options())
    assert sorted(os.listdir(mnt)) == ["d", "ok"]
    assert os.listdir(mnt / "d") == []  # "d/../escape" has no POSIX name


# ---------------------------------------------------------------------- faults


@pytest.fixture
def own_server():
    """A second moto server (same in-process store) that a test may stop and start."""
    server = LocalS3().start()
    yield server
    server.stop()


def test_failing_remote_gives_eio_then_is_served_again(own_server, mounts):
    fs = own_server.filesystem()
    own_server.create_bucket(BUCKET)
    prefix = f"{BUCKET}/faults"
    cached, uncached = RNG.randbytes(MiB), RNG.randbytes(MiB)
    fs.pipe({f"{prefix}/cached.bin": cached, f"{prefix}/uncached.bin": uncached})
    mnt, _ = mounts(f"s3://{prefix}", *CACHE, "--retries", "1", "--timeout", "3", "--ttl", "600",
                    storage_options=own_server.storage_options())
    assert (mnt / "cached.bin").read_bytes() == cached
    assert os.path.getsize(mnt / "uncached.bin") == len(uncached)
    own_server.stop()
    assert _errno((mnt / "uncached.bin").read_bytes) == errno.EIO
    assert (mnt / "cached.bin").read_bytes() == cached  # blocks in the cache are still served
    own_server.start()
    assert (mnt / "uncached.bin").read_bytes() == uncached


def test_failing_remote_listing_gives_eio_and_unmount_still_works(own_server, mounts):
    from igtcache.fuse.unmount import is_mounted, unmount

    own_server.create_bucket(BUCKET)
    own_server.filesystem().pipe(f"{BUCKET}/down/f", b"f")
    mnt, process = mounts(f"s3://{BUCKET}/down", *CACHE, "--retries", "1", "--timeout", "3",
                          storage_options=own_server.storage_options())
    own_server.stop()
    assert _errno(os.listdir, mnt) == errno.EIO
    assert _errno(os.stat, mnt / "f") == errno.EIO
    unmount(str(mnt))
    assert not is_mounted(str(mnt))
    assert _wait_gone(process) == 0


def test_unmount_with_open_files_detaches_and_lets_them_finish(mounted):
    from igtcache.fuse.unmount import is_mounted, main as unmount_main

    mnt, process = mounted
    data = FILES["blocks.bin"]
    with open(mnt / "blocks.bin", "rb") as f:
        head = f.read(1000)
        assert unmount_main([str(mnt)]) == 0
        assert not is_mounted(str(mnt))
        assert process.poll() is None  # still serving the open file
        assert head + f.read() == data
    assert _wait_gone(process) == 0


def test_unmount_removes_a_mount_whose_process_died(mounted):
    from igtcache.fuse.unmount import is_mounted, unmount

    mnt, process = mounted
    process.kill()
    process.wait()
    assert _errno(os.listdir, mnt) == errno.ENOTCONN
    unmount(str(mnt))
    assert not is_mounted(str(mnt))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_in_the_foreground_unmounts_cleanly(dataset, tmp_path, signum):
    from igtcache.fuse.unmount import is_mounted

    _fs, _prefix, url, options = dataset
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "igtcache.fuse.cli", url, str(mnt), "--embedded", "--foreground",
         "--storage-options", json.dumps(options)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        while not is_mounted(str(mnt)):
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.05)
        assert (mnt / "small.txt").read_bytes() == FILES["small.txt"]
        process.send_signal(signum)
        assert _wait_gone(process) == 0, process.stderr.read()
        assert not is_mounted(str(mnt))
    finally:
        if process.poll() is None:
            process.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


def test_mount_errors_are_reported_by_the_command(tmp_path, capsys):
    from igtcache.fuse.cli import main

    assert main(["file:///nonexistent", str(tmp_path / "nope"), "--embedded"]) == 1
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "mnt").mkdir()
    assert main(["nosuchprotocol://x", str(tmp_path / "mnt"), "--embedded"]) == 1
    assert "nosuchprotocol" in capsys.readouterr().err


def test_through_the_daemon_reads_match_and_its_absence_is_eio(dataset, mounts, tmp_path):
    from igtcache.daemon.process import DaemonProcess

    _fs, _prefix, url, options = dataset
    args = ["--remote", f"data={url}", "--storage-options", json.dumps(options),
            "--cache-dir", str(tmp_path / "cache"), "--memory", "16MiB", "--disk", "64MiB"]
    with DaemonProcess(tmp_path / "d.sock", args) as daemon:
        mnt, _ = mounts(url, "--daemon", daemon.socket_path)  # the daemon's remote, named by its URL
        assert (mnt / "blocks.bin").read_bytes() == FILES["blocks.bin"]
        assert sorted(os.listdir(mnt / "dir")) == ["a.bin", "sub"]
        with open(mnt / "dir" / "sub" / "b.bin", "rb") as f:
            daemon.stop()
            assert _errno(f.read) == errno.EIO
            assert _errno(os.getxattr, mnt, "user.igtcache.stats") == errno.EIO
            daemon.start()
            assert f.read() == FILES["dir/sub/b.bin"]
        stats = json.loads(os.getxattr(mnt, "user.igtcache.stats"))
        assert str(os.getpid()) in stats["jobs"], "reads are tagged with the reading process"


def test_daemon_that_does_not_serve_the_remote_is_a_clear_error(dataset, tmp_path, capsys):
    from igtcache.daemon.process import DaemonProcess
    from igtcache.fuse.cli import main

    _fs, _prefix, url, options = dataset
    args = ["--remote", f"other={url}/dir", "--storage-options", json.dumps(options),
            "--cache-dir", str(tmp_path / "cache"), "--memory", "16MiB", "--disk", "64MiB"]
    (tmp_path / "mnt").mkdir()
    with DaemonProcess(tmp_path / "d.sock", args) as daemon:
        assert main([url, str(tmp_path / "mnt"), "--daemon", daemon.socket_path, "--foreground"]) == 1
    assert f"does not serve {url}" in capsys.readouterr().err
    assert main([url, str(tmp_path / "mnt"), "--daemon", str(tmp_path / "none.sock"), "--foreground"]) == 1
    assert "--embedded" in capsys.readouterr().err


def test_a_daemon_reading_the_url_elsewhere_is_not_used_for_a_mount_with_its_own_options(dataset, tmp_path, capsys):
    from igtcache.daemon.process import DaemonProcess
    from igtcache.fuse.cli import main

    _fs, _prefix, url, options = dataset
    args = ["--remote", f"data={url}", "--storage-options", json.dumps(options), "--disk", "0"]
    elsewhere = {**options, "client_kwargs": {**options["client_kwargs"], "endpoint_url": "http://127.0.0.1:9"}}
    (tmp_path / "mnt").mkdir()
    with DaemonProcess(tmp_path / "d.sock", args) as daemon:
        assert main([url, str(tmp_path / "mnt"), "--daemon", daemon.socket_path, "--foreground",
                     "--storage-options", json.dumps(elsewhere)]) == 1
    err = capsys.readouterr().err
    assert f"serves {url} as 'data', but the daemon's remote is" in err and "http://127.0.0.1:9" in err


def _silent_daemon(path: str, url: str) -> socket.socket:
    """A daemon that answers the handshake and the list of its remotes (``url`` as ``data``), then
    nothing more: hung on every read."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    remotes = json.dumps([{"name": "data", "url": url, "protocols": ["s3"], "root": url[5:], "block_size": MiB,
                           "max_read": 16 * MiB}]).encode()

    def serve(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.recv(len(P.MAGIC), socket.MSG_WAITALL)
            conn.sendall(P.MAGIC)
            while header := conn.recv(P.REQUEST.size, socket.MSG_WAITALL):
                op, length = P.REQUEST.unpack(header)
                conn.recv(length, socket.MSG_WAITALL)
                if op != P.OP_REMOTES:
                    threading.Event().wait()  # hung
                conn.sendall(P.RESPONSE.pack(P.OK_JSON, len(remotes)) + remotes)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


def test_a_hung_daemon_is_eio_within_the_client_timeout(dataset, mounts, tmp_path, monkeypatch):
    _fs, _prefix, url, _options = dataset
    monkeypatch.setenv("IGTCACHE_DAEMON_TIMEOUT", "2")
    listener = _silent_daemon(str(tmp_path / "hung.sock"), url)
    try:
        mnt, _ = mounts(url, "--daemon", str(tmp_path / "hung.sock"))
        outcome: list = []
        stat = threading.Thread(target=lambda: outcome.append(_errno(os.stat, mnt / "small.txt")), daemon=True)
        started = time.monotonic()
        stat.start()
        stat.join(60)
        assert outcome == [errno.EIO] and time.monotonic() - started < 30
    finally:
        listener.close()


# ---------------------------------------------------------------------- writes


def test_writable_mount_uploads_on_close_and_invalidates(dataset, mounts):
    fs, prefix, url, options = dataset
    mnt, _ = mounts(url, *CACHE, "--writable", storage_options=options)
    assert (mnt / "blocks.bin").read_bytes() == FILES["blocks.bin"]  # cached now
    new = RNG.randbytes(2 * MiB + 5)
    with open(mnt / "blocks.bin", "wb") as f:
        f.write(new)
    assert fs.cat(f"{prefix}/blocks.bin") == new
    assert (mnt / "blocks.bin").read_bytes() == new  # no stale cached block
    with open(mnt / "dir" / "new.txt", "w") as f:
        f.write("fresh")
    assert fs.cat(f"{prefix}/dir/new.txt") == b"fresh"
    assert "new.txt" in os.listdir(mnt / "dir")
    with open(mnt / "small.txt", "ab") as f:
        f.write(b"more\n")
    assert fs.cat(f"{prefix}/small.txt") == FILES["small.txt"] + b"more\n"
    with open(mnt / "dir" / "a.bin", "r+b") as f:
        f.seek(10)
        f.write(b"XY")
    expected = bytearray(FILES["dir/a.bin"])
    expected[10:12] = b"XY"
    assert fs.cat(f"{prefix}/dir/a.bin") == bytes(expected)
    os.truncate(mnt / "one", 0)
    assert fs.cat(f"{prefix}/one") == b""
    (mnt / "dir" / "empty-new").touch()
    assert fs.cat(f"{prefix}/dir/empty-new") == b""


# ---------------------------------------------------------------------- without a mount


def test_paths_that_cannot_name_an_object_are_refused():
    from igtcache.fuse.lib import FuseOSError
    from igtcache.fuse.mount import relative

    assert relative("/") == "" and relative("/a/b") == "a/b"
    for path, creating, number in [
        ("/a/../b", False, errno.ENOENT), ("/a/./b", False, errno.ENOENT), ("/..", True, errno.EINVAL),
        ("/" + "n" * 256, False, errno.ENAMETOOLONG), ("/d/" + "n" * 255, False, None),
        ("/" + "/".join(["d" * 200] * 6), False, errno.ENAMETOOLONG),  # longer than an S3 key may be
        (os.fsdecode(b"/bad-\xff"), False, errno.ENOENT), (os.fsdecode(b"/bad-\xff"), True, errno.EILSEQ),
    ]:
        if number is None:
            relative(path, creating=creating)
            continue
        with pytest.raises(FuseOSError) as failure:
            relative(path, creating=creating)
        assert failure.value.errno == number, path


class _FlakyBackend:
    """A backend that can be taken away, like a daemon that stopped."""

    def __init__(self) -> None:
        self.down = False

    def _check(self):
        if self.down:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "daemon socket refused the connection")

    def read(self, path, offset=0, size=-1, *, job=None, hint=None):
        self._check()
        self.job = job
        return b"abcdef"[offset:offset + size]

    def info(self, path):
        self._check()
        return {"name": path, "size": 6, "type": "file", "version": "v1"}

    def ls(self, prefix=""):
        self._check()
        return [{"name": "f", "size": 6, "type": "file"}]

    def invalidate(self, path):
        self._check()


class _FileInfo:
    flags = os.O_RDONLY
    fh = direct_io = keep_cache = 0


def test_a_backend_gone_away_gives_eio_until_it_returns():
    from igtcache.fuse.lib import FuseOSError
    from igtcache.fuse.mount import CacheFS

    backend = _FlakyBackend()
    ops = CacheFS(backend, ttl=0, context=lambda: (0, 0, threading.get_native_id()))
    fi = _FileInfo()
    assert ops.getattr("/f")["st_size"] == 6
    backend.down = True
    for call in (lambda: ops.getattr("/f"), lambda: ops.open("/f", fi), lambda: ops.read("/f", 3, 0, fi),
                 lambda: ops.readdir("/", 0)):
        with pytest.raises(FuseOSError) as failure:
            call()
        assert failure.value.errno == errno.EIO
    backend.down = False
    ops.open("/f", fi)
    assert ops.read("/f", 3, 2, fi) == b"cde"
    assert backend.job == str(os.getpid()), "a thread's reads are its process's job"

