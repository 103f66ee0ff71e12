"""Shared fixtures: a real S3 HTTP server (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import pytest

from igtcache.local_s3 import LocalS3

BUCKET = "igtcache-test"


@pytest.fixture(scope="session")
def s3_server():
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with LocalS3() as server:
        server.create_bucket(BUCKET)
        yield server
    mp.undo()


@pytest.fixture
def s3(s3_server, request):
    """A fresh prefix in the test bucket: ``(filesystem, "bucket/prefix")``."""
    fs = s3_server.filesystem()
    prefix = f"{BUCKET}/{request.node.name.replace('[', '_').replace(']', '')}"
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    return fs, prefix


@pytest.fixture(autouse=True)
def invariants_checked_on_close(monkeypatch):
    """Every Cache a test closes first passes ``check_invariants()`` once quiet:
    concurrency and fault tests end with the accounts checked."""
    from igtcache import Cache

    close = Cache.close

    def checked_close(self):
        if not self._closed:
            self.flush()
            self.check_invariants()
        close(self)

    monkeypatch.setattr(Cache, "close", checked_close)
