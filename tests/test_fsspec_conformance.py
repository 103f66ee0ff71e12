"""fsspec's own abstract test suite run against ``igtcache::``: over ``memory://`` (embedded engine),
over the local S3 server embedded, and over it attached to a real daemon.

Reads go through the cache; writes (the suite's fixtures make their files with
``touch``/``makedirs``/``pipe``, and the put/copy tests write) go through to the
target and drop what was cached. Every test applies; over S3 some are skipped,
each saying why: they run in another class here, and would add only time.
"""

from __future__ import annotations

import json
import posixpath
import uuid

import fsspec
import pytest
from fsspec.tests.abstract import AbstractFixtures
from fsspec.tests.abstract.copy import AbstractCopyTests
from fsspec.tests.abstract.get import AbstractGetTests
from fsspec.tests.abstract.open import AbstractOpenTests
from fsspec.tests.abstract.pipe import AbstractPipeTests
from fsspec.tests.abstract.put import AbstractPutTests

from igtcache.daemon.process import DaemonProcess
from igtcache.daemon_client import DaemonClient

from .conftest import BUCKET


class _Suite(AbstractGetTests, AbstractCopyTests, AbstractPutTests, AbstractOpenTests, AbstractPipeTests):
    """Every abstract test class that has tests, against one ``igtcache::`` filesystem."""

    @pytest.fixture
    def fs_join(self):
        return posixpath.join


class TestOverMemory(_Suite, AbstractFixtures):
    @pytest.fixture(scope="class")
    @classmethod
    def fs(cls):
        return fsspec.filesystem("igtcache", target_protocol="memory", mode="embedded", skip_instance_cache=True)

    @pytest.fixture
    def fs_path(self):
        return f"/conformance-{uuid.uuid4().hex[:8]}"


GLOB_CASES = ("test_get_glob_edge_cases", "test_copy_glob_edge_cases", "test_put_glob_edge_cases")
WRITE_CLASSES = (AbstractCopyTests, AbstractPutTests)


def _tests_of(*classes: type) -> set[str]:
    return {name for cls in classes for name in vars(cls) if name.startswith("test_")}


class _OverS3(_Suite, AbstractFixtures):
    SKIPPED: dict[str, str] = dict.fromkeys(
        GLOB_CASES, "fsspec's 32 glob expansion cases per class run over memory:// (TestOverMemory); over the "
                    "local S3 server they would add over a minute of requests per class and reach no other plugin code")

    @pytest.fixture(autouse=True)
    def _skipped_here(self, request):
        reason = self.SKIPPED.get(request.node.originalname)
        if reason:
            pytest.skip(reason)

    @pytest.fixture
    def fs_path(self):
        return f"{BUCKET}/conformance-{uuid.uuid4().hex[:8]}"

    @pytest.fixture
    def supports_empty_directories(self):
        return False  # S3 has keys, not directories


class TestOverS3Embedded(_OverS3):
    @pytest.fixture(scope="class")
    @classmethod
    def fs(cls, s3_server):
        return fsspec.filesystem("igtcache", target_protocol="s3", target_options=s3_server.storage_options(),
                                 mode="embedded", skip_instance_cache=True)


class TestOverS3Attached(_OverS3):
    SKIPPED = {**_OverS3.SKIPPED, **dict.fromkeys(
        _tests_of(*WRITE_CLASSES) - set(GLOB_CASES),
        "copy and put write through to S3 from the client alike embedded and attached (TestOverS3Embedded); "
        "attached, only the cache's invalidation differs, checked by the open and pipe tests here")}

    @pytest.fixture(scope="class")
    @classmethod
    def daemon(cls, s3_server, tmp_path_factory):
        work = tmp_path_factory.mktemp("conformance")
        args = ["--remote", f"t=s3://{BUCKET}", "--storage-options", json.dumps(s3_server.storage_options()),
                "--cache-dir", str(work / "cache"), "--memory", "8MiB", "--disk", "16MiB", "--block-size", str(64 << 10)]
        with DaemonProcess(work / "d.sock", args) as process:
            yield process

    @pytest.fixture(scope="class")
    @classmethod
    def fs(cls, s3_server, daemon):
        return fsspec.filesystem("igtcache", target_protocol="s3", target_options=s3_server.storage_options(),
                                 socket=daemon.socket_path, mode="attach", skip_instance_cache=True)

    def test_reads_went_through_the_daemon(self, fs, daemon, fs_path):
        """The suite above ran attached: the daemon served its reads."""
        fs.pipe_file(f"{fs_path}/file", b"data")
        assert fs.cat_file(f"{fs_path}/file") == b"data"
        with DaemonClient(daemon.socket_path, "t") as client:
            assert client.stats()["reads"] > 0
        fs.rm(fs_path, recursive=True)
