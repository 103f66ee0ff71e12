"""Shared fixtures: a real S3 HTTP server (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import socket

import boto3
import pytest
import s3fs
from moto.server import ThreadedMotoServer

BUCKET = "igtcache-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """A moto S3 server that tests can stop and start again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def storage_options(self, **extra) -> dict:
        options = {
            "key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            "config_kwargs": {"connect_timeout": 1, "read_timeout": 5, "retries": {"max_attempts": 1}},
        }
        options.update(extra)
        return options

    def filesystem(self, **extra) -> s3fs.S3FileSystem:
        fs = s3fs.S3FileSystem(**self.storage_options(**extra))
        fs.retries = 1  # igtcache retries on its own; keep s3fs's inner loop out of fault tests
        return fs


@pytest.fixture(scope="session")
def s3_server(monkeypatch_session_env):
    server = S3Server()
    server.start()
    boto3.client(
        "s3", endpoint_url=server.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ).create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def monkeypatch_session_env():
    mp = pytest.MonkeyPatch()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        mp.setenv(name, "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield
    mp.undo()


@pytest.fixture
def s3(s3_server, request) -> tuple[s3fs.S3FileSystem, str]:
    """A fresh prefix in the test bucket: ``(filesystem, "bucket/prefix")``."""
    fs = s3_server.filesystem()
    prefix = f"{BUCKET}/{request.node.name.replace('[', '_').replace(']', '')}"
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    return fs, prefix
