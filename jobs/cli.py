"""The `ifrender` command: run a manifest, validate one, build tiny models."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.manifest import DEFAULT_MANIFEST, ManifestError, load_manifest

log = logging.getLogger("ifrender")

# Exit codes: 0 done (error rows are reported, not fatal), 1 stopped before rendering,
# 3 every row failed, 4 some shards were left incomplete (run the same command again).
EXIT_CONFIG, EXIT_ALL_FAILED, EXIT_INCOMPLETE = 1, 3, 4


def _run(args: argparse.Namespace) -> int:
    from jobs.render import run

    manifest = load_manifest(args.manifest, args.set, args.run_date, args.run_id)
    summary = run(
        manifest,
        overwrite=args.overwrite,
        retry_errors=args.retry_errors,
        allow_changed=args.allow_changed,
        progress=not args.quiet,
    )
    print(summary.text())
    if summary.uncommitted_shards:
        return EXIT_INCOMPLETE
    return EXIT_ALL_FAILED if summary.rows and not summary.ok else 0


def _status(args: argparse.Namespace) -> int:
    from jobs.status import status

    print(status(args.output, show_all=args.all))
    return 0


def _validate(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest, args.set, args.run_date, args.run_id)
    print(json.dumps(json.loads(manifest.model_dump_json()), indent=2))
    return 0


def _tiny_models(args: argparse.Namespace) -> int:
    from workers.tiny import build_tiny_models

    for stage, path in build_tiny_models(args.dir).items():
        print(f"{stage}: {path}")
    return 0


def _stage_models(args: argparse.Namespace) -> int:
    import os

    from jobs.render import resolve_tiny
    from jobs.weights import stage_models

    manifest = resolve_tiny(load_manifest(args.manifest, args.set))
    token = os.environ.get(args.token_env) or None
    staged = stage_models(manifest, args.to, token=token)
    print("staged; render from the copy with:")
    print(" ".join(f"--set {stage}.model={path}" for stage, path in staged.items()))
    return 0


def _sync_models(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jobs.weights import sync_mirror

    for uri in args.mirror:
        print(sync_mirror(uri, Path(args.cache) if args.cache else None))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ifrender", description="Render a prompt dataset through the DeepFloyd IF cascade on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def manifest_args(p: argparse.ArgumentParser) -> None:
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

    p = sub.add_parser("run", help="render a manifest's prompts to images and metadata")
    manifest_args(p)
    p.add_argument("--overwrite", action="store_true", help="delete the output first and start over")
    p.add_argument("--retry-errors", action="store_true", help="render again the rows that failed before")
    p.add_argument(
        "--allow-changed", action="store_true", help="continue an output made with other settings, using the new ones"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)

    p = sub.add_parser("status", help="done / pending / failed rows per shard of an output")
    p.add_argument("output", help="the job's output.path (directory or s3://bucket/prefix)")
    p.add_argument("--all", action="store_true", help="list every shard, not only unfinished ones")
    p.set_defaults(func=_status)

    p = sub.add_parser("validate", help="check a manifest and print it with all defaults")
    manifest_args(p)
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

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (ManifestError, ValueError, RuntimeError, OSError) as err:
        # Anticipated failures print one clear message; anything else keeps its traceback.
        print(f"ifrender: error: {err}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
