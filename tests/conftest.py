"""Shared fixtures: a tiny prepared corpus made from real text on this machine, and a real
S3-compatible server on loopback (``s3_server``: moto's server mode) for object-store tests."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` are skipped, with the reason, where torch sees no CUDA GPU
    (every developer's and CI's machine today; ``benchmarks/gpu_check.sh`` runs them on one)."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A byte-level corpus from a few standard-library modules (no download, no BPE training)."""
    from baobab import data as bdata

    files = [str(p) for p in bdata.stdlib_files()[:40]]
    out = tmp_path_factory.mktemp("corpus") / "bytes"
    bdata.prepare(
        bdata.PrepareConfig(
            inputs=files,
            out=str(out),
            tokenizer="bytes",
            val_fraction=0.2,
            workers=1,
            progress=False,
        )
    )
    return out


# -- a real S3-compatible server on loopback (moto's server mode), for every object-store test --
# Credentials that look real, so that leak tests can grep for them; moto accepts any.
S3_TEST_KEY = "AKIABAOBABLEAKTEST77"
S3_TEST_SECRET = "bAoBaB+Leak/Test/s3cr3t0123456789abcdefXYZ"


class S3Server:
    """The loopback server: ``endpoint``, a boto3 ``client``, fresh buckets, and the
    credentials in the environment (``secrets``: what must never be written anywhere)."""

    def __init__(self, endpoint: str) -> None:
        import boto3

        self.endpoint = endpoint
        self.secrets = (S3_TEST_KEY, S3_TEST_SECRET)
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self._made = 0

    def new_bucket(self, stem: str = "baobab") -> str:
        """Create an empty bucket of its own and return its URL, ``s3://<name>``."""
        self._made += 1
        name = f"{stem}-{self._made}"
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def objects(self, bucket_url: str) -> dict[str, bytes]:
        """key -> bytes of every object in the bucket ``s3://<name>``."""
        bucket = bucket_url.removeprefix("s3://").split("/", 1)[0]
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        return {k: self.client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port), with the environment baobab reads set
    for the session: endpoint (BAOBAB_S3_ENDPOINT_URL), region and the secret-looking
    S3_TEST_KEY / S3_TEST_SECRET; subprocesses inherit it. No config files, no IMDS."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "BAOBAB_S3_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": S3_TEST_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_TEST_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_REGION"):
            mp.delenv(name, raising=False)
        yield S3Server(f"http://{host}:{port}")
    server.stop()
