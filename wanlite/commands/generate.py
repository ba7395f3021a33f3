"""`wanlite generate`: one image from a student (registered model, diffusers folder or ComfyUI file)."""

from __future__ import annotations

import argparse
import json

from wanlite.config import GUIDANCE_LOW, SAMPLE_STEPS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate an image with a student and the teacher's T5 and VAE",
        description=(
            "Sample one image with diffusers' WanPipeline (one frame): the student transformer plus the "
            "teacher's tokenizer, T5 encoder and VAE. --model is models:/NAME@ALIAS (MLflow registry), a "
            "diffusers student folder, or a ComfyUI .safetensors export (its architecture is read from the "
            "file). Shows a progress bar; writes a PNG."
        ),
    )
    parser.add_argument(
        "--model", required=True, help="models:/wanlite-tiny@champion, a student folder, or a .safetensors export"
    )
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (for its T5 and VAE), folder or store URI")
    parser.add_argument("--prompt", required=True, help="text prompt (non-empty)")
    parser.add_argument("--out", default="image.png", help="output PNG (default image.png)")
    parser.add_argument("--negative-prompt", help="negative prompt (default: Wan's official one)")
    parser.add_argument("--steps", type=int, default=SAMPLE_STEPS, help=f"sampling steps (default {SAMPLE_STEPS})")
    parser.add_argument("--guidance", type=float, default=GUIDANCE_LOW, help=f"CFG scale (default {GUIDANCE_LOW})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, help="image size in pixels (default: the preset's)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.generate import generate

    extra = {} if args.negative_prompt is None else {"negative_prompt": args.negative_prompt}
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
        **extra,
    )
    print(json.dumps(report, indent=2))
    return 0
