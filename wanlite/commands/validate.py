"""`wanlite validate TEACHER`: check a teacher checkpoint by its headers before any GPU time is spent."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPORT_ROOT = Path(".wanlite") / "reports"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a Wan 2.2 T2V-A14B teacher checkpoint (headers only, no weights read)",
        description=(
            "Check a Wan 2.2 T2V-A14B teacher checkpoint, native or diffusers layout: every required file, "
            "every tensor's name, shape and dtype against the configs, shard index vs shards, truncated "
            "files, and that T5, VAE, tokenizer and both experts fit together. Reads only headers "
            "(safetensors JSON headers; .pth via torch.load(weights_only=True, mmap=True), which refuses "
            "pickled objects). Writes validation.json and validation.md. Exit status: 0 valid, 1 problems "
            "found, 2 the teacher could not be read at all."
        ),
    )
    parser.add_argument(
        "teacher",
        metavar="TEACHER",
        help="teacher checkpoint: a local directory or a store URI (file://..., s3://bucket/prefix)",
    )
    parser.add_argument(
        "--report-dir",
        type=Path,
        default=None,
        help=f"where to write validation.json and validation.md (default: {REPORT_ROOT}/validate-<teacher name>)",
    )
    parser.add_argument("--json", action="store_true", help="print the full JSON report instead of a summary")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.checkpoint.validate import validate_teacher

    teacher = _resolve(args.teacher)
    if teacher is None:
        return 2
    report = validate_teacher(teacher)
    report_dir = args.report_dir or REPORT_ROOT / f"validate-{teacher.name or 'teacher'}"
    json_path, md_path = report.write(report_dir)
    print(report.to_json() if args.json else report.summary())
    if not args.json:
        print(f"reports: {json_path} {md_path}")
    return 0 if report.ok else 1


def _resolve(teacher: str) -> Path | None:
    """A local directory for TEACHER; store URIs go through the store, which verifies the manifest."""
    if "://" not in teacher:
        return Path(teacher)
    from wanlite.storage import StoreError, local_dir

    try:
        return local_dir(teacher)
    except StoreError as err:
        print(f"wanlite validate: error: {err}", file=sys.stderr)
        return None
