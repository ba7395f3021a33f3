"""Distillation throughput on one GPU: full-shape A14B expert(s) teaching the lite-1024 student at 1024². Not a test.

Measures, in this order (CUDA events, after warm-up):

1. the bf16 matmul peak of this GPU (8192³ GEMMs): the honest MFU denominator,
   reported beside the spec-sheet figure;
2. teacher forward: one random-weight A14B expert (dim 5120, 40 layers) in
   bf16, batch of CFG pairs at 1024² (4096 tokens, 512 text tokens);
3. student step: lite-1024 (dim 1024, 16 layers) under FSDP2 on a one-rank
   group exactly as the trainer wraps it, fp32 master weights, bf16 autocast,
   AdamW, forward + backward + clip + step;
4. full distillation step: the trainer's own objective (`teacher_targets`
   with CFG and expert routing, student velocity MSE) end to end;

and reports MFU for 2-4 (model FLOPs from `wan_forward_flops`; backward = 2x
forward), samples/s and peak memory. With `--experts 2` both experts are
resident (57 GB of bf16 weights), as in training; with 1 the same expert
serves both noise ranges (same FLOPs, half the memory).

    .venv/bin/python benchmarks/gpu_distill.py [--experts 1|2] [--batch 2] [--steps 10] [--json OUT]
    .venv/bin/python benchmarks/gpu_distill.py --smoke      # tiny shapes: checks the script itself on CPU

Weights are random (shapes are what cost time); no checkpoint is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wanlite.config import A14B, TINY_TEACHER, WanArch, get_preset  # noqa: E402
from wanlite.distill import objective  # noqa: E402
from wanlite.distill.tracking import PEAK_BF16_TFLOPS, wan_forward_flops  # noqa: E402
from wanlite.distill.train import init_distributed, shard  # noqa: E402
from wanlite.pipeline import TEXT_LEN  # noqa: E402

# The student's output is never modified in place, the only case this FSDP2 warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def timed(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per call of fn after warm-up (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - start) / steps
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / 1000 / steps


def matmul_peak(device: torch.device, n: int, steps: int) -> float:
    """Achieved bf16 GEMM FLOP/s on n x n x n products (fp32 on CPU, where bf16 GEMMs are emulated)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, steps, warmup=3, device=device)
    return 2 * n**3 / seconds


def build(arch: WanArch, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight Wan transformer built directly on the device in `dtype` (no fp32 copy of 14B)."""
    from diffusers import WanTransformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel.from_config(arch.diffusers_config())
    finally:
        torch.set_default_dtype(previous)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, choices=(1, 2), default=1, help="resident teacher experts")
    parser.add_argument("--batch", type=int, default=2, help="samples per step (teacher runs 2x: CFG pairs)")
    parser.add_argument("--size", type=int, default=1024, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=10, help="timed iterations per measurement")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute student blocks in backward")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 64x64, few steps: validate the script")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    ctx = init_distributed()
    device = ctx.device
    teacher_arch = TINY_TEACHER if args.smoke else A14B
    student_arch = get_preset("tiny" if args.smoke else "lite-1024").arch
    size, steps = (64, 2) if args.smoke else (args.size, args.steps)
    tokens = (size // 16) ** 2
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "teacher": f"dim {teacher_arch.dim}, {teacher_arch.num_layers} layers, {args.experts} expert(s)",
        "student": f"dim {student_arch.dim}, {student_arch.num_layers} layers",
        "image": size,
        "tokens": tokens,
        "batch": args.batch,
    }

    peak = matmul_peak(device, 1024 if args.smoke else 8192, steps)
    spec = next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in str(results["device"])), None)
    results["matmul_peak_tflops"] = peak / 1e12
    results["spec_peak_tflops"] = spec / 1e12 if spec else None

    # --- teacher forward --------------------------------------------------------------
    high = build(teacher_arch, device, compute).eval().requires_grad_(False)
    low = build(teacher_arch, device, compute).eval().requires_grad_(False) if args.experts == 2 else high
    b = args.batch
    latent = (16, 1, size // 8, size // 8)
    x_t = torch.randn(b, *latent, device=device)
    context = torch.randn(b, TEXT_LEN, 4096, device=device)
    negative = torch.randn(b, TEXT_LEN, 4096, device=device)
    t = torch.linspace(100, 990, b, device=device)  # both experts' ranges when b >= 2
    experts = (objective.Expert(high, 4.0), objective.Expert(low, 3.0))

    def teacher_forward() -> None:
        with torch.no_grad(), autocast:
            objective.expert_velocity(experts[0], x_t, t, context, negative)

    teacher_seconds = timed(teacher_forward, steps, warmup=2, device=device)
    teacher_flops = 2 * b * wan_forward_flops(teacher_arch, tokens)  # CFG: two passes per sample
    results["teacher_forward_s"] = teacher_seconds
    results["teacher_mfu"] = teacher_flops / teacher_seconds / peak

    # --- student step -----------------------------------------------------------------
    from torch.distributed.device_mesh import init_device_mesh

    from wanlite.student import WanLiteStudent

    torch.manual_seed(0)
    student = WanLiteStudent.from_arch(student_arch).to(device)
    if args.grad_checkpointing:
        student.enable_gradient_checkpointing()
    shard(student, student.blocks, init_device_mesh(device.type, (ctx.world_size,)))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    target = torch.randn(b, *latent, device=device)

    def student_step() -> None:
        with autocast:
            v = objective.predict(student, x_t, t, context)
        objective.mse_per_sample(v, target).mean().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    student_seconds = timed(student_step, steps, warmup=2, device=device)
    student_flops = 3 * b * wan_forward_flops(student_arch, tokens)
    results["student_step_s"] = student_seconds
    results["student_mfu"] = student_flops / student_seconds / peak

    # --- full distillation step -------------------------------------------------------
    high_all = objective.routes_high(t)

    def distill_step() -> None:
        with autocast:
            out = objective.teacher_targets(*experts, x_t, t, context, negative, run_high=bool(high_all.any()),
                                            run_low=bool((~high_all).any()))  # fmt: skip
            v = objective.predict(student, x_t, t, context)
        objective.mse_per_sample(v, out.velocity).mean().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_seconds = timed(distill_step, steps, warmup=2, device=device)
    results["distill_step_s"] = step_seconds
    results["distill_mfu"] = (teacher_flops + student_flops) / step_seconds / peak
    results["samples_per_s"] = b / step_seconds
    results["tokens_per_s"] = b * tokens / step_seconds
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
