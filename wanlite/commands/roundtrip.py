"""`wanlite roundtrip`: prove a student reloads in a fresh process with stock diffusers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wanlite.config import EXPORT_DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "roundtrip",
        help="save -> reload in a fresh process (stock from_pretrained) -> identical outputs",
        description=(
            "Save the student with save_pretrained, load it in a NEW Python process with stock "
            "diffusers WanTransformer3DModel.from_pretrained, and compare outputs on fixed inputs "
            "(fp32: bit-identical; bf16/fp16: within rounding). With --teacher, the teacher directory "
            "is hidden from the child during the load, proving the student needs no teacher file. "
            "Prints a JSON report (load time vs a raw safetensors read of the same bytes included); "
            "exit status 1 when the check fails."
        ),
    )
    parser.add_argument("student", help="student folder (diffusers save_pretrained) or store URI")
    parser.add_argument("--dtype", default="fp32", help=f"dtype to save and compare in: {', '.join(EXPORT_DTYPES)}")
    parser.add_argument("--teacher", help="teacher directory to hide from the loading process")
    parser.add_argument("--report", type=Path, help="also write the JSON report to this file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.roundtrip import roundtrip

    report = roundtrip(args.student, dtype=args.dtype, teacher=args.teacher)
    text = json.dumps(report, indent=2)
    if args.report:
        args.report.write_text(text)
    print(text)
    return 0 if report["passed"] else 1
