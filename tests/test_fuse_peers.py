"""The FUSE caches the benchmarks compare with (rclone, s3fs-fuse), and ``igtcache bench fuse`` with them.

Each peer's test skips, saying why, where its binary or FUSE is missing.
"""

from __future__ import annotations

import json
import os
import time
import zlib

import pytest

from igtcache.bench.fuse_peers import PEERS, PeerMountError, mount_peer, peer_unusable
from igtcache.fuse.available import fuse_unusable
from igtcache.fuse.unmount import is_mounted

BUCKET = "peer-bucket"
OBJECTS = {  # sizes around rclone's and s3fs's buffers, and a key in a folder
    "one.bin": 1,
    "small.bin": 100_000,
    "folder/large.bin": 3 * (1 << 20) + 17,
}


def _skip_unusable(peer: str) -> None:
    if why := peer_unusable(peer):
        pytest.skip(why)


@pytest.fixture(scope="module")
def bucket():
    """A moto server whose bucket holds ``OBJECTS`` (random bytes); yields (endpoint, {key: bytes})."""
    from igtcache.local_s3 import LocalS3

    with LocalS3() as s3:
        s3.create_bucket(BUCKET)
        fs = s3.filesystem()
        data = {key: os.urandom(size) for key, size in OBJECTS.items()}
        for key, body in data.items():
            fs.pipe_file(f"{BUCKET}/{key}", body)
        yield s3.endpoint, data


@pytest.mark.parametrize("peer", PEERS)
def test_peer_mount_reads_every_object_byte_exact_and_goes_away(peer, bucket, tmp_path):
    _skip_unusable(peer)
    endpoint, data = bucket
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with mount_peer(peer, endpoint, BUCKET, mountpoint, tmp_path) as mounted:
        assert is_mounted(mounted)
        assert sorted(os.listdir(mounted)) == ["folder", "one.bin", "small.bin"]
        for _ in range(2):  # the second read is the peer's cache's
            for key, body in data.items():
                with open(os.path.join(mounted, key), "rb") as f:
                    assert zlib.crc32(f.read()) == zlib.crc32(body), f"{peer} read {key} wrong"
    assert not is_mounted(mountpoint)


def test_rclone_cache_is_held_to_its_bound(bucket, tmp_path):
    _skip_unusable("rclone")
    endpoint, data = bucket
    bound = 200_000
    (tmp_path / "mnt").mkdir()
    with mount_peer("rclone", endpoint, BUCKET, tmp_path / "mnt", tmp_path, cache_bytes=bound) as mounted:
        for key in data:
            with open(os.path.join(mounted, key), "rb") as f:
                f.read()
        deadline = time.monotonic() + 10
        while _disk_use(tmp_path / "rclone-cache" / "vfs") > bound and time.monotonic() < deadline:
            time.sleep(0.2)  # rclone trims its cache once per poll (a second)
        assert _disk_use(tmp_path / "rclone-cache" / "vfs") <= bound


def _disk_use(folder) -> int:
    """Bytes allocated to the files under ``folder`` (rclone's cache files are sparse)."""
    return sum(os.stat(os.path.join(root, name)).st_blocks * 512
               for root, _, names in os.walk(folder) for name in names)


@pytest.mark.parametrize("peer", PEERS)
def test_peer_that_cannot_mount_is_reported_with_its_log(peer, bucket, tmp_path):
    _skip_unusable(peer)
    with pytest.raises(PeerMountError, match=peer):
        with mount_peer(peer, bucket[0], BUCKET, tmp_path / "absent", tmp_path):
            pass


@pytest.mark.skipif(fuse_unusable() is not None, reason=f"FUSE unusable: {fuse_unusable()}")
def test_missing_peer_binary_is_named():
    assert peer_unusable("no-such-fuse-peer") == "no-such-fuse-peer is not installed (apt-get install no-such-fuse-peer)"


@pytest.mark.skipif(fuse_unusable() is not None, reason=f"FUSE unusable: {fuse_unusable()}")
def test_benchmark_reports_every_figure_next_to_its_baseline(capsys):
    from igtcache.bench.fuse import format_report, main

    assert main(["--size", "4MiB", "--rounds", "1", "--random-reads", "100", "--small-files", "32",
                 "--processes", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["results"]
    peers = [f"{label}: hits" for label in ("rclone mount --vfs-cache-mode full", "s3fs-fuse -o use_cache")]
    usable = [label for peer, label in zip(PEERS, peers) if peer_unusable(peer) is None]
    assert [r["path"] for r in rows] == [
        "local file (page cache)", "mount, buffered: igtcache hits", "mount, buffered: no-op backend",
        "mount, buffered: kernel page cache", "mount, direct-io: igtcache hits", "mount, direct-io: no-op backend",
        "mount, daemon: igtcache hits", *usable,
    ]
    assert set(report["skipped"]) == {peer for peer in PEERS if peer_unusable(peer)}
    assert all(r["seq_bytes_per_s"] > 0 and r["random_reads_per_s"] > 0 for r in rows)
    assert rows[0]["seq_ratio"] == rows[0]["random_ratio"] == rows[0]["small_ratio"] == 1
    small = [r["path"] for r in rows if "small_files_per_s" in r]
    assert small == ["local file (page cache)", "mount, buffered: igtcache hits", "mount, daemon: igtcache hits",
                     *usable]
    assert sum("meets_target" in r for r in rows) == 2
    text = format_report(report)
    for row in rows:
        line = next(line for line in text.splitlines() if line.startswith(row["path"]))
        assert f"{row['seq_ratio']:.0%}" in line and f"{row['random_ratio']:.1%}" in line
    for row in rows:
        if "small_files_per_s" in row:
            line = [line for line in text.splitlines() if line.startswith(row["path"])][-1]
            assert line.endswith(f"{row['small_ratio']:.1%}"), line
