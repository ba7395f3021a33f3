"""`wanlite evaluate`: student vs teacher on held-out prompts; JSON + Markdown report with a quality gate."""

from __future__ import annotations

import argparse

from wanlite.config import EVAL_MARGIN, EVAL_SEEDS, EVAL_SIGMAS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="compare a student with its teacher on held-out prompts (velocity error, samples, FD)",
        description=(
            "On the held-out prompts at fixed seeds: the student-vs-teacher velocity relative MSE on a fixed "
            "sigma grid, per expert range (t >= 875: high-noise expert; below: low-noise); teacher and "
            "student samples side by side (grid.png, decoded with the teacher's VAE); the Fréchet distance "
            "between their latent distributions (and FID / CLIP score when their weights are cached locally). "
            "The gate: the student must beat the zero predictor (and --baseline, the run's projected init) by "
            "--margin in every expert range. Writes evaluation.json (with the 'passed' quality gate "
            "that `wanlite register` requires), evaluation.md and grid.png to --out. Exit status 1 when the "
            "gate fails."
        ),
    )
    parser.add_argument("--student", required=True, help="student folder (diffusers) or store URI")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint folder (native or diffusers) or URI")
    parser.add_argument("--out", required=True, help="output folder or store URI for the reports and grid")
    parser.add_argument(
        "--prompts", default="held-out", help="held-out (the shipped evaluation set), eval, or a prompt file"
    )
    parser.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    parser.add_argument("--seeds", type=_ints, default=EVAL_SEEDS, help="comma-separated seeds (default 0,1)")
    parser.add_argument(
        "--sigmas", type=_floats, default=EVAL_SIGMAS, help=f"comma-separated sigma grid (default {EVAL_SIGMAS})"
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="sampling steps of the teacher and (unless it has explicit sigmas) the student "
        "(default: the student's recorded sampling settings)",
    )
    parser.add_argument("--size", type=int, help="image size (default: the preset's)")
    parser.add_argument(
        "--guided",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare with the teacher's CFG-guided velocity and sample the student without CFG (students with "
        "CFG folded in); default: from the student's recorded sampling settings (guidance 1 = folded in)",
    )
    parser.add_argument(
        "--baseline",
        metavar="URI",
        help="the run's starting point (the projected init folder or URI): scored on the same grid, and the "
        "student must beat it as it must beat the zero predictor",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=EVAL_MARGIN,
        help="gate: the student's velocity rel. MSE must be this fraction below every baseline's, in every "
        f"expert range (default {EVAL_MARGIN})",
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu); on cuda the teacher "
                        "experts run in bf16, one on the GPU at a time (the report names the placement)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.evaluate import evaluate

    report = evaluate(
        args.student,
        args.teacher,
        out_dir=args.out,
        prompts=args.prompts,
        num_prompts=args.num_prompts,
        seeds=args.seeds,
        sigmas=args.sigmas,
        steps=args.steps,
        size=args.size,
        guided=args.guided,
        baseline=args.baseline,
        margin=args.margin,
        device=args.device,
    )
    verdict = "passed" if report["passed"] else "FAILED (" + "; ".join(report["gate"]["failures"]) + ")"
    print(f"evaluation {verdict}; score {report['score']:.4g}; reports in {args.out}")
    return 0 if report["passed"] else 1


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())
