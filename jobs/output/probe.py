"""Whether output.path can be written, before any model work: a local folder takes a file; an S3
bucket is reachable and honours the conditional writes that commits rest on."""

from __future__ import annotations

import uuid
from pathlib import Path

from workers.errors import StorageError
from workers.reach import check_reachable
from workers.storage import bucket_key, is_s3, resolve


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

    client = check_reachable(uri, "output.path")
    _probe_conditional_writes(client, uri)


def _probe_conditional_writes(client, uri: str) -> None:
    """Commits rest on conditional creates (If-None-Match: *): write a probe twice. A store that
    lets the second write through, or refuses the header, would let two jobs both commit a shard."""
    from botocore.exceptions import ClientError

    bucket, prefix = bucket_key(uri.rstrip("/") + "/")
    key = f"{prefix}.ifrender-probe-{uuid.uuid4().hex}"
    fix = (
        "Fix: write to an S3 store that honours conditional writes (AWS S3 does; check the version of a "
        "MinIO or gateway), or to a local or mounted directory."
    )

    def create() -> bool:
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")
            return True
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                return False  # refused: the key exists (for the first, a retry whose first try landed)
            raise StorageError(
                f"output.path {uri}: a conditional write of a probe object failed ({err}); expected it to "
                f"succeed, then a second one to fail with 412. {fix}"
            ) from err

    try:
        create()
        if create():
            raise StorageError(
                f"output.path {uri}: the store ignores If-None-Match: a second create of one key succeeded; "
                f"expected 412 Precondition Failed. {fix}"
            )
    finally:
        client.delete_object(Bucket=bucket, Key=key)
