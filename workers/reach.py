"""A first contact with an s3:// location, before a job does anything there: an endpoint that does
not answer, or credentials that are nowhere, stop the job at once with what to fix, instead of
after the minutes a run's retries (workers/storage.py) would spend."""

from __future__ import annotations

from workers.errors import StorageError
from workers.storage import bucket_key, is_s3, s3_endpoint

REACH_S = 5  # how long a first contact with an S3 endpoint may take before the job stops


def check_reachable(uri: str, what: str):
    """Fail at once, not after the retries of a run (minutes), when an s3:// location's bucket
    cannot be used: its endpoint does not answer, no credentials are found, the bucket is missing
    or refused. A few tries ride out a passing 503. Returns the client it used (None for a local path)."""
    if not is_s3(uri):
        return None
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, _ = bucket_key(uri)
    config = Config(connect_timeout=REACH_S, read_timeout=2 * REACH_S, retries={"max_attempts": 3})
    client = boto3.client("s3", endpoint_url=s3_endpoint(), config=config)
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
            f"{what} {uri}: bucket '{bucket}' is not usable ({hint}). Nothing was read or written. Fix: create "
            f"it, grant access, or point {what} elsewhere."
        ) from None
    except NoCredentialsError:
        raise StorageError(
            f"{what} {uri}: no AWS credentials found. Expected them in the standard places. Fix: set "
            f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run where an instance or "
            f"pod role provides them."
        ) from None
    except BotoCoreError as err:
        endpoint = s3_endpoint() or "AWS S3"
        raise StorageError(
            f"{what} {uri}: cannot reach {endpoint} ({err}). Nothing was read or written. Fix: check the "
            f"network, AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for a non-AWS server, and AWS_REGION."
        ) from None
    return client
