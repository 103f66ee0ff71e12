"""A local S3 server (moto's server mode on 127.0.0.1) for the demo, tests and benchmarks.

Needs the ``test`` extra (``moto[server]``). No cloud account is involved:
every request stays on this machine.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalS3:
    """A moto S3 server that can be stopped and started again on the same port.

    Buckets and objects live in this process's memory and survive a
    stop/start, which lets tests take the remote away and bring it back.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> "LocalS3":
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        ).create_bucket(Bucket=name)

    def storage_options(self, **extra) -> dict:
        """s3fs options that reach this server (dummy credentials, short timeouts)."""
        options = {
            "key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            "config_kwargs": {"connect_timeout": 1, "read_timeout": 5, "retries": {"max_attempts": 1}},
        }
        options.update(extra)
        return options

    def filesystem(self, **extra):
        """An ``s3fs.S3FileSystem`` on this server, with s3fs's own retry loop off
        (igtcache retries on its own)."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options(**extra))
        fs.retries = 1
        return fs

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
