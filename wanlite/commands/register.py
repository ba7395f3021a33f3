"""`wanlite register`: log a shipped student to MLflow and register a model version."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wanlite.config import CANDIDATE, CHAMPION


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "register",
        help="log the run to MLflow and register a model version (candidate / champion aliases)",
        description=(
            "Create an MLflow run with params, evaluation metrics, the export/round-trip/evaluation reports, "
            "the sample grid, the diffusers folder and the ComfyUI file; register it as a version of "
            "'wanlite-<preset>' tagged with teacher sha, data hash, code version and eval metrics; alias it "
            f"'{CANDIDATE}', and '{CHAMPION}' when its evaluation score beats the current "
            "champion's. Refuses (registering nothing) when the evaluation gate failed or a report is missing, "
            "failed, or about other files. The tracking server comes from --tracking-uri or MLFLOW_TRACKING_URI."
        ),
    )
    parser.add_argument("--student", required=True, help="student folder (diffusers) or store URI")
    parser.add_argument("--export", required=True, help="ComfyUI .safetensors file, or the export folder/store URI")
    parser.add_argument("--export-report", type=Path, help="export report JSON (default: inside the export folder)")
    parser.add_argument("--roundtrip-report", type=Path, help="round-trip report JSON (required)")
    parser.add_argument(
        "--eval-report", help="evaluation report JSON, or the evaluation folder/store URI (required; grid beside it)"
    )
    parser.add_argument("--preset", help="preset name for the model name wanlite-<preset> (default: from the arch)")
    parser.add_argument("--teacher-sha", help="teacher sha256 (default: from the export's header)")
    parser.add_argument("--data-hash", help="hash of the distillation data set")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--experiment", default="wanlite", help="MLflow experiment name (default wanlite)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="extra run param")
    parser.add_argument("--report", type=Path, help="also write the JSON registration report to this file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = dict(_key_value(p) for p in args.param)
    from wanlite import registry

    shipment = registry.check_shipment(
        args.student,
        args.export,
        export_report=args.export_report,
        roundtrip_report=args.roundtrip_report,
        eval_report=args.eval_report,
    )
    report = registry.register(
        shipment,
        tracking_uri=args.tracking_uri,
        preset=args.preset,
        teacher_sha256=args.teacher_sha,
        data_hash=args.data_hash,
        experiment=args.experiment,
        params=params,
    )
    text = json.dumps(report, indent=2)
    if args.report:
        args.report.write_text(text)
    print(text)
    return 0


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--param: expected KEY=VALUE, found {text!r}")
    return key, value
