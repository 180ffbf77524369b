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

import pyarrow as pa
import pyarrow.parquet as pq

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


def decide(manifest) -> tuple[float, float, int]:
    """(seconds to decide, of which planning the input: its one pass and the fingerprints, shards left)."""
    start = time.perf_counter()
    shards = plan_shards(manifest.input)
    planned = time.perf_counter() - start
    check_job(manifest.output.path, manifest, allow_changed=False)
    left = work_left(manifest.output.path, shards, list_commits(manifest.output.path), retry_errors=False)
    return time.perf_counter() - start, planned, len(left)


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
    inputs = {"text": tmp / "prompts.txt", "parquet": tmp / "prompts.parquet"}
    lines = [
        f"prompt {i}: a lighthouse on a cliff at dusk, oil on canvas, by a painter of the sea" for i in range(args.rows)
    ]
    inputs["text"].write_text("".join(line + "\n" for line in lines))
    # Parquet shards are fingerprinted by their rows' values: one pass over every column.
    columns = {
        "prompt": lines,
        "similarity": [i / args.rows for i in range(args.rows)],
        "key": [f"{i:09d}" for i in range(args.rows)],
    }
    pq.write_table(pa.table(columns), inputs["parquet"])

    print(
        f"| input | output | rows | shard size | shards | decide (median of {args.repeats}) | of it, the input's plan | shards left |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for fmt, prompts in inputs.items():
        for where in ("local", "s3"):
            for shard_size in (1000, 100):
                out = f"s3://bench/{fmt}-{shard_size}" if where == "s3" else str(tmp / f"out-{fmt}-{shard_size}")
                manifest = load_manifest(
                    None, [f"input.path={prompts}", f"output.path={out}", f"input.shard_size={shard_size}"]
                )
                build_output(manifest)
                times, plans = [], []
                for _ in range(args.repeats):
                    seconds, planned, left = decide(manifest)
                    times.append(seconds)
                    plans.append(planned)
                print(
                    f"| {fmt} | {where} | {args.rows} | {shard_size} | {args.rows // shard_size} | "
                    f"{statistics.median(times) * 1000:.0f} ms | {statistics.median(plans) * 1000:.0f} ms | {left} |"
                )
    server.stop()


if __name__ == "__main__":
    main()
