"""`wanlite distill`: train the student against the teacher (FSDP2; torchrun for several processes)."""

from __future__ import annotations

import argparse
import json

from wanlite.distill.options import add_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distil the teacher into the student (FSDP2, exact resume, MLflow tracking)",
        description=(
            "Train the student on the teacher's velocities: sigma drawn like the teacher's shifted schedule, "
            "x_t = (1-sigma) x0 + sigma eps, target = the (CFG-guided) velocity of the expert that owns t "
            "(t >= 875: high-noise); AdamW, warmup + cosine, clipping, EMA; FSDP2 across ranks. "
            "Checkpoints go to runs/<run>/checkpoints/ in the store and --resume continues exactly; the final "
            "student (save_pretrained) goes to runs/<run>/final/. Rank 0 logs to MLflow. "
            "--nproc N > 1 launches `torchrun --standalone --nproc-per-node N -m wanlite.distill.train`; "
            "under an outer torchrun (multi-node) it trains in-process."
        ),
    )
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes (one per GPU) on this node; 1 trains in this process (default: 1)")  # fmt: skip
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.distill.launch import distill

    result = distill(config_from_args(args), nproc=args.nproc)
    print(json.dumps(result, indent=1))
    return 0
