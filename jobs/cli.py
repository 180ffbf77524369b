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

    manifest = load_manifest(args.manifest, args.set)
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
    manifest = load_manifest(args.manifest, args.set)
    print(json.dumps(json.loads(manifest.model_dump_json()), indent=2))
    return 0


def _tiny_models(args: argparse.Namespace) -> int:
    from workers.tiny import build_tiny_models

    for stage, path in build_tiny_models(args.dir).items():
        print(f"{stage}: {path}")
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
