"""The data tools people point at ``igtcache::s3://`` read what they read straight from S3 (s3fs):
DuckDB, Polars, Hugging Face ``datasets``, WebDataset, pyarrow datasets and a PyTorch DataLoader
with worker processes; each through an embedded engine and attached to a real daemon."""

from __future__ import annotations

import io
import json
import random
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import DaemonClient

from .conftest import BUCKET

PREFIX = f"{BUCKET}/real-clients"
ROWS = 3000
SHARDS = 2
SAMPLES = 5  # per shard


def _table(seed: int) -> pa.Table:
    rng = random.Random(seed)
    ids = list(range(seed * ROWS, (seed + 1) * ROWS))
    return pa.table({"id": ids, "name": [f"row-{i}" for i in ids], "value": [rng.random() for _ in ids]})


def _shard(number: int) -> bytes:
    """A WebDataset shard: ``SAMPLES`` samples of a ``.txt`` and a ``.bin`` member each."""
    rng = random.Random(number)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i in range(SAMPLES):
            for ext, data in (("txt", f"sample {number}-{i}".encode()), ("bin", rng.randbytes(rng.randrange(1, 70000)))):
                member = tarfile.TarInfo(f"s{number:02d}{i:04d}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture(scope="module")
def dataset(s3_server):
    """Two Parquet files of several row groups and ``SHARDS`` tar shards on the local S3 server."""
    s3 = s3_server.filesystem()
    if s3.exists(PREFIX):
        s3.rm(PREFIX, recursive=True)
    for part in range(2):
        with s3.open(f"{PREFIX}/table/part-{part}.parquet", "wb") as f:
            pq.write_table(_table(part), f, row_group_size=500)
    for number in range(SHARDS):
        s3.pipe_file(f"{PREFIX}/shards/shard-{number:02d}.tar", _shard(number))
    return s3


@pytest.fixture(scope="module")
def daemon(s3_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("real-clients")
    args = ["--remote", f"d=s3://{PREFIX}", "--storage-options", json.dumps(s3_server.storage_options()),
            "--cache-dir", str(work / "cache"), "--memory", "8MiB", "--disk", "16MiB", "--block-size", str(64 << 10)]
    with DaemonProcess(work / "d.sock", args) as process:
        yield process


@pytest.fixture(params=["embedded", "attached"])
def options(request):
    """The ``igtcache`` options of a test: an embedded engine, or attached to the daemon (never embedded)."""
    if request.param == "embedded":
        return {"mode": "embedded", "skip_instance_cache": True}
    daemon = request.getfixturevalue("daemon")
    return {"mode": "attach", "socket": daemon.socket_path, "skip_instance_cache": True}


@pytest.fixture
def igt(options, s3_server, dataset):
    return fsspec.filesystem("igtcache", target_protocol="s3", target_options=s3_server.storage_options(), **options)


def _expected(dataset, *parts: int) -> pa.Table:
    return pa.concat_tables(pq.read_table(f"{PREFIX}/table/part-{part}.parquet", filesystem=dataset) for part in parts)


def test_duckdb_queries_parquet_over_igtcache_urls(igt, dataset):
    import duckdb
    with duckdb.connect() as con:
        con.register_filesystem(igt)
        got = con.sql(f"SELECT * FROM read_parquet('igtcache://{PREFIX}/table/*.parquet') ORDER BY id").to_arrow_table()
        total = con.sql(f"SELECT sum(value), count(*) FROM 'igtcache://{PREFIX}/table/part-1.parquet' "
                        f"WHERE id % 7 = 0").fetchall()[0]
    expected = _expected(dataset, 0, 1)
    assert got.equals(expected)
    part1 = [row for row in _expected(dataset, 1).to_pylist() if row["id"] % 7 == 0]
    assert total == (pytest.approx(sum(row["value"] for row in part1)), len(part1))


def test_polars_reads_parquet_through_igtcache(igt, options, s3_server, dataset):
    """Polars takes fsspec files (its own storage options are for its native object stores)."""
    import polars as pl
    path = f"{PREFIX}/table/part-0.parquet"
    expected = pl.from_arrow(_expected(dataset, 0))
    with fsspec.open(f"igtcache::s3://{path}", "rb", igtcache=options, s3=s3_server.storage_options()) as f:
        assert pl.read_parquet(f).equals(expected)
    with igt.open(path, "rb") as f:
        got = pl.scan_parquet(f).filter(pl.col("id") % 11 == 0).select("id", "value").collect()
    assert got.equals(expected.filter(pl.col("id") % 11 == 0).select("id", "value"))


def test_hugging_face_datasets_loads_parquet_through_igtcache(options, s3_server, dataset, tmp_path, monkeypatch):
    """``datasets`` passes no options to the ``igtcache`` hop of a chained URL: the daemon's socket comes
    from ``$IGTCACHE_SOCKET``."""
    for name in ("HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    # Offline mode would refuse S3 too: the hub is made unreachable instead.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("IGTCACHE_SOCKET", options.get("socket", str(tmp_path / "no-daemon.sock")))
    import datasets
    fsspec.get_filesystem_class("igtcache").clear_instance_cache()  # an earlier test's instance decided without this daemon
    before = _daemon_reads(options)
    loaded = datasets.load_dataset("parquet", data_files=f"igtcache::s3://{PREFIX}/table/*.parquet",
                                   storage_options={"s3": s3_server.storage_options()},
                                   cache_dir=str(tmp_path / "datasets"), split="train")
    assert loaded.data.table.sort_by("id").equals(_expected(dataset, 0, 1))
    if "socket" in options:
        assert _daemon_reads(options) > before


def _daemon_reads(options: dict) -> int:
    """Reads the daemon of an attached test has served; 0 for an embedded one."""
    if "socket" not in options:
        return 0
    with DaemonClient(options["socket"], "d") as client:
        return client.stats()["reads"]


def _samples(data: bytes) -> list[dict]:
    """The samples of a shard as WebDataset groups them: members sharing a key, by extension."""
    samples: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def test_webdataset_reads_shards_through_igtcache(igt, dataset, monkeypatch):
    import webdataset as wds
    monkeypatch.setitem(wds.gopen_schemes, "igtcache", lambda url, mode="rb", bufsize=8192, **kw: igt.open(url, mode))
    urls = [f"igtcache://{PREFIX}/shards/shard-{n:02d}.tar" for n in range(SHARDS)]
    got = [{k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
           for sample in wds.WebDataset(urls, shardshuffle=False)]
    expected = [s for n in range(SHARDS) for s in _samples(dataset.cat_file(f"{PREFIX}/shards/shard-{n:02d}.tar"))]
    assert got == expected and len(got) == SHARDS * SAMPLES


def test_pyarrow_dataset_scans_and_filters_through_igtcache(igt, dataset):
    import pyarrow.dataset as ds
    query = {"filter": (ds.field("id") >= 1000) & (ds.field("id") < 4500), "columns": ["id", "value"]}
    got = ds.dataset(f"{PREFIX}/table", filesystem=igt, format="parquet").to_table(**query)
    expected = ds.dataset(f"{PREFIX}/table", filesystem=dataset, format="parquet").to_table(**query)
    assert got.sort_by("id").equals(expected.sort_by("id")) and got.num_rows == 3500


class RowGroups:
    """Parquet row groups as a map-style dataset, read through a filesystem."""

    def __init__(self, fs, groups: list[tuple[str, int]]) -> None:
        self.fs = fs
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict:
        path, group = self.groups[index]
        with self.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read_row_group(group).to_pydict()


def test_dataloader_workers_read_row_groups_through_igtcache(igt, dataset):
    import torch.utils.data as torch_data
    groups = [(f"{PREFIX}/table/part-{part}.parquet", group) for part in range(2) for group in range(ROWS // 500)]
    loader = torch_data.DataLoader(RowGroups(igt, groups), batch_size=None, num_workers=2,
                                   multiprocessing_context="fork")
    assert list(loader) == list(RowGroups(dataset, groups))
