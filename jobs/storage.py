"""Local paths and s3:// URIs behind one small interface (pyarrow filesystems), plus fail-fast checks."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """An input or output location that cannot be used; the message says which and why."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint() -> str | None:
    """A custom S3 endpoint (MinIO, a local test server), as boto3 reads it from the environment."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem() -> pafs.S3FileSystem:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = s3_endpoint()
    if not endpoint:
        return pafs.S3FileSystem(region=region)
    # pyarrow does not read the endpoint variables itself: pass them on explicitly.
    scheme, _, host = endpoint.partition("://")
    return pafs.S3FileSystem(region=region, endpoint_override=host or scheme, scheme=scheme if host else "https")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). S3 honours AWS_ENDPOINT_URL_S3 and the usual AWS credentials."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme; expected a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def write_bytes(uri: str, data: bytes, fs: pafs.FileSystem | None = None) -> None:
    """Write a whole object. Locally through a temporary name and a rename, so a reader never
    sees a half-written file; on S3 a single PUT is atomic already."""
    if fs is None:
        fs, path = resolve(uri)
    else:
        path = resolve(uri)[1]
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def check_output_writable(uri: str) -> None:
    """Fail before any model work when the output cannot be written."""
    if not is_s3(uri):
        path = Path(resolve(uri)[1])
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".ifrender-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise StorageError(
                f"output.path {uri}: cannot write there ({err}). Fix: choose a writable directory."
            ) from err
        return

    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = uri[len("s3://") :].split("/", 1)[0]
    client = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "?")
        hint = {
            "404": "the bucket does not exist",
            "NoSuchBucket": "the bucket does not exist",
            "403": "access denied: check the credentials or role",
        }.get(code, f"error {code}")
        raise StorageError(
            f"output.path {uri}: bucket '{bucket}' is not usable ({hint}). Fix: create it or point output.path elsewhere."
        ) from err
    except BotoCoreError as err:
        endpoint = s3_endpoint() or "AWS S3"
        raise StorageError(
            f"output.path {uri}: cannot reach {endpoint} ({err}). Fix: check the network, the endpoint and the credentials."
        ) from err
