"""What compact text padding saves: a Wan expert's forward+backward on the 512-row padded context vs trimmed.

Wan zero-pads every prompt to 512 tokens; `wanlite.text_padding` computes the
same result from the prompt's own rows plus one padding row (tests/
test_text_padding.py checks the equality). This times both on the tiny teacher
expert (dim 256, 4 layers) at a 16x16 latent, the toyworld setting, where the
padded text is most of the work. Not a test.

    .venv/bin/python benchmarks/text_padding.py [--threads 2] [--batch 16] [--latent 16] [--lengths 16 60 128]
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import WanTransformer3DModel

from wanlite.config import TINY_TEACHER
from wanlite.text_padding import compact_text_padding

TEXT_LEN = 512


def seconds_per_step(model: WanTransformer3DModel, context: torch.Tensor, x: torch.Tensor, repeats: int) -> float:
    """Median wall seconds of one forward + backward (after one warm-up)."""
    t = torch.full((x.shape[0],), 500.0)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model(x, t, context, return_dict=False)[0].square().mean().backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--latent", type=int, default=16, help="latent side (image side / 8)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 60, 128], help="prompt tokens to compare")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = compact_text_padding(WanTransformer3DModel.from_config(TINY_TEACHER.diffusers_config()))
    x = torch.randn(args.batch, 16, 1, args.latent, args.latent)
    full = seconds_per_step(model, torch.randn(args.batch, TEXT_LEN, TINY_TEACHER.text_dim), x, args.repeats)
    print(f"| context | fwd+bwd, batch {args.batch}, {args.latent}x{args.latent} latent | vs 512 padded |")
    print("|---|---:|---:|")
    print(f"| 512 rows (Wan's padding) | {full * 1000:.0f} ms | 1.0x |")
    for length in args.lengths:
        trimmed = torch.randn(args.batch, length, TINY_TEACHER.text_dim)
        s = seconds_per_step(model, trimmed, x, args.repeats)
        print(f"| {length} prompt tokens, compact | {s * 1000:.0f} ms | {full / s:.1f}x faster |")


if __name__ == "__main__":
    main()
