"""A real S3 API for the storage tests: moto's server on a free 127.0.0.1 port with the test bucket
(as s3fs's own tests use), a fresh ``s3://`` prefix per test, and the objects under one."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from storage.location import StorePath, as_store_path

BUCKET = "factory-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "test-key-id",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on a free local port, with the test bucket; credentials from the environment."""
    import s3fs
    from moto import server as moto_server

    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_ENV.items():
            mp.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            mp.delenv(key, raising=False)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        # moto keeps its buckets per process, across servers: an earlier module may have made it already
        s3fs.S3FileSystem(endpoint_url=url, skip_instance_cache=True).makedirs(BUCKET, exist_ok=True)
        try:
            yield url
        finally:
            server.stop()


def fresh_root(endpoint: str) -> StorePath:
    """A fresh s3:// prefix for one test, as the stores get it from settings."""
    return as_store_path(f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}", {"endpoint_url": endpoint})


def keys(root) -> list[str]:
    """Every object under ``root``, relative to it."""
    prefix = root.path + "/"
    return sorted(k[len(prefix) :] for k in root.fs.find(root.path))
