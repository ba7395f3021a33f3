"""`wanlite encode-prompts`: run the teacher's T5 once over a prompt set; store the embeddings."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encode-prompts",
        help="encode a prompt set with the teacher's T5 into embedding shards in the store",
        description=(
            "Encode a prompt set once with the teacher's umt5-xxl encoder (transformers UMT5EncoderModel; "
            "native .pth weights are converted on load) and store each prompt's output trimmed to its real "
            "length, plus Wan's default negative prompt for CFG, under embeddings/<hash>/ in the store. "
            "The key is content-addressed by the prompts and the T5 weights' sha256: a re-run with the same "
            "inputs does nothing. Training never loads T5."
        ),
    )
    parser.add_argument("--teacher", required=True, help="teacher checkpoint: directory or store URI")
    parser.add_argument(
        "--prompts",
        default="default",
        help="prompt file (one per line, '#' comments) or a built-in set: default/train, eval (default: default)",
    )
    parser.add_argument("--out", default=None, help="store root URI (default: $WANLITE_STORE or ./.wanlite/store)")
    parser.add_argument("--shard-size", type=int, default=256, help="prompts per shard file (default: 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per T5 forward (default: 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.distill.encode import encode_prompts

    result = encode_prompts(
        args.teacher, args.prompts, args.out, shard_size=args.shard_size, batch_size=args.batch_size, device=args.device
    )
    print(json.dumps(result, indent=1))
    return 0
