"""`wanlite export`: a student folder -> one ComfyUI `.safetensors` file in native Wan names."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wanlite.config import EXPORT_DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a student to a ComfyUI-loadable .safetensors file",
        description=(
            "Write the student as ONE .safetensors file with native Wan 2.1 T2V tensor names (the complete "
            "WanModel key set ComfyUI expects in models/diffusion_models/), its architecture in the header "
            "('config' entry), provenance (wanlite version, student sha256, teacher sha256) and the student's "
            "sampling settings ('wanlite_sampling': steps, shift, guidance, negative prompt, sampler). A ComfyUI "
            "workflow with those settings (<name>.workflow.json) is written beside it. The file is written "
            "under a temporary name and renamed (mode from your umask, 0644 by default), or uploaded to a "
            "store URI with its manifest last."
        ),
    )
    parser.add_argument("student", help="student folder (diffusers save_pretrained) or store URI")
    parser.add_argument(
        "--out",
        help="output .safetensors path, a directory (created when missing), or a store URI (file://..., s3://...); "
        "default: the preset's name (e.g. wanlite-1024.safetensors) in the current directory",
    )
    parser.add_argument("--dtype", default="bf16", help=f"tensor dtype: {', '.join(EXPORT_DTYPES)} (default bf16)")
    parser.add_argument(
        "--prefix", action="store_true", help="prefix every key with 'model.diffusion_model.' (default: bare keys)"
    )
    parser.add_argument("--teacher-sha", help="sha256 of the teacher checkpoint, recorded as provenance")
    parser.add_argument("--report", type=Path, help="also write the JSON export report to this file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.export import export_student

    report = export_student(
        args.student, args.out, dtype=args.dtype, prefix=args.prefix, teacher_sha256=args.teacher_sha
    )
    text = json.dumps(report, indent=2)
    if args.report:
        args.report.write_text(text)
    print(text)
    return 0
