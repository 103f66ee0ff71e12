"""The engine on a shared node: nothing outside a local root is read whatever links it
holds, ``file:///`` is ``/``, lock files are never followed, a hung synchronous remote
times out, local versions see rewrites that keep size and mtime, TTL ages do not
follow the wall clock, memory stays bounded by objects as well as bytes, and per-job
counters stay bounded."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.webhdfs import WebHDFS

from igtcache import Cache
from igtcache.cache import CacheDirInUse
from igtcache.memory_tier import ENTRY_OVERHEAD, MemoryTier
from igtcache.meta_table import MetaTable
from igtcache.remote import LocalTree, ObjectInfo, Remote, VersionChanged, object_version
from igtcache.stats import OTHER, JobCounters

from .helpers import ManualClock

BLOCK = 4096
LOCAL = fsspec.filesystem("file")


# ---------------------------------------------------------------------- links out of a local root


def _tree_with_links(tmp_path: Path) -> Path:
    """A root with links that leave it (absolute, relative, through a directory, dangling)
    and links that stay inside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (outside / "data").write_bytes(b"outside")
    (root / "sub" / "data").write_bytes(b"inside")
    (root / "escape").symlink_to(outside / "secret")
    (root / "escape_rel").symlink_to("../outside/secret")
    (root / "escape_dir").symlink_to(outside)
    (root / "sub" / "up").symlink_to("../../outside")
    (root / "dangling").symlink_to(outside / "not-yet")
    (root / "alias").symlink_to("sub/data")
    (root / "alias_dir").symlink_to("sub")
    return root


def test_no_link_leads_a_read_out_of_a_local_root(tmp_path):
    root = _tree_with_links(tmp_path)
    with Cache(LOCAL, root=str(root), memory_bytes=1 << 20, block_size=BLOCK) as cache:
        for path in ("escape", "escape_rel", "escape_dir/secret", "sub/up/secret", "dangling"):
            with pytest.raises(PermissionError, match="outside the remote root"):
                cache.read(path)
            with pytest.raises(PermissionError, match="outside the remote root"):
                cache.info(path)
        with pytest.raises(PermissionError, match="outside the remote root"):
            cache.ls("escape_dir")
        # Listings leave escaping links out; links inside the root keep working.
        assert sorted(e["name"] for e in cache.ls("")) == ["alias", "alias_dir", "sub"]
        assert [e["name"] for e in cache.ls("sub")] == ["sub/data"]
        assert [e["name"] for e in cache.ls("alias_dir")] == ["alias_dir/data"]
        assert cache.read("alias") == b"inside"
        assert cache.read("alias_dir/data") == b"inside"
        assert cache.info("alias")["size"] == 6


def test_no_link_leads_a_write_out_of_a_local_root(tmp_path):
    """Uploads (the writable mount) go to ``full_path``: a link out of the root,
    even one to a file that does not exist yet, is refused there."""
    root = _tree_with_links(tmp_path)
    remote = Remote(LOCAL, str(root))
    try:
        for path in ("escape", "escape_dir/new", "sub/up/new", "dangling"):
            with pytest.raises(PermissionError, match="outside the remote root"):
                remote.full_path(path)
        assert remote.full_path("sub/new") == str(root.resolve() / "sub" / "new")
        assert remote.full_path("alias_dir/new") == str(root.resolve() / "sub" / "new")
    finally:
        remote.close()
    assert not (tmp_path / "outside" / "not-yet").exists()


class _SwapAfterCheck(LocalTree):
    """Replaces a path component by a link out of the root right after a path through a
    link was resolved and checked: the race a user who can write in the root runs."""

    def __init__(self, root: str, component: str, target: Path) -> None:
        super().__init__(root)
        self.component = Path(self.root) / component
        self.target = target

    def resolve(self, rel: str) -> str:
        real = super().resolve(rel)
        if not self.component.is_symlink():
            self.component.rename(self.component.with_name("moved-away"))
            self.component.symlink_to(self.target)
        return real


@pytest.mark.parametrize("path, component", [("alias_dir/data", "sub"), ("alias", "sub/data")])
def test_a_link_swapped_in_after_the_check_is_not_followed(tmp_path, path, component):
    root = _tree_with_links(tmp_path)
    outside = tmp_path / "outside"
    target = outside if component == "sub" else outside / "data"
    for call in (lambda tree: tree.read(path, 0, 100), lambda tree: tree.info(path), lambda tree: tree.ls(path)):
        tree = _SwapAfterCheck(str(root), component, target)
        with pytest.raises(PermissionError, match="turned into a symbolic link"):
            call(tree)
        tree.component.unlink()
        tree.component.with_name("moved-away").rename(tree.component)


def test_a_fifo_in_a_local_root_neither_blocks_a_read_nor_is_served(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pipe")
    remote = Remote(LOCAL, str(root), timeout=30)
    try:
        started = time.monotonic()
        with pytest.raises(PermissionError, match="not a regular file"):
            remote.fetch("pipe", 0, 10).result(timeout=60)
        with pytest.raises(PermissionError, match="not a regular file"):
            remote.info("pipe")
        assert time.monotonic() - started < 5
        assert remote.ls("") == []
    finally:
        remote.close()


def test_file_root_slash_is_the_filesystem_root_not_the_working_directory(tmp_path, monkeypatch):
    real = tmp_path / "real.txt"
    real.write_bytes(b"real")
    cwd = tmp_path / "cwd"
    decoy = cwd / str(real).lstrip("/")  # what a cwd-relative lookup would read
    decoy.parent.mkdir(parents=True)
    decoy.write_bytes(b"decoy")
    monkeypatch.chdir(cwd)
    with Cache("file:///", memory_bytes=1 << 20, block_size=BLOCK) as cache:
        assert cache.remote.url == "file:///" and cache.remote.identity == "file:///"
        assert cache.read(str(real).lstrip("/")) == b"real"
        assert cache.info(str(real).lstrip("/"))["size"] == 4
        listed = [e["name"] for e in cache.ls(str(tmp_path).lstrip("/"))]
        assert str(real).lstrip("/") in listed


# ---------------------------------------------------------------------- lock files


def _cache_on(cache_dir: Path, remote_root: Path) -> Cache:
    return Cache(LOCAL, root=str(remote_root), cache_dir=cache_dir, disk_bytes=1 << 20, block_size=BLOCK)


@pytest.mark.parametrize("plant", ["symlink", "hard link"])
def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_untouched(tmp_path, plant):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (tmp_path / "remote").mkdir()
    if plant == "symlink":
        (cache_dir / "lock").symlink_to(victim)
    else:
        os.link(victim, cache_dir / "lock")
    with pytest.raises(PermissionError, match="lock file"):
        _cache_on(cache_dir, tmp_path / "remote")
    assert victim.read_bytes() == b"precious"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_a_lock_file_of_another_user_is_refused(tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (tmp_path / "remote").mkdir()
    (cache_dir / "lock").write_bytes(b"")
    os.chown(cache_dir / "lock", 65534, 65534)
    with pytest.raises(PermissionError, match="owned by uid 0"):
        _cache_on(cache_dir, tmp_path / "remote")


def test_a_held_lock_keeps_its_owner_pid(tmp_path):
    """Nothing is truncated before the lock is held: a refused second owner leaves the pid."""
    (tmp_path / "remote").mkdir()
    with _cache_on(tmp_path / "cache", tmp_path / "remote"):
        with pytest.raises(CacheDirInUse, match=f"pid {os.getpid()}"):
            _cache_on(tmp_path / "cache", tmp_path / "remote")
        assert (tmp_path / "cache" / "lock").read_text() == str(os.getpid())
        assert (tmp_path / "cache" / "lock").stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------------- a hung synchronous remote


@contextlib.contextmanager
def _silent_server():
    """A TCP server that accepts connections and never answers: a hung remote.
    Yields its port and the connections it holds (close them to end the hang)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], held
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def _hung_webhdfs(port: int) -> WebHDFS:
    """fsspec's WebHDFS: a synchronous filesystem (requests, no timeout of its own)."""
    return WebHDFS("127.0.0.1", port=port, skip_instance_cache=True)


def test_each_attempt_on_a_hung_sync_remote_times_out():
    with _silent_server() as (port, _held):
        remote = Remote(_hung_webhdfs(port), "/data", timeout=0.5, retries=2, backoff=0.05)
        try:
            calls = {"info": lambda: remote.info("x"), "ls": lambda: remote.ls(""),
                     "fetch": lambda: remote.fetch("x", 0, 10).result(timeout=60)}
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(TimeoutError, match="timed out after 2 attempts"):
                    call()
                assert time.monotonic() - started < 3, name
        finally:
            remote.close()


def test_a_cache_on_a_hung_sync_remote_raises_and_closes_in_time():
    with _silent_server() as (port, _held):
        started = time.monotonic()
        cache = Cache(_hung_webhdfs(port), root="/data", timeout=0.5, retries=2, block_size=BLOCK)
        with pytest.raises(TimeoutError, match="'x'"):
            cache.read("x")
        cache.close()
        assert time.monotonic() - started < 5


def test_stuck_calls_are_bounded_then_fail_at_once_until_they_return():
    with _silent_server() as (port, held):
        remote = Remote(_hung_webhdfs(port), "/data", timeout=0.3, retries=1, threads=2)
        try:
            for _ in range(2):  # each leaves a thread stuck in its call
                with pytest.raises(TimeoutError):
                    remote.info("x")
            assert remote.stuck_calls == 2
            threads = threading.active_count()
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="2 earlier calls are stuck"):
                remote.info("x")
            assert time.monotonic() - started < 0.2
            assert threading.active_count() == threads  # no thread started for it

            for conn in list(held):  # the hung calls return (connection closed)
                conn.close()
            deadline = time.monotonic() + 10
            while remote.stuck_calls and time.monotonic() < deadline:
                time.sleep(0.01)
            assert remote.stuck_calls == 0
            started = time.monotonic()
            with pytest.raises(TimeoutError):  # tried again: waits out its deadline
                remote.info("x")
            assert time.monotonic() - started >= 0.3
        finally:
            remote.close()


# ---------------------------------------------------------------------- versions of local files


def test_a_local_rewrite_keeping_size_and_mtime_is_seen(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    obj = root / "obj"
    obj.write_bytes(b"a" * 1000)
    forged = (1_600_000_000 * 10**9, 1_600_000_000 * 10**9)
    os.utime(obj, ns=forged)
    clock = ManualClock()
    with Cache(LOCAL, root=str(root), ttl=10, clock=clock, block_size=BLOCK) as cache:
        old = cache.info("obj")["version"]
        assert cache.read("obj") == b"a" * 1000
        with open(obj, "r+b") as out:  # in place: same inode, size and (forged) mtime
            out.write(b"b" * 1000)
        os.utime(obj, ns=forged)
        with pytest.raises(VersionChanged):  # a fetch pinned to the old version refuses the new bytes
            cache.remote.fetch("obj", 0, 1000, version=old).result(timeout=30)
        clock.advance(11)
        assert cache.read("obj") == b"b" * 1000

        replacement = root / "obj.new"  # replaced by a rename: another inode
        replacement.write_bytes(b"c" * 1000)
        os.utime(replacement, ns=forged)
        os.replace(replacement, obj)
        clock.advance(11)
        assert cache.read("obj") == b"c" * 1000


def test_versions_of_other_remotes_keep_their_format():
    assert object_version({"size": 10, "mtime": 1.5}) == "10:1.5"
    assert object_version({"size": 10, "ETag": '"abc"'}) == "abc"


# ---------------------------------------------------------------------- TTL ages


def test_ttl_ages_are_monotonic_by_default():
    assert inspect.signature(Cache).parameters["clock"].default is time.monotonic


def test_metadata_restored_from_disk_is_revalidated_at_first_use(tmp_path):
    """However the wall clock moved across the restart, an object changed while the cache
    was down is served new, not from the blocks of its old version."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "obj").write_bytes(b"a" * 1000)
    args = dict(root=str(root), cache_dir=tmp_path / "cache", disk_bytes=1 << 20, block_size=BLOCK, ttl=3600)
    with Cache(LOCAL, **args) as cache:
        assert cache.read("obj") == b"a" * 1000
    (root / "obj").write_bytes(b"b" * 1000)
    with Cache(LOCAL, **args) as cache:
        assert cache.read("obj") == b"b" * 1000


def test_unchanged_objects_keep_their_disk_blocks_across_a_restart(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "obj").write_bytes(b"a" * 3 * BLOCK)
    args = dict(root=str(root), cache_dir=tmp_path / "cache", disk_bytes=1 << 20, block_size=BLOCK)
    with Cache(LOCAL, **args) as cache:
        cache.read("obj")
    with Cache(LOCAL, **args) as cache:
        assert cache.read("obj") == b"a" * 3 * BLOCK
        assert cache.stats()["remote_fetches"] == 0  # revalidated by a stat, blocks kept


# ---------------------------------------------------------------------- memory bounded by entries


def test_the_memory_tier_bounds_blocks_as_well_as_bytes():
    evicted: list = []
    tier = MemoryTier(64 * ENTRY_OVERHEAD, on_evict=evicted.extend)
    for i in range(1000):
        tier.put(i, b"x")
    assert len(tier) == 64 and tier.bytes == 64
    assert evicted == list(range(1000 - 64))
    tier = MemoryTier(4 * BLOCK)
    for i in range(4):  # blocks that fill the bound exactly all fit
        tier.put(i, bytes(BLOCK))
    assert len(tier) == 4


def test_metadata_of_objects_without_blocks_is_bounded_least_recently_used_first():
    table = MetaTable(max_unpinned=3)
    info = lambda path: ObjectInfo(path, 1, "v", 0.0)  # noqa: E731
    table.pin("d/pinned")
    for path in ("d/pinned", "d/a", "d/b", "d/c"):
        table.put(info(path))
    table.get("d/a")
    table.put(info("d/e"))  # drops d/b, the least recently used
    assert {p for p in ("d/pinned", "d/a", "d/b", "d/c", "d/e") if table.get(p)} == {"d/pinned", "d/a", "d/c", "d/e"}
    assert sorted(i.path for i in table.fetched_before("d", 1.0)) == ["d/a", "d/c", "d/e", "d/pinned"]
    table.unpin("d/pinned")  # its last block left: counted again, as the newest
    assert len(table) == 3 and table.get("d/pinned") is not None


_MANY_OBJECTS = r"""
import gc, json, os, sys
from igtcache import Cache
from tests.helpers import IndexedMemoryFileSystem

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

n = int(sys.argv[1])
fs = IndexedMemoryFileSystem()
for i in range(n):
    fs.pipe_file(f"/objs/d{i // 1000}/f{i}", b"%08d" % i)
cache = Cache(fs, root="/objs", memory_bytes=1 << 20, block_size=1 << 20, meta_entries=10_000)
gc.collect()
before = rss()
for i in range(n):
    assert cache.read(f"d{i // 1000}/f{i}", job="reader") == b"%08d" % i
gc.collect()
print(json.dumps({"growth": rss() - before, "blocks": len(cache.memory), "meta": len(cache._meta),
                  "with_blocks": len(cache._by_path)}))
cache.flush()
cache.check_invariants()
cache.close()
"""


def test_many_tiny_objects_keep_memory_bounded():
    """100,000 objects of 8 bytes through a memory:// remote, memory_bytes=1 MiB. Before
    entries were bounded, RSS grew ~150 MiB (every block and every stat kept); now the
    blocks (1 MiB / ENTRY_OVERHEAD), the metadata (meta_entries, plus objects with blocks)
    and the policy's history (IGT: 65,536 blocks) are bounded: ~46 MiB measured."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _MANY_OBJECTS, "100000"], cwd=root, capture_output=True,
                          text=True, timeout=280, check=True)
    figures = json.loads(done.stdout)
    assert figures["blocks"] <= (1 << 20) // ENTRY_OVERHEAD
    assert figures["meta"] <= 10_000 + figures["with_blocks"]
    assert figures["growth"] < 80 << 20, figures


# ---------------------------------------------------------------------- per-job counters


def test_per_job_counters_keep_the_most_active_and_fold_the_rest():
    counters = JobCounters(max_jobs=10)
    for i in range(50):
        counters.count(f"busy{i}", "reads", 1000 + i)
    for i in range(10_000):
        counters.count(f"once{i}", "reads")
        counters.count(f"once{i}", "bytes_requested", 7)
    assert len(counters.jobs) <= 2 * 10 + 1
    ranked = counters.ranked()
    assert len(ranked) == 11 and OTHER in ranked
    assert set(ranked) - {OTHER} == {f"busy{i}" for i in range(40, 50)}
    assert sum(c.reads for c in ranked.values()) == counters.total.reads == sum(1000 + i for i in range(50)) + 10_000
    assert sum(c.bytes_requested for c in ranked.values()) == 70_000


def test_stats_of_200k_jobs_stay_small_and_quick(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "obj").write_bytes(b"x" * 100)
    with Cache(LOCAL, root=str(root), block_size=BLOCK) as cache:
        cache.read("obj", job="real")
        with cache._lock:  # what the read driver does for every read (JobCounters.count)
            for i in range(200_000):
                cache.stats_counters.count(f"job-{i}", "reads")
        started = time.monotonic()
        stats = cache.stats()
        elapsed = time.monotonic() - started
        assert len(stats["jobs"]) == 1001 and OTHER in stats["jobs"]
        assert stats["reads"] == 200_001 == sum(job["reads"] for job in stats["jobs"].values())
        assert len(json.dumps(stats)) < 1 << 20
        assert elapsed < 1.0
