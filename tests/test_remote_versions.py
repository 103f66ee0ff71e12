"""Range fetches pinned to a version: the bytes are of that version, or the fetch fails
at once with VersionChanged (S3: If-Match against the moto server; file:// and
memory://: a stat before and after the read)."""

from __future__ import annotations

import os
import pickle
import time

import fsspec
import pytest
import s3fs

from igtcache.remote import Remote, VersionChanged

from .helpers import memory_remote

# Retrying would take backoff + 2 * backoff: a VersionChanged must come well before.
SLOW_RETRIES = {"retries": 3, "backoff": 2.0}


def _fetch(remote: Remote, path: str, start: int, end: int, version: str | None = None) -> bytes:
    return remote.fetch(path, start, end, version=version).result(timeout=30)


def _assert_changes_are_refused(remote: Remote, write) -> None:
    """Common to every remote: right version served, old version refused without retries."""
    old = os.urandom(50_000)
    write(old)
    version = remote.info("obj").version
    assert _fetch(remote, "obj", 0, 50_000, version) == old
    assert _fetch(remote, "obj", 1_000, 1_100, version) == old[1_000:1_100]

    new = os.urandom(50_000)  # same size: only the version tells them apart
    write(new)
    new_version = remote.info("obj").version
    assert new_version != version

    started = time.monotonic()
    with pytest.raises(VersionChanged) as raised:
        _fetch(remote, "obj", 1_000, 1_100, version)
    assert time.monotonic() - started < SLOW_RETRIES["backoff"] / 2
    error = raised.value
    assert error.path == "obj" and error.expected == version
    assert error.found in (None, new_version)
    assert "obj" in str(error) and version in str(error)

    assert _fetch(remote, "obj", 1_000, 1_100, new_version) == new[1_000:1_100]
    assert _fetch(remote, "obj", 1_000, 1_100) == new[1_000:1_100]  # unpinned: as before


def test_file_remote_refuses_bytes_of_another_version(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    remote = Remote(fsspec.filesystem("file"), str(root), **SLOW_RETRIES)
    generation = iter(range(1_700_000_000, 1_800_000_000, 10))

    def write(data: bytes) -> None:
        (root / "obj").write_bytes(data)
        mtime = next(generation)  # a distinct mtime whatever the clock's resolution
        os.utime(root / "obj", (mtime, mtime))

    try:
        _assert_changes_are_refused(remote, write)
        with pytest.raises(VersionChanged) as raised:
            _fetch(remote, "obj", 0, 10, "50000:1.0")
        assert raised.value.found == remote.info("obj").version  # a stat names what it found
    finally:
        remote.close()


def test_memory_remote_refuses_bytes_of_another_version():
    helper = memory_remote()
    remote = Remote(helper.fs, helper.root, **SLOW_RETRIES)

    def write(data: bytes) -> None:
        time.sleep(0.002)  # memory:// versions by creation time, in microseconds
        helper.put("obj", data)

    try:
        _assert_changes_are_refused(remote, write)
    finally:
        remote.close()


def test_s3_remote_refuses_bytes_of_another_version(s3):
    fs, prefix = s3
    remote = Remote(fs, prefix, **SLOW_RETRIES)
    _assert_changes_are_refused(remote, lambda data: fs.pipe_file(f"{prefix}/obj", data))


def test_s3_fetch_of_a_missing_object_is_not_found_at_once(s3):
    fs, prefix = s3
    remote = Remote(fs, prefix, **SLOW_RETRIES)
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        _fetch(remote, "absent", 0, 10, "0123456789abcdef")
    assert time.monotonic() - started < SLOW_RETRIES["backoff"] / 2


def test_moto_honours_if_match_on_ranged_get(s3):
    """What the S3 path relies on: a GET whose If-Match names another ETag is refused (412)."""
    fs, prefix = s3
    fs.pipe_file(f"{prefix}/obj", b"0123456789")
    bucket, key, _ = fs.split_path(f"{prefix}/obj")
    etag = fs.info(f"{prefix}/obj")["ETag"]
    response = fs.call_s3("get_object", Bucket=bucket, Key=key, Range="bytes=2-5", IfMatch=etag)
    assert response["ETag"] == etag
    with pytest.raises(OSError) as raised:
        fs.call_s3("get_object", Bucket=bucket, Key=key, Range="bytes=2-5", IfMatch='"0123456789abcdef"')
    assert raised.value.__cause__.response["Error"]["Code"] == "PreconditionFailed"


def test_identity_names_protocol_root_and_endpoint_without_secrets(s3_server, s3):
    fs, prefix = s3
    assert Remote(fs, prefix).identity == f"s3://{prefix} at {s3_server.endpoint}"
    assert Remote(fs, prefix + "/").identity == Remote(fs, prefix).identity
    assert Remote(fs, f"{prefix}/other").identity != Remote(fs, prefix).identity

    secretive = s3fs.S3FileSystem(
        key="AKIDEXAMPLE", secret="wJalrXUtnFEMI", skip_instance_cache=True,
        client_kwargs={"endpoint_url": "https://user:hunter2@s3.example.com:9000/?token=abc"},
    )
    identity = Remote(secretive, "bucket/data").identity
    assert identity == "s3://bucket/data at https://s3.example.com:9000/"
    for secret in ("AKIDEXAMPLE", "wJalrXUtnFEMI", "hunter2", "user", "abc"):
        assert secret not in identity


def test_version_changed_is_an_os_error_that_pickles():
    error = VersionChanged("a/b", "v1", "v2")
    assert isinstance(error, OSError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.expected, copy.found, str(copy)) == ("a/b", "v1", "v2", str(error))
