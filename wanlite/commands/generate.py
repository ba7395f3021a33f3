"""`wanlite generate`: one image from a student (registered model, diffusers folder or ComfyUI file)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate an image with a student and the teacher's T5 and VAE",
        description=(
            "Sample one image with diffusers' WanPipeline (one frame): the student transformer plus the "
            "teacher's tokenizer, T5 encoder and VAE. --model is models:/NAME@ALIAS (MLflow registry), a "
            "diffusers student folder, or a ComfyUI .safetensors export (its architecture is read from the "
            "file). Steps, shift, guidance and the negative prompt are the model's recorded sampling settings "
            "(wanlite_sampling) unless a flag overrides them; the JSON report lists every override. "
            "Shows a progress bar; writes a PNG."
        ),
    )
    parser.add_argument(
        "--model", required=True, help="models:/wanlite-tiny@champion, a student folder, or a .safetensors export"
    )
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (for its T5 and VAE), folder or store URI")
    parser.add_argument("--prompt", required=True, help="text prompt (non-empty)")
    parser.add_argument("--out", default="image.png", help="output PNG (default image.png)")
    parser.add_argument(
        "--negative-prompt",
        help="negative prompt, used when the model (or --guidance) samples with CFG (default: Wan's official one)",
    )
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's recorded sampling settings)")
    parser.add_argument(
        "--guidance",
        type=float,
        help="CFG scale (default: the model's; 1 for students with guidance folded in, which is the DAG's default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, help="image size in pixels (default: the preset's)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.generate import generate

    report = generate(
        args.model,
        args.teacher,
        args.prompt,
        args.out,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        size=args.size,
        tracking_uri=args.tracking_uri,
        device=args.device,
        negative_prompt=args.negative_prompt,
    )
    print(json.dumps(report, indent=2))
    return 0
