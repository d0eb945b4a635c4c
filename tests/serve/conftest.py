"""Fixtures of the serve tests (helpers: serve_helpers.py)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="mukv serve needs the serve extra: pip install 'mukv[serve]'")
pytest.importorskip("lancedb", reason="mukv serve keeps streams in the lancedb backend")

from serve_helpers import free_port, serving, wait_until  # noqa: E402


@pytest.fixture
def serve(tmp_path, tiny_model):
    """A factory: ``with serve(**fields) as (client, app, url)`` over ``tmp_path/store``."""

    def make(store=None, **fields):
        return serving(store or tmp_path / "store", tiny_model, **fields)

    return make



@pytest.fixture(scope="module")
def moto_s3():
    """moto's S3 server on loopback with a bucket "mukv"; yields (storage_options, environment)."""
    pytest.importorskip("moto.server", reason="the S3 tests need moto's server: pip install 'moto[server]'")
    pytest.importorskip("obstore", reason="the S3 tests need obstore")
    boto3 = pytest.importorskip("boto3", reason="creating the test bucket needs boto3")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": endpoint,
           "AWS_ENDPOINT": endpoint, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
           "AWS_EC2_METADATA_DISABLED": "true"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    try:
        def up():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_until(up, 20, 0.1, "moto to start")
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="mukv")
        yield ({"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "aws_endpoint": endpoint,
                "aws_region": "us-east-1", "allow_http": "true"}, env)
    finally:
        mp.undo()
        proc.terminate()
        proc.wait(timeout=10)
