"""`wanlite distill-steps`: turn a student into a K-step, CFG-free generator (DMD2; FSDP2; exact resume)."""

from __future__ import annotations

import argparse
import json

from wanlite.distill.options import add_arguments, config_from_args
from wanlite.distill.steps_options import REQUIRED, SUPPORTED_STEPS, StepsConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill-steps",
        help="distil a student into a K-step, CFG-free generator (DMD2; FSDP2, exact resume, MLflow)",
        description=(
            f"Distribution matching distillation (DMD2) of a student into a K-step generator, K in "
            f"{{{', '.join(map(str, SUPPORTED_STEPS))}}}, that samples at guidance 1 with no negative prompt and "
            "stays a stock WanTransformer3DModel. The real score is the guided, expert-routed teacher; the fake "
            "score a critic initialised from the student that learns the generator's samples by flow matching, "
            "--critic-updates times per generator update. Training runs the generator's own first k steps "
            "(backward simulation) so every step sees what inference feeds it. Sampling: diffusers' "
            "FlowMatchEulerDiscreteScheduler on the explicit K sigmas (default: shift 5 on uniform levels, "
            "Wan2.2-Lightning's 1000/937.5/833.3/625 at K=4), recorded in the student's wanlite_sampling.json. "
            "Checkpoints go to runs/<run>/checkpoints/ and --resume continues exactly; the student goes to "
            "runs/<run>/final/. --nproc N > 1 launches torchrun."
        ),
    )
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes (one per GPU) on this node; 1 trains in this process (default: 1)")  # fmt: skip
    add_arguments(parser, StepsConfig, REQUIRED)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.distill.steps import distill_steps

    result = distill_steps(config_from_args(args, StepsConfig), nproc=args.nproc)
    print(json.dumps(result, indent=1))
    return 0
