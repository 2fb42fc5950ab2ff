"""A local S3-compatible object store (moto's server mode) holding a model, for loading weights from `s3://`."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx

from tests.support.worker_process import free_port, wait_until

# moto accepts any credentials; the engine must still be given some, as it would be in production.
ACCESS_KEY_ID = "worker-test-key"
SECRET_ACCESS_KEY = "worker-test-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    def client(self):  # type: ignore[no-untyped-def]  # boto3 clients are generated at run time
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=ACCESS_KEY_ID,
                            aws_secret_access_key=SECRET_ACCESS_KEY, region_name=REGION)

    def upload_directory(self, directory: Path, bucket: str, prefix: str) -> str:
        """Put every file of `directory` under `s3://bucket/prefix/` (the bucket is created) and return that URL."""
        client = self.client()
        client.create_bucket(Bucket=bucket)
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def worker_env(self) -> dict[str, str]:
        """What a worker needs to read `s3://` sources from this store."""
        return {"WORKER_S3_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY, "AWS_REGION": REGION}


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def s3_server(log_path: Path) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 for the duration of the block."""
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        if not wait_until(lambda: process.poll() is not None or _answers(endpoint), timeout_s=60):
            raise TimeoutError(f"moto's S3 server did not answer:\n{log_path.read_text(errors='replace')}")
        if process.poll() is not None:
            raise RuntimeError(f"moto's S3 server exited:\n{log_path.read_text(errors='replace')}")
        yield S3Server(endpoint)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
