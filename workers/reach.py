"""A first contact with an s3:// location, before a job does anything there: an endpoint that does
not answer, or credentials that are nowhere, stop the job at once with what to fix, instead of
after the minutes a run's retries (workers/storage.py) would spend."""

from __future__ import annotations

from workers.errors import StorageError
from workers.storage import bucket_key, is_s3, s3_endpoint

REACH_S = 5  # how long a first contact with an S3 endpoint may take before the job stops


def check_reachable(uri: str, what: str) -> None:
    """Fail at once, not after the retries of a run (minutes), when an s3:// location's endpoint
    does not answer: one request with a short timeout and no retry. Any answer passes (a
    refusal of the request itself is the later calls' to report, with their own message)."""
    if not is_s3(uri):
        return
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, _ = bucket_key(uri)
    config = Config(connect_timeout=REACH_S, read_timeout=REACH_S, retries={"total_max_attempts": 1})
    client = boto3.client("s3", endpoint_url=s3_endpoint(), config=config)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        return  # the endpoint answered
    except NoCredentialsError:
        raise StorageError(
            f"{what} {uri}: no AWS credentials found. Expected them in the standard places. Fix: set "
            f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run where an instance or "
            f"pod role provides them."
        ) from None
    except BotoCoreError as err:
        endpoint = s3_endpoint() or "AWS S3"
        raise StorageError(
            f"{what} {uri}: {endpoint} could not be reached within {REACH_S} s ({err}). Nothing was read or written. "
            f"Fix: check the network, AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for a non-AWS server, and "
            f"AWS_REGION."
        ) from None
