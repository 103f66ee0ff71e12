"""The ``igtcache`` fsspec protocol: embedded, attached to a real daemon, in DataLoader workers, under pyarrow."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import pickle
import random
import subprocess
import sys
import time
import urllib.request

import fsspec
import pytest

from igtcache import Cache
from igtcache.clients.fsspec_plugin import IgtcacheFileSystem
from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import DaemonClient, DaemonUnavailable
from igtcache.local_s3 import LocalS3, free_port

from .conftest import BUCKET

KiB = 1 << 10
BLOCK = 64 * KiB


@pytest.fixture
def objects(s3):
    """A few objects under the test's prefix: ``(s3fs, prefix, {path: bytes})``."""
    fs, prefix = s3
    rng = random.Random(prefix)
    data = {f"{prefix}/data/part-{i}.bin": rng.randbytes(size)
            for i, size in enumerate([0, 1, 5000, BLOCK, 3 * BLOCK + 17])}
    for path, value in data.items():
        fs.pipe_file(path, value)
    return fs, prefix, data


@pytest.fixture
def no_daemon(tmp_path, monkeypatch):
    monkeypatch.setenv("IGTCACHE_SOCKET", str(tmp_path / "nobody.sock"))


@pytest.fixture
def daemon(s3_server, s3, tmp_path_factory):
    """A daemon serving the test's prefix, found through ``$IGTCACHE_SOCKET``."""
    _fs, prefix = s3
    work = tmp_path_factory.mktemp("plugin")
    args = ["--remote", f"t=s3://{prefix}", "--storage-options", json.dumps(s3_server.storage_options()),
            "--cache-dir", str(work / "cache"), "--memory", "8MiB", "--disk", "16MiB",
            "--block-size", str(BLOCK), "--ttl", "3600"]
    with DaemonProcess(work / "d.sock", args) as process, pytest.MonkeyPatch.context() as mp:
        mp.setenv("IGTCACHE_SOCKET", process.socket_path)
        yield process


def _fs(s3_server, **options) -> IgtcacheFileSystem:
    return fsspec.filesystem("igtcache", target_protocol="s3", target_options=s3_server.storage_options(),
                             skip_instance_cache=True, **options)


def _daemon_stats(daemon) -> dict:
    with DaemonClient(daemon.socket_path, "t") as client:
        return client.stats()


def _exercise(fs, prefix: str, data: dict[str, bytes]) -> None:
    """Every read-side call a dataloader makes, checked byte for byte."""
    big = f"{prefix}/data/part-4.bin"
    expected = data[big]
    with fs.open(big, "rb") as f:
        assert f.read(10) == expected[:10] and f.tell() == 10
        f.seek(BLOCK - 5)
        assert f.read(10) == expected[BLOCK - 5:BLOCK + 5]
        f.seek(-7, io.SEEK_END)
        assert f.read() == expected[-7:] and f.read() == b""
        f.seek(100)
        buffer = bytearray(BLOCK * 2)
        assert f.readinto(buffer) == BLOCK * 2 and buffer == expected[100:100 + 2 * BLOCK]
        f.seek(len(expected) - 3)
        assert f.readinto(buffer) == 3 and buffer[:3] == expected[-3:]
    assert fs.cat_file(big, start=3, end=BLOCK + 9) == expected[3:BLOCK + 9]
    assert fs.cat_file(big, start=-20) == expected[-20:]
    assert fs.cat_file(big, start=5, end=-5) == expected[5:-5]
    assert fs.cat_file(f"{prefix}/data/part-0.bin") == b""
    paths = sorted(data)
    assert fs.cat_ranges(paths, [0] * len(paths), [3000] * len(paths)) == [data[p][:3000] for p in paths]
    assert fs.cat(paths) == data
    assert sorted(fs.ls(f"{prefix}/data", detail=False)) == paths
    assert fs.info(big)["size"] == len(expected) and fs.info(big)["type"] == "file"
    assert fs.info(f"{prefix}/data")["type"] == "directory"
    assert fs.exists(big) and fs.isfile(big) and fs.isdir(f"{prefix}/data")
    assert not fs.exists(f"{prefix}/data/missing.bin")
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{prefix}/data/missing.bin")


def test_chained_url_reads_through_an_embedded_engine_without_a_daemon(s3_server, objects, no_daemon):
    fs, prefix, data = objects
    path = f"{prefix}/data/part-3.bin"
    with fsspec.open(f"igtcache::s3://{path}", "rb", s3=s3_server.storage_options()) as f:
        assert f.read() == data[path]
    igt = _fs(s3_server)
    _exercise(igt, prefix, data)
    engine = igt._engines[prefix.split("/")[0]]
    assert engine.stats()["hits"] > 0
    with pytest.raises(DaemonUnavailable, match="no igtcache daemon"):
        _fs(s3_server, mode="attach").cat_file(path)


def test_attaches_to_the_daemon_serving_the_path_and_tags_reads_with_the_job(s3_server, objects, daemon):
    _fs3, prefix, data = objects
    igt = _fs(s3_server, job="loader")
    _exercise(igt, prefix, data)
    stats = _daemon_stats(daemon)
    assert stats["jobs"]["loader"]["reads"] > 10 and stats["hits"] > 0
    assert igt._engines == {}  # nothing ran embedded
    url = f"igtcache::s3://{prefix}/data/part-2.bin"
    # fsspec caches filesystems by their arguments: a fresh one finds the daemon this test started.
    with fsspec.open(url, "rb", s3=s3_server.storage_options(), igtcache={"skip_instance_cache": True}) as f:
        assert f.read() == data[f"{prefix}/data/part-2.bin"]
    assert _daemon_stats(daemon)["jobs"][str(os.getpid())]["reads"] == 1


def test_paths_the_daemon_does_not_serve_run_embedded(s3_server, objects, daemon):
    fs, prefix, data = objects
    outside = prefix.rsplit("/", 1)[0] + "/elsewhere-" + prefix.rsplit("/", 1)[1] + ".bin"
    fs.pipe_file(outside, b"not served by the daemon")
    igt = _fs(s3_server)
    before = _daemon_stats(daemon)["reads"]
    assert igt.cat_file(outside) == b"not served by the daemon"
    assert _daemon_stats(daemon)["reads"] == before
    with pytest.raises(DaemonUnavailable, match="serves"):
        _fs(s3_server, mode="attach").cat_file(outside)
    fs.rm(outside)


@pytest.fixture(scope="module")
def other_endpoint():
    """A second S3 server with its own objects (another process: moto keeps one store per process)."""
    port = free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    other = LocalS3(port)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(other.endpoint, timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto_server did not start"
                time.sleep(0.1)
        other.create_bucket(BUCKET)
        yield other
    finally:
        server.kill()
        server.wait()


def test_the_daemon_is_used_only_for_the_same_endpoint_and_credentials(s3_server, objects, daemon,
                                                                      other_endpoint, caplog):
    _fs3, prefix, data = objects
    path = f"{prefix}/data/part-2.bin"
    other_endpoint.filesystem().pipe_file(path, b"endpoint B's object")
    caplog.set_level(logging.INFO, logger="igtcache.clients.fsspec_plugin")
    before = _daemon_stats(daemon)["reads"]

    on_b = fsspec.filesystem("igtcache", target_protocol="s3", target_options=other_endpoint.storage_options(),
                             skip_instance_cache=True)
    assert on_b.cat_file(path) == b"endpoint B's object"
    assert f"the daemon's remote is s3://{prefix} at {s3_server.endpoint}, this one is s3://{prefix} at " \
           f"{other_endpoint.endpoint}" in caplog.text
    with pytest.raises(DaemonUnavailable, match=f"at {other_endpoint.endpoint}"):
        fsspec.filesystem("igtcache", target_protocol="s3", target_options=other_endpoint.storage_options(),
                          mode="attach", skip_instance_cache=True).cat_file(path)

    as_someone_else = fsspec.filesystem("igtcache", target_protocol="s3", skip_instance_cache=True,
                                        target_options=s3_server.storage_options(key="someone-else"))
    assert as_someone_else.cat_file(path) == data[path]
    assert f"the daemon reads s3://{prefix} at {s3_server.endpoint} with other credentials" in caplog.text
    assert "someone-else" not in caplog.text and "testing" not in caplog.text  # no key id, let alone a secret
    assert _daemon_stats(daemon)["reads"] == before  # neither went to the daemon

    assert _fs(s3_server).cat_file(path) == data[path]  # the same endpoint and principal: attached
    assert _daemon_stats(daemon)["reads"] == before + 1
    assert f"reading s3://{prefix} at {s3_server.endpoint} through the igtcache daemon" in caplog.text


@pytest.mark.parametrize("attached", [True, False], ids=["attached", "embedded"])
def test_writes_go_through_to_the_remote_and_drop_the_cached_blocks(s3_server, objects, request, attached):
    fs3, prefix, data = objects
    if attached:
        request.getfixturevalue("daemon")
    else:
        request.getfixturevalue("no_daemon")
    igt = _fs(s3_server, ttl=3600)
    path = f"{prefix}/data/part-3.bin"
    assert igt.cat_file(path) == data[path]
    igt.pipe_file(path, b"new contents")
    assert fs3.cat_file(path) == b"new contents" and igt.cat_file(path) == b"new contents"
    with igt.open(path, "wb") as f:
        f.write(b"written through")
    assert igt.cat_file(path) == b"written through"
    igt.rm_file(path)
    assert not fs3.exists(path) and not igt.exists(path)


def test_filesystem_pickles_by_its_arguments(s3_server, objects, daemon):
    _fs3, prefix, data = objects
    igt = _fs(s3_server, job="pickled")
    path = f"{prefix}/data/part-2.bin"
    assert igt.cat_file(path) == data[path]
    clone = pickle.loads(pickle.dumps(igt))
    assert clone.cat_file(path) == data[path] and clone.job == "pickled"


class ShardDataset:
    """Reads whole objects through an igtcache filesystem, as a map-style dataset."""

    def __init__(self, fs, paths: list[str]) -> None:
        self.fs = fs
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with self.fs.open(self.paths[index], "rb") as f:
            return self.paths[index], f.read(), os.getpid()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_through_the_daemon(s3_server, objects, daemon, context):
    torch_data = pytest.importorskip("torch.utils.data")
    _fs3, prefix, data = objects
    igt = _fs(s3_server)
    paths = sorted(data) * 3
    assert igt.cat_file(paths[0]) == data[paths[0]]  # the parent has connected before forking
    loader = torch_data.DataLoader(ShardDataset(igt, paths), batch_size=None, num_workers=2,
                                   multiprocessing_context=context)
    seen = list(loader)
    assert [path for path, _value, _pid in seen] == paths
    assert all(value == data[path] for path, value, _pid in seen)
    workers = {str(pid) for _path, _value, pid in seen}
    assert len(workers) == 2 and workers <= set(_daemon_stats(daemon)["jobs"])


def test_dataloader_fork_workers_run_their_own_embedded_engines(s3_server, objects, no_daemon):
    torch_data = pytest.importorskip("torch.utils.data")
    _fs3, prefix, data = objects
    igt = _fs(s3_server)
    paths = sorted(data) * 2
    assert igt.cat_file(paths[1]) == data[paths[1]]  # an engine in the parent, inherited by the workers
    loader = torch_data.DataLoader(ShardDataset(igt, paths), batch_size=None, num_workers=2,
                                   multiprocessing_context="fork")
    assert all(value == data[path] for path, value, _pid in loader)


@pytest.mark.parametrize("attached", [True, False], ids=["attached", "embedded"])
def test_pyarrow_reads_parquet_through_the_plugin(s3_server, s3, request, attached):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    fs3, prefix = s3
    request.getfixturevalue("daemon" if attached else "no_daemon")
    table = pa.table({"id": list(range(20000)), "name": [f"row-{i}" for i in range(20000)]})
    path = f"{prefix}/table.parquet"
    igt = _fs(s3_server)
    pq.write_table(table, path, filesystem=igt, row_group_size=5000)  # written through to the remote
    assert fs3.info(path)["size"] > 0
    assert pq.read_table(path, filesystem=igt).equals(table)
    assert pq.ParquetFile(igt.open(path, "rb")).read_row_group(2).equals(table.slice(10000, 5000))


@pytest.fixture(params=["attached", "embedded"])
def backend(request):
    request.getfixturevalue("daemon" if request.param == "attached" else "no_daemon")
    return request.param


def test_info_modified_created_and_ukey_come_from_the_target_and_the_version(s3_server, objects, backend):
    fs3, prefix, data = objects
    igt = _fs(s3_server)
    path = f"{prefix}/data/part-2.bin"
    target = fs3.info(path)
    info = igt.info(path)
    assert {key: info[key] for key in ("ETag", "LastModified", "size", "type")} == \
           {key: target[key] for key in ("ETag", "LastModified", "size", "type")}
    assert info["version"] == target["ETag"].strip('"')
    assert igt.modified(path) == fs3.modified(path) and igt.modified(path).tzinfo is not None
    assert igt.created(path) == igt.modified(path)  # S3 has no creation time: an object is written whole
    assert igt.info(f"{prefix}/data")["type"] == "directory"
    key = igt.ukey(path)
    assert igt.ukey(path) == key and igt.checksum(path) == int(key, 16)
    assert igt.ukey(f"{prefix}/data/part-3.bin") != key
    igt.pipe_file(path, b"another version")
    assert igt.ukey(path) != key and igt.info(path)["ETag"] == fs3.info(path)["ETag"] != target["ETag"]


def test_modified_and_created_of_local_and_memory_files(tmp_path, no_daemon):
    local = tmp_path / "remote" / "file.bin"
    local.parent.mkdir()
    local.write_bytes(b"local")
    os.utime(local, (1_700_000_000, 1_700_000_000.5))
    igt = fsspec.filesystem("igtcache", target_protocol="file", skip_instance_cache=True)
    utc = datetime.timezone.utc
    assert igt.modified(str(local)) == datetime.datetime.fromtimestamp(1_700_000_000.5, tz=utc)
    assert igt.created(str(local)) == datetime.datetime.fromtimestamp(fsspec.filesystem("file").info(str(local))["created"], tz=utc)
    memory = fsspec.filesystem("memory")
    memory.pipe_file("/igt-times/file.bin", b"in memory")
    igt = fsspec.filesystem("igtcache", target_protocol="memory", skip_instance_cache=True)
    # memory:// gives only its creation time in info (as a float); the write comes microseconds later
    close = datetime.timedelta(milliseconds=5)
    assert abs(igt.modified("/igt-times/file.bin") - memory.modified("/igt-times/file.bin")) < close
    assert abs(igt.created("/igt-times/file.bin") - memory.created("/igt-times/file.bin")) < close
    memory.rm("/igt-times", recursive=True)


def test_info_asks_the_target_once_per_version_and_keeps_a_bounded_number(no_daemon, monkeypatch):
    memory = fsspec.filesystem("memory")
    paths = [f"/igt-infos/file-{i}.bin" for i in range(3)]
    for path in paths:
        memory.pipe_file(path, b"first")
    created = memory.info(paths[0])["created"]
    igt = fsspec.filesystem("igtcache", target_protocol="memory", skip_instance_cache=True)
    asked = []
    target_info = igt._target().info
    monkeypatch.setattr(igt._target(), "info", lambda path, **kw: asked.append(path) or target_info(path, **kw))
    assert igt.info(paths[0])["created"] == igt.info(paths[0])["created"] == created
    assert asked == [paths[0]]
    igt.pipe_file(paths[0], b"second version")
    assert igt.info(paths[0])["size"] == len(b"second version") and asked == [paths[0]] * 2
    monkeypatch.setattr("igtcache.clients.fsspec_plugin.TARGET_INFOS", 2)
    for path in paths:
        igt.info(path)
    assert list(igt._target_infos) == paths[1:]
    memory.rm("/igt-infos", recursive=True)


def test_cat_ranges_reads_each_backends_ranges_at_once_and_reports_failures_in_place(s3_server, objects, backend,
                                                                                     monkeypatch):
    _fs3, prefix, data = objects
    igt = _fs(s3_server)
    paths = sorted(data)
    big = f"{prefix}/data/part-4.bin"
    batches = []
    backend_class = DaemonClient if backend == "attached" else Cache
    read_many = backend_class.read_many

    def counted(self, reads, **kwargs):
        batches.append(len(reads))
        return read_many(self, reads, **kwargs)

    monkeypatch.setattr(backend_class, "read_many", counted)
    got = igt.cat_ranges([big] * 4, [0, BLOCK - 3, -10, 7], [10, BLOCK + 3, None, None])
    assert got == [data[big][:10], data[big][BLOCK - 3:BLOCK + 3], data[big][-10:], data[big][7:]]
    assert batches == [4]
    missing = f"{prefix}/data/missing.bin"
    got = igt.cat_ranges(paths + [missing, missing], [1] * len(paths) + [1, -5], 100)
    assert got[:-2] == [data[p][1:100] for p in paths]
    assert isinstance(got[-2], FileNotFoundError) and isinstance(got[-1], FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        igt.cat_ranges([big, missing], 0, 5, on_error="raise")
    with pytest.raises(ValueError):
        igt.cat_ranges([big, big], [0], [1])


@pytest.mark.parametrize("cache_type", [
    pytest.param(name, marks=pytest.mark.skip(reason="fsspec's 'parts' cache serves only the parts given at open "
                                                    "(fsspec.parquet) and never reads through the file"))
    if name == "parts" else name
    for name in fsspec.caching.caches if name])
@pytest.mark.parametrize("block_size", [None, 1000, 3 * BLOCK])
def test_open_with_any_cache_type_and_block_size(cache_type, block_size, no_daemon):
    rng = random.Random(cache_type)
    value = rng.randbytes(2 * BLOCK + 333)
    memory = fsspec.filesystem("memory")
    path = f"/igt-open-{cache_type}-{block_size}/file.bin"
    memory.pipe_file(path, value)
    igt = fsspec.filesystem("igtcache", target_protocol="memory", block_size=BLOCK, skip_instance_cache=True)
    with igt.open(path, "rb", block_size=block_size, cache_type=cache_type) as f:
        assert f.read(10) == value[:10]
        f.seek(BLOCK - 5)
        assert f.read(BLOCK) == value[BLOCK - 5:2 * BLOCK - 5]
        f.seek(-100, io.SEEK_END)
        buffer = bytearray(200)
        assert f.readinto(buffer) == 100 and buffer[:100] == value[-100:]
        f.seek(0)
        assert f.read() == value
    memory.rm(path.rsplit("/", 1)[0], recursive=True)


def test_glob_find_walk_and_du_list_what_the_target_lists(s3_server, objects, backend):
    fs3, prefix, data = objects
    fs3.pipe_file(f"{prefix}/data/nested/deeper.bin", b"nested")
    igt = _fs(s3_server)
    fs3.invalidate_cache()
    assert igt.glob(f"{prefix}/data/*.bin") == fs3.glob(f"{prefix}/data/*.bin") == sorted(data)
    assert igt.glob(f"{prefix}/**/deeper.bin") == [f"{prefix}/data/nested/deeper.bin"]
    assert igt.find(prefix) == fs3.find(prefix)
    assert igt.find(prefix, withdirs=True, maxdepth=2) == fs3.find(prefix, withdirs=True, maxdepth=2)
    assert list(igt.walk(prefix)) == list(fs3.walk(prefix))
    assert igt.du(prefix) == fs3.du(prefix) == sum(map(len, data.values())) + len(b"nested")
    assert igt.du(prefix, total=False) == fs3.du(prefix, total=False)
