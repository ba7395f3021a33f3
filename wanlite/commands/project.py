"""`wanlite project`: initialise a student from the teacher by coherent index selection."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "project",
        help="initialise a WanLite student from the teacher by coherent index selection",
        description=(
            "Project a Wan 2.2 teacher onto a smaller Wan-architecture student: keep the first and last "
            "blocks (evenly spaced between), one global residual-channel set, whole heads per layer and "
            "whole FFN neurons per layer, slicing every tensor with the same indices. 'importance' ranks "
            "them on calibration passes through both experts (timesteps with the sampler's shift 12); "
            "'uniform' keeps the first k of each (the naive baseline). The teacher is read one tensor at a "
            "time. Writes the student folder (diffusers format) with projection_report.json/.md. Inputs "
            "are checked before any weight is read; a re-run of the same projection does nothing."
        ),
    )
    parser.add_argument("--teacher", required=True, metavar="URI", help="teacher: local directory or store URI")
    parser.add_argument("--preset", default="tiny", help="student preset: tiny or lite-1024 (default: tiny)")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="student config JSON (diffusers Wan or seed vocabulary); overrides the preset's architecture",
    )
    parser.add_argument("--method", choices=("importance", "uniform"), default="importance", help="default: importance")
    parser.add_argument(
        "--expert",
        choices=("low", "high", "mix"),
        default="low",
        help="which expert seeds the weights; mix blends both by the high-noise expert's share of "
        "shifted timesteps (0.632 high / 0.368 low). Default: low",
    )
    parser.add_argument(
        "--data",
        metavar="URI",
        help="calibrate on the pipeline's own data: the teacher-data output (clean teacher latents), with "
        "--embeddings, the encode-prompts output (their prompts' T5 embeddings)",
    )
    parser.add_argument("--embeddings", metavar="URI", help="encode-prompts output that --data was sampled from")
    parser.add_argument(
        "--calib-data",
        type=Path,
        default=None,
        metavar="FILE",
        help="or: a safetensors file with 'latents' [N,16,h,w] (clean, normalised) and optionally 'context' "
        "[N,L,4096] T5 embeddings",
    )
    parser.add_argument(
        "--calib-random",
        action="store_true",
        help="rank on random-normal latents and context instead (reported as such); only without data",
    )
    parser.add_argument(
        "--calib-samples", type=int, default=32, metavar="N", help="calibration samples used (default 32)"
    )
    parser.add_argument(
        "--calib-timesteps", type=int, default=4, metavar="K", help="noise levels per sample (default 4)"
    )
    parser.add_argument(
        "--no-norm-ratios",
        dest="norm_ratios",
        action="store_false",
        help="ablation: do not fold the calibrated sigma_kept/sigma_all ratio after shrunken LayerNorms",
    )
    parser.add_argument(
        "--no-embedding-ranking",
        dest="rank_embedding_units",
        action="store_false",
        help="ablation: keep the embedding MLPs' hidden units at the residual channel indices",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for calibration noise, timesteps and random inputs")
    parser.add_argument("--device", default=None, help="calibration device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--out",
        default=None,
        metavar="URI",
        help="local directory or store URI for the student (default: the content-addressed key "
        "students/<fingerprint>/init of $WANLITE_STORE)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.config import get_preset, load_student_config
    from wanlite.projection.project import project_step
    from wanlite.storage import StoreError

    preset = get_preset(args.preset)
    arch, image_size = (preset.arch, preset.image_size)
    if args.config is not None:
        arch, config_size = load_student_config(args.config)
        image_size = config_size or image_size
    given = [name for name, v in (("--data", args.data), ("--calib-data", args.calib_data)) if v is not None]
    if len(given) > 1 or (given and args.calib_random) or (args.data is None) != (args.embeddings is None):
        print("wanlite project: error: calibration: give --data with --embeddings, or --calib-data FILE, "
              "or --calib-random; not several", file=sys.stderr)  # fmt: skip
        return 2
    if args.data is not None:
        latents, context = _pipeline_data(args.data, args.embeddings, args.calib_samples)
    else:
        latents, context = _calibration_data(args.calib_data)
    try:
        result = project_step(
            args.teacher,
            arch,
            out=args.out,
            device=args.device,
            method=args.method,
            expert=args.expert,
            calib_samples=args.calib_samples,
            timesteps_per_sample=args.calib_timesteps,
            calib_random=args.calib_random,
            norm_ratios=args.norm_ratios,
            rank_embedding_units=args.rank_embedding_units,
            calib_latents=latents,
            calib_context=context,
            image_size=image_size,
            seed=args.seed,
        )
    except StoreError as err:
        print(f"wanlite project: error: {err}", file=sys.stderr)
        return 2
    totals = result["totals"]
    print(
        f"student: {result['uri']}\n  {result['method']} projection seeded from {', '.join(result['seeded_from'])}, "
        f"teacher blocks {result['layers']}; {totals['tensors']} tensors, {totals['parameters']:,} parameters, "
        f"{totals['randomly_initialised']} randomly initialised"
    )
    return 0


def _pipeline_data(data: str, embeddings: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` teacher samples (clean latents [N,16,h,w]) and their prompts' embeddings."""
    from wanlite.distill.data import EmbeddingSet, LatentSet

    latents, emb = LatentSet.load(data), EmbeddingSet.load(embeddings)
    n = min(limit, len(latents))
    return latents.latents[:n, :, 0], emb.context(latents.prompt_index[:n])


def _calibration_data(path: Path | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(latents, context) from a safetensors file, or (None, None)."""
    if path is None:
        return None, None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except SafetensorError as err:
        raise ValueError(f"--calib-data {path}: expected a safetensors file, found unreadable data ({err})") from None
    if "latents" not in tensors:
        raise ValueError(f"{path}: expected a 'latents' tensor [N,16,h,w], found {', '.join(tensors) or 'nothing'}")
    return tensors["latents"], tensors.get("context")
