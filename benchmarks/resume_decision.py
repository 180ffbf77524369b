"""How long a resume takes to decide what is left, on an output of 10,000 committed rows.

Builds committed outputs through the production commit path (commit_shard: metadata file, then
conditional marker) on local disk and on a local S3 server (moto on 127.0.0.1), then times what
`ifrender run` does before any model work on a resume: plan the input, read the job record,
list and read the commit markers, and work out the shards left.

    .venv/bin/python benchmarks/resume_decision.py [--rows 10000]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from jobs.input.shards import plan_shards
from jobs.manifest import load_manifest
from jobs.output.commits import Work, commit_shard, list_commits, work_left
from jobs.output.job_record import check_job
from workers.columns import METADATA_SCHEMA


def build_output(manifest) -> None:
    shards = plan_shards(manifest.input)
    check_job(manifest.output.path, manifest, allow_changed=False)
    for shard in shards:
        work = Work(shard, 0)
        for r in range(shard.first_row, shard.first_row + shard.num_rows):
            row = dict.fromkeys(METADATA_SCHEMA.names)
            row.update(
                id=f"{r:09d}",
                row=r,
                shard=shard.index,
                status="ok",
                prompt=f"prompt {r}",
                seed=r,
                image_key=f"images/{shard.index:06d}-bench/{r:09d}.png",
            )
            work.rows[r] = row
        assert commit_shard(manifest.output.path, work, "bench")


def decide(manifest) -> tuple[float, int]:
    start = time.perf_counter()
    shards = plan_shards(manifest.input)
    check_job(manifest.output.path, manifest, allow_changed=False)
    left = work_left(manifest.output.path, shards, list_commits(manifest.output.path), retry_errors=False)
    return time.perf_counter() - start, len(left)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    tmp = Path(tempfile.mkdtemp())
    prompts = tmp / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(args.rows)))

    print(f"| output | rows | shard size | shards | decide (median of {args.repeats}) | shards left |")
    print("|---|---|---|---|---|---|")
    for where in ("local", "s3"):
        for shard_size in (1000, 100):
            out = f"s3://bench/{shard_size}" if where == "s3" else str(tmp / f"out-{shard_size}")
            manifest = load_manifest(
                None, [f"input.path={prompts}", f"output.path={out}", f"input.shard_size={shard_size}"]
            )
            build_output(manifest)
            times = []
            for _ in range(args.repeats):
                seconds, left = decide(manifest)
                times.append(seconds)
            print(
                f"| {where} | {args.rows} | {shard_size} | {args.rows // shard_size} | "
                f"{statistics.median(times) * 1000:.0f} ms | {left} |"
            )
    server.stop()


if __name__ == "__main__":
    main()
