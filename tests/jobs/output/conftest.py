"""An output on a local disk and on a real S3 server (moto on 127.0.0.1): the tests of the output
protocol (commits, leases) run on both."""

from __future__ import annotations

import os
import time

import boto3
import pytest


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_server")
    bucket = f"out-{os.getpid()}-{time.monotonic_ns()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/job"
