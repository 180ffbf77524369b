"""The `ifrender` command: run, status, validate, plan, bench, profile, tiny-models, stage-models and
sync-models (`ifrender --help` lists each with its arguments)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from jobs.manifest import DEFAULT_MANIFEST, load_manifest
from workers.errors import IfrenderError, ManifestError, StorageFailure

# Exit codes: 0 done (error rows are reported, not fatal), 1 stopped before rendering,
# 3 no row of the output is ok, 4 some shards were left incomplete (run the same command again).
EXIT_CONFIG, EXIT_ALL_FAILED, EXIT_INCOMPLETE = 1, 3, 4


def _load(args: argparse.Namespace):
    """The manifest with --set applied, then a saved plan's layout and pools (--plan)."""
    manifest = load_manifest(args.manifest, args.set, args.run_date, args.run_id)
    if not getattr(args, "plan", None):
        return manifest
    from pathlib import Path

    from jobs.plan.search import saved_plan

    try:
        chosen = saved_plan(json.loads(Path(args.plan).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ManifestError(f"--plan {args.plan}: expected a plan saved by `ifrender plan --save` ({err})") from None
    return chosen.apply(manifest)


def _run(args: argparse.Namespace) -> int:
    """The licence notice first, then ifrender's progress line (Ray's own display only with
    --verbose), then the summary last: Ray is shut down before it, so no late line of Ray's follows."""
    from jobs.run.cluster import keep_local
    from jobs.run.terminal import Display, attach, detach, licence_notice

    manifest = _load(args)
    keep_local(manifest)  # before anything imports Ray
    if notice := licence_notice(manifest):
        print(f"ifrender: {notice}", file=sys.stderr)
    from jobs.render import run

    display = Display()
    handler = attach(display)
    try:
        summary = run(
            manifest,
            overwrite=args.overwrite,
            retry_errors=args.retry_errors,
            allow_changed=args.allow_changed,
            progress=not args.quiet,
            stop_after_s=args.stop_after,
            verbose=args.verbose,
            display=display,
        )
    finally:
        display.end()
        detach(handler)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stderr.flush()
    print(summary.text())
    if summary.uncommitted_shards:
        return EXIT_INCOMPLETE
    # 3 only for an output without a good row: a retry whose rows fail again leaves the good ones.
    return EXIT_ALL_FAILED if summary.output_rows and not summary.output_ok else 0


def _status(args: argparse.Namespace) -> int:
    from jobs.output.status import status

    print(status(args.output, show_all=args.all))
    return 0


def _validate(args: argparse.Namespace) -> int:
    """The preflight of `run`, in seconds and without Ray or a model: the manifest with every
    default (stdout, JSON), then each check (stderr): the input and its columns, its first rows,
    the models, the output, the pools. Exit 0 only when `run` would start rendering."""
    if args.explain:
        from jobs.manifest import Manifest
        from jobs.manifest_help import explain

        print(explain(Manifest, args.explain))
        return 0
    from jobs.input.shards import plan_input
    from jobs.run.preflight import checklist

    manifest = load_manifest(args.manifest, args.set, args.run_date, args.run_id)
    print(json.dumps(json.loads(manifest.model_dump_json()), indent=2))
    plan = plan_input(manifest.input)
    files = sorted({s.uri for s in plan.shards})
    rows = sum(s.num_rows for s in plan.shards)
    print(f"input: ok: {rows} rows in {len(plan.shards)} shards, from {len(files)} file(s)", file=sys.stderr)
    print("\n".join(plan.columns.describe()), file=sys.stderr)
    results = checklist(manifest, plan, args.overwrite, args.allow_changed)
    for check, result in results:
        print(f"{check}: {result}", file=sys.stderr)
    failed = [check for check, result in results if result.startswith("FAILED")]
    if failed:
        print(f"ifrender: error: {', '.join(failed)} would stop `run`; fix what is named above", file=sys.stderr)
        return EXIT_CONFIG
    print("ready: `ifrender run` with the same arguments would start rendering", file=sys.stderr)
    return 0


def _tiny_models(args: argparse.Namespace) -> int:
    from jobs.plan.models import build_models

    for stage, path in build_models(args.dir).items():
        print(f"{stage}: {path}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from jobs.plan.costs import Profile, cost_line, flops_profile
    from jobs.plan.search import choose, naive, plan_layouts, why

    manifest = load_manifest(args.manifest, args.set)
    if args.profile:
        profile = Profile.load(args.profile)
    else:
        profile = flops_profile(manifest, args.tflops, args.utilisation)
    layouts = plan_layouts(profile, args.gpus, args.gpu_memory, manifest.ray.mps)
    chosen = choose(layouts)
    print(f"layouts on {args.gpus} GPU(s) of {args.gpu_memory:g} GB, {chosen.sharing}:")
    print("\n".join(why(profile, layouts, chosen)))
    print(chosen.table(args.images))
    if args.images:
        from jobs.plan.schedule import deadlines

        chunk = manifest.ray.chunk_shards and manifest.ray.chunk_shards * manifest.input.shard_size
        print("\n".join(deadlines(chosen, args.images, chunk, args.night_hours)))
    base = naive(profile, args.gpus, args.gpu_memory, manifest.ray.mps)
    print(
        f"  one pool per stage with equal shares: {base.images_per_hour:,.0f} images/hour "
        f"(the plan is {chosen.images_per_second / base.images_per_second:.2f}x)"
    )
    print(cost_line(manifest, chosen.images_per_hour / args.gpus))
    print("in the manifest (a grouped stage's own pool settings go):\n" + chosen.yaml())
    if args.save:
        from dataclasses import asdict
        from pathlib import Path

        record = {"plan": asdict(chosen), "naive_images_per_second": base.images_per_second}
        Path(args.save).write_text(json.dumps(record, indent=2))
        print(f"saved; apply with: ifrender run MANIFEST --plan {args.save}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jobs.bench import bench, report
    from jobs.manifest import MANIFESTS_DIR

    manifest = load_manifest(args.manifest or MANIFESTS_DIR / "bench-tiny.yaml", args.set)
    result = bench(manifest, args.images, Path(args.workdir))
    print(report(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from jobs.plan.profile import profile_stages
    from jobs.run.preflight import resolve_models

    manifest = resolve_models(load_manifest(args.manifest, args.set))
    profile, measurements = profile_stages(manifest, args.batch_sizes)
    for m in measurements:
        print(
            f"{m['stage']:8} batch {m['batch_size']:3d}: {m['seconds_per_image']:.4f} s/image, peak {m['peak_gb']:.2f} GB"
        )
    profile.save(args.out)
    print(f"saved {args.out}; plan with: ifrender plan MANIFEST --gpus N --profile {args.out}")
    return 0


def _stage_models(args: argparse.Namespace) -> int:
    import os

    from jobs.run.preflight import resolve_tiny
    from jobs.weights import stage_models

    manifest = resolve_tiny(load_manifest(args.manifest, args.set))
    token = os.environ.get(args.token_env) or None
    staged = stage_models(manifest, args.to, token=token)
    print("staged; render from the copy with:")
    print(" ".join(f"--set {field}={path}" for field, path in staged.items()))
    return 0


def _sync_models(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workers.models import sync_mirror

    for uri in args.mirror:
        print(sync_mirror(uri, Path(args.cache) if args.cache else None))
    return 0


def manifest_args(p: argparse.ArgumentParser) -> None:
    """The arguments every command that reads a manifest takes."""
    p.add_argument(
        "manifest",
        nargs="?",
        default=str(DEFAULT_MANIFEST),
        help=f"job manifest (default: {DEFAULT_MANIFEST.name})",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a manifest field, e.g. --set stage1.batch_size=8 (repeatable)",
    )
    p.add_argument(
        "--run-date",
        metavar="YYYY-MM-DD",
        help="fills {run_date} in input.path/output.path (default: $IFRENDER_RUN_DATE, else today in UTC)",
    )
    p.add_argument("--run-id", metavar="ID", help="fills {run_id} in input.path/output.path ($IFRENDER_RUN_ID)")


def _render_commands(sub) -> None:
    """run."""
    p = sub.add_parser("run", help="render a manifest's prompts to images and metadata")
    manifest_args(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: delete what an earlier job wrote to this output (an ifrender output only), after the input is checked",
    )
    p.add_argument("--retry-errors", action="store_true", help="render again the rows that failed before")
    p.add_argument(
        "--allow-changed", action="store_true", help="continue an output made with other settings, using the new ones"
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="Ray Data's own progress bars and every library's INFO log and known warnings too",
    )
    p.add_argument(
        "--stop-after",
        type=float,
        metavar="SECONDS",
        help="start no further chunk (ray.chunk_shards) after this many seconds (the first always runs); "
        "the shards left are the next run's (exit code 4): a job bigger than one night runs as nightly "
        "chunks that resume",
    )
    p.add_argument(
        "--plan", metavar="PLAN.json", help="apply pool sizes, GPU shares, batches from `ifrender plan --save`"
    )
    p.set_defaults(func=_run)


def _perf_commands(sub) -> None:
    """The instruments: bench, profile, plan."""
    p = sub.add_parser("bench", help="the Ray pipeline against the sequential baseline, side by side")
    p.add_argument("manifest", nargs="?", help="default: manifests/bench-tiny.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a manifest field")
    p.add_argument("--images", type=int, default=48, help="distinct prompts to render each way (default 48)")
    p.add_argument("--workdir", default="out/bench", help="where both ways write their images")
    p.add_argument("--out", default="benchmarks/results/bench.json", help="where to write the numbers")
    p.set_defaults(func=_bench)

    p = sub.add_parser("profile", help="measure each stage's seconds per image and peak memory at a few batch sizes")
    manifest_args(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4], metavar="B")
    p.add_argument("--out", default="profile.json", help="where to write the profile (default profile.json)")
    p.set_defaults(func=_profile)

    p = sub.add_parser("plan", help="choose pool sizes and GPU shares per stage for a cluster")
    manifest_args(p)
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="memory per GPU (default 80)")
    p.add_argument(
        "--profile", metavar="PROFILE.json", help="measured profile (ifrender profile); default: FLOP counts"
    )
    p.add_argument("--tflops", type=float, default=800.0, help="peak dense TFLOP/s per GPU for the FLOP profile")
    p.add_argument("--utilisation", type=float, default=0.4, help="fraction of peak reached, for the FLOP profile")
    p.add_argument("--images", type=int, help="dataset size, for GPU-hours and the RayJob's deadline")
    p.add_argument(
        "--night-hours",
        type=float,
        default=8.0,
        help="hours a nightly run may take (its activeDeadlineSeconds), for a job bigger than one night (default 8)",
    )
    p.add_argument("--save", metavar="PLAN.json", help="write the plan for `ifrender run --plan`")
    p.set_defaults(func=_plan)


def _output_and_model_commands(sub) -> None:
    """status, validate, and the model staging commands."""
    p = sub.add_parser("status", help="done / pending / failed rows per shard of an output")
    p.add_argument("output", help="the job's output.path (directory or s3://bucket/prefix)")
    p.add_argument("--all", action="store_true", help="list every shard, not only unfinished ones")
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "validate",
        help="the preflight of run, in seconds: the manifest with all defaults, its input, first rows, models, "
        "output and pools; exit 0 only when run would start rendering",
    )
    manifest_args(p)
    p.add_argument("--overwrite", action="store_true", help="check as `run --overwrite` would")
    p.add_argument("--allow-changed", action="store_true", help="check as `run --allow-changed` would")
    p.add_argument(
        "--explain",
        metavar="FIELD",
        help="print a field's description, type, default and bounds, e.g. stage1.guidance_scale",
    )
    p.set_defaults(func=_validate)

    p = sub.add_parser("tiny-models", help="build tiny random-weight checkpoints of the IF cascade")
    p.add_argument("dir", help="directory to write IF-I-tiny, IF-II-tiny, x4-upscaler-tiny into")
    p.set_defaults(func=_tiny_models)

    p = sub.add_parser("stage-models", help="copy the checkpoint files a manifest loads to a directory or s3:// mirror")
    manifest_args(p)
    p.add_argument("--to", required=True, metavar="DEST", help="directory or s3://bucket/prefix")
    p.add_argument("--token-env", default="HF_TOKEN", metavar="VAR", help="environment variable holding the hub token")
    p.set_defaults(func=_stage_models)

    p = sub.add_parser("sync-models", help="copy staged checkpoints from an s3:// mirror to this machine's disk")
    p.add_argument("mirror", nargs="+", help="s3://bucket/prefix/NAME of a staged checkpoint")
    p.add_argument("--cache", help="local root (default: $IFRENDER_MODEL_CACHE or ~/.cache/ifrender/models)")
    p.set_defaults(func=_sync_models)


def quiet_libraries(verbose: bool) -> None:
    """ifrender's own loggers speak at INFO; every other library's at WARNING unless --verbose
    (botocore's "Found credentials", Ray Data's execution plans and progress log)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    for ours in ("jobs", "workers"):
        logging.getLogger(ours).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ifrender", description="Render a prompt dataset through the DeepFloyd IF cascade on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _render_commands(sub)
    _perf_commands(sub)
    _output_and_model_commands(sub)
    args = parser.parse_args(argv)
    quiet_libraries(verbose=getattr(args, "verbose", False))
    if args.command == "run":  # rendered in a child process, so that a Ray that dies under it is reported
        from jobs.run.supervise import supervised

        try:
            out = load_manifest(args.manifest, args.set, args.run_date, args.run_id).output.path
        except Exception:  # noqa: BLE001 - the command itself reports a manifest it cannot load
            return _command(args)
        from jobs.run.terminal import COLUMNS, TTY

        # The run's own stderr is a pipe to this process: tell it what the terminal is.
        os.environ[TTY] = "1" if sys.stderr.isatty() else "0"
        if sys.stderr.isatty():
            os.environ[COLUMNS] = str(os.get_terminal_size(2).columns)
        return supervised(lambda: _command(args), out)
    return _command(args)


def _command(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except StorageFailure as err:  # the output refused writes mid-run: what committed stays
        print(f"ifrender: stopped: {err}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except (IfrenderError, ValueError, RuntimeError, OSError) as err:
        # Anticipated failures print one clear message; anything else keeps its traceback.
        print(f"ifrender: error: {err}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
