"""Scale by simulation: the planned allocation and one-pool-per-stage on N logical GPUs
(tests/harness/simulation.py), with results, a table and a plot for docs/benchmarks.md.

    .venv/bin/python benchmarks/simulate.py [--profile PROFILE.json] [--gpus 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.manifest import MANIFESTS_DIR, load_manifest  # noqa: E402
from jobs.plan.costs import Profile, flops_profile  # noqa: E402
from tests.harness.simulation import markdown, plot, sweep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="measured profile JSON; default: FLOP counts of manifests/production.yaml")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--gpu-memory", type=float, default=80.0)
    parser.add_argument("--out", default="benchmarks/results/simulation.json")
    parser.add_argument("--plot", default="docs/simulation.png")
    parser.add_argument("--images", type=int, help="images per run (default: enough for ~15 s of steady state)")
    parser.add_argument("--report", metavar="RESULTS", help="print a results file as a markdown table, run nothing")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())["results"]))
        return
    profile = (
        Profile.load(args.profile) if args.profile else flops_profile(load_manifest(MANIFESTS_DIR / "production.yaml"))
    )
    results = sweep(profile, args.gpus, args.gpu_memory, args.images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"profile": profile.source, "device": profile.device, "results": results}, indent=1))
    plot(results, Path(args.plot), f"Images/hour vs GPUs ({profile.source}, {profile.device})")
    print(markdown(results))
    print(f"wrote {out} and {args.plot}")


if __name__ == "__main__":
    main()
