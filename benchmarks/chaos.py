"""End-to-end chaos on a real local Ray: run the job, SIGKILL the driver's process group (the
driver and its local Ray, as a preempted node would) or one stage actor at a random moment,
resume, and again, for --kills points; then let the job finish and check every reader of the
output. Prints kill points tried, rows lost and rows duplicated per reader.

    python benchmarks/chaos.py --kills 50 --workdir /tmp/ifrender-chaos   # about 40 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.output.commits import list_commits  # noqa: E402
from jobs.plan.models import build_models  # noqa: E402
from tests.harness.chaos import READERS, Figures, read_rows  # noqa: E402

STAGES = ("EncodeWorker", "Stage1Worker", "Stage2Worker", "WriteWorker")


def job_args(models: Path, prompts: Path, out: Path) -> list[str]:
    sets = [
        f"input.path={prompts}",
        f"output.path={out}",
        "input.shard_size=4",
        "last_stage=stage2",
        # A pool per stage (local-tiny runs one replica): the chaos kills one stage's actor at a time.
        "groups=[]",
        *(f"{stage}.num_cpus=0.5" for stage in ("encode", "stage1", "stage2")),
        "score.num_cpus=0.25",
        f"encode.model={models / 'IF-I-tiny'}",
        f"stage1.model={models / 'IF-I-tiny'}",
        f"stage2.model={models / 'IF-II-tiny'}",
        "stage1.num_inference_steps=4",
        "stage2.num_inference_steps=4",
        "output.embed_images=true",
        "output.webdataset=true",
    ]
    return [sys.executable, "-m", "jobs.cli", "run", *[a for s in sets for a in ("--set", s)], "--quiet"]


def kill_actor(pick: random.Random) -> str | None:
    import psutil

    stage = pick.choice(STAGES)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if f"MapBatches({stage})" in " ".join(proc.info["cmdline"] or []):
            os.kill(proc.info["pid"], signal.SIGKILL)
            return stage
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/ifrender-chaos")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models, prompts, out = work / "models", work / "prompts.txt", work / f"out-{int(time.time())}"
    if not (models / "IF-I-tiny").exists():
        build_models(models)
    prompts.write_text("".join(f"prompt {i}: a lighthouse in a storm\n" for i in range(args.rows)))
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    pick = random.Random(args.seed)
    tried: dict[str, int] = {"driver": 0, "actor": 0}
    runs = 0
    while sum(tried.values()) < args.kills:
        job = subprocess.Popen(
            job_args(models, prompts, out),
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        runs += 1
        # a moment somewhere in the run: loading, rendering, committing or publishing
        time.sleep(pick.uniform(8, 40))
        if job.poll() is not None:
            if len(list_commits(str(out))) * 4 >= args.rows:
                out = work / f"out-{int(time.time())}"  # finished before the kill: start a new output
            continue
        if pick.random() < 0.5:
            os.killpg(job.pid, signal.SIGKILL)
            tried["driver"] += 1
        elif kill_actor(pick):
            tried["actor"] += 1
        job.wait()
        print(
            f"kill {sum(tried.values())}/{args.kills} ({tried}); {len(list_commits(str(out)))} shards committed",
            flush=True,
        )
    final = subprocess.run(job_args(models, prompts, out), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-3000:]
    figures = Figures(trials=sum(tried.values()))
    expected = {(r, 0) for r in range(args.rows)}
    for reader in READERS:
        seen = read_rows(str(out), reader, str(work / "hf"))
        figures.reads[reader] += 1
        figures.lost[reader] += len(expected - set(seen))
        figures.duplicated[reader] += len(seen) - len(set(seen))
    print(figures.table())
    print(json.dumps({"kills": tried, "runs": runs, "output": str(out)}))


if __name__ == "__main__":
    main()
