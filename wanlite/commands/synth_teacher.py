"""`wanlite synth-teacher`: write a synthetic Wan 2.2 T2V-A14B checkpoint in a real layout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wanlite.config import TEACHER_SIZES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth-teacher",
        help="write a random-weight Wan 2.2 T2V-A14B teacher in the native or diffusers layout",
        description=(
            "Write a teacher checkpoint with random weights and the real file layout, for tests and demos "
            "without the 126 GB download. 'tiny' (~50 MB, about a second) has the real head_dim 128, "
            "text_dim 4096 and z_dim 16 with small widths; 'a14b' has the full A14B, umT5-XXL and Wan 2.1 VAE "
            "shapes and is streamed to disk tensor by tensor (native layout only). The same --seed gives "
            "byte-identical files and the same weights in both layouts."
        ),
    )
    parser.add_argument("out", type=Path, help="directory to create (must not exist)")
    parser.add_argument("--size", choices=TEACHER_SIZES, default="tiny", help="tensor shapes (default: tiny)")
    parser.add_argument(
        "--layout",
        choices=("native", "diffusers"),
        default="native",
        help="native = Wan-AI/Wan2.2-T2V-A14B (high/low_noise_model, .pth files); "
        "diffusers = the -Diffusers twin (model_index.json, transformer = high-noise expert). Default: native",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.add_argument(
        "--sparse",
        action="store_true",
        help="a14b only: write valid headers and leave the tensor data as holes (sparse files of zeros): "
        "~126 GB apparent, a few MB on disk, seconds to write",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="blocks per expert at the size's full width (native layout; default: the size's own, 40 for a14b): "
        "`--size a14b --layers 2 --sparse` measures memory at A14B width on a laptop",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.checkpoint.synth import synth_teacher

    try:
        out = synth_teacher(args.out, size=args.size, layout=args.layout, seed=args.seed, sparse=args.sparse,
                            layers=args.layers)  # fmt: skip
    except (FileExistsError, ValueError) as err:  # a usage error here, not a crash: never overwrite a teacher
        print(f"wanlite synth-teacher: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0
