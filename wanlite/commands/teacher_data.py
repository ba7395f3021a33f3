"""`wanlite teacher-data`: clean latents sampled by the teacher (and/or encoded from your images)."""

from __future__ import annotations

import argparse
import json

from wanlite.config import GUIDANCE_HIGH, GUIDANCE_LOW, SAMPLE_SHIFT, SAMPLE_STEPS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "teacher-data",
        help="sample clean one-frame latents x0 with the teacher (resumable, sharded)",
        description=(
            "Sample clean one-frame latents [16, 1, H/8, W/8] (the VAE's normalised space) with the teacher "
            "through diffusers' WanPipeline: both experts (transformer = high-noise for t >= 875, "
            "transformer_2 = low-noise), UniPC flow sampler, precomputed prompt embeddings and Wan's negative "
            "prompt. Written shard by shard under data/<hash>/ in the store; a re-run skips finished shards. "
            "--images DIR adds (or, with --no-teacher-samples, uses only) your own images, VAE-encoded; each "
            "image needs a .txt caption beside it that is one of the encoded prompts."
        ),
    )
    parser.add_argument("--teacher", required=True, help="teacher checkpoint: directory or store URI")
    parser.add_argument("--embeddings", required=True, help="embeddings URI or directory (from encode-prompts)")
    parser.add_argument("--out", default=None, help="store root URI (default: $WANLITE_STORE or ./.wanlite/store)")
    parser.add_argument("--image-size", type=int, default=1024, help="square image size in pixels (default: 1024)")
    parser.add_argument("--images", default=None, help="folder of your own images with .txt captions")
    parser.add_argument("--teacher-samples", action=argparse.BooleanOptionalAction, default=True,
                        help="sample latents with the teacher (default: on)")  # fmt: skip
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="teacher samples per prompt (default: 1)")
    parser.add_argument("--steps", type=int, default=SAMPLE_STEPS, help=f"sampling steps (default: {SAMPLE_STEPS})")
    parser.add_argument("--shift", type=float, default=SAMPLE_SHIFT, help=f"flow shift (default: {SAMPLE_SHIFT})")
    parser.add_argument("--guidance-high", type=float, default=GUIDANCE_HIGH,
                        help=f"CFG of the high-noise expert (default: {GUIDANCE_HIGH})")  # fmt: skip
    parser.add_argument("--guidance-low", type=float, default=GUIDANCE_LOW,
                        help=f"CFG of the low-noise expert (default: {GUIDANCE_LOW})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default: 0)")
    parser.add_argument("--shard-size", type=int, default=64, help="samples per shard (default: 64)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per pipeline call (default: 4)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--workers", type=int, default=1,
                        help="split the shards over N workers, each started with its own --worker (default: 1)")
    parser.add_argument("--worker", type=int, default=0,
                        help="which worker this is, 0..N-1: makes shards j with j mod N = worker; the worker that "
                             "finds every shard finished publishes the set (default: 0)")  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.distill.teacher_data import teacher_data

    result = teacher_data(
        args.teacher,
        args.embeddings,
        args.out,
        image_size=args.image_size,
        images=args.images,
        teacher_samples=args.teacher_samples,
        samples_per_prompt=args.samples_per_prompt,
        steps=args.steps,
        shift=args.shift,
        guidance_high=args.guidance_high,
        guidance_low=args.guidance_low,
        seed=args.seed,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        device=args.device,
        worker=args.worker,
        workers=args.workers,
    )
    print(json.dumps(result, indent=1))
    return 0
