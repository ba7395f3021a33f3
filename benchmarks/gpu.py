"""Full-shape figures on one GPU: teacher and student MFU, generation speed-up, projection cost. Not a test.

Issue 8 asks for these in one script, run on one H100. Sections, in this order;
each is printed (and --json / --markdown rewritten) the moment it is measured,
so a run cut short by a time limit still leaves every figure it reached:

1. device: GPU name, driver, CUDA runtime, torch and diffusers versions;
2. peak: the achieved bf16 matmul peak (8192^3 GEMMs), the honest MFU
   denominator, reported beside the spec-sheet figure;
3. teacher: forward of one random-weight A14B expert (dim 5120, 40 layers) in
   bf16 on --batch CFG pairs at 1024^2 (4096 tokens), as the trainer batches them;
4. generation: time per denoising step at 1024^2, batch 1, bf16, inference
   mode. The lite-1024 student with CFG folded in runs ONE forward per step
   (students distilled on guided targets sample at guidance 1, see
   `wanlite.evaluate`); one A14B expert with CFG runs TWO (conditional then
   unconditional, separately, as diffusers' `WanPipeline` does). Goal: the
   student >= 25x faster. The student with CFG (two forwards, for students
   distilled without guidance) is reported beside it;
5. student: a lite-1024 training step under FSDP2 on a one-rank group exactly
   as the trainer wraps it (fp32 master weights, bf16 autocast, AdamW, clip):
   MFU and samples/s;
6. distill: the trainer's objective end to end (`teacher_targets` with CFG and
   expert routing, then the student step): MFU, samples/s, peak memory;
7. few-step: transformer time per 1024^2 image, end to end: the 4-step, CFG-free
   lite-1024 (`wanlite distill-steps`; `wanlite.distill.steps.sample`, 4
   forwards and its Euler updates, timed whole) vs A14B at 40 steps with CFG
   (80 forwards: 40 x the measured two-forward step; both experts have the same
   shapes, so which expert runs a step does not change its cost). Goal >= 500x;
8. projection: `wanlite project --preset lite-1024 --method uniform` from a
   sparse synthetic A14B teacher (full shapes, 126 GB apparent), in a fresh
   process: wall and peak RSS of the whole command;
9. evaluate: `wanlite.evaluate` of a lite-1024 student (and itself as the
   baseline) against that sparse A14B teacher, 1 prompt x 1 seed, 2 steps, at
   --size: `torch.cuda.max_memory_allocated` beside the peak that
   `wanlite.placement.planned_memory` computes from the shapes. The teacher's
   weights are zeros, so its velocities are zero and the evaluation refuses
   to write a report (non-finite relative error): shapes set the memory,
   the verdict is not the point.

What the figures do and do not include:

- Weights are random: shapes are what cost time, and no checkpoint is needed.
- Text context is the full 512 tokens everywhere: the worst case, a prompt
  that fills Wan's padding. The trainer installs `wanlite.text_padding` and
  trims text to the batch's longest prompt; at 512 tokens that is a no-op, so
  it is not installed here. Shorter prompts save the cross-attention share
  (a few per cent at 1024^2).
- MFU counts model FLOPs (`wan_forward_flops`; backward = 2x forward).
- Generation times the transformer forwards and the CFG combination only:
  text encoding, the UniPC update (elementwise on a 16x128x128 latent) and the
  VAE decode are the same for both models and left out.
- Projection: the sparse teacher's tensor data are holes that read back as
  zeros from the page cache, so the wall excludes real disk I/O; on a real
  checkpoint add the time to read the kept slices of one expert from disk.
  Importance calibration (--projection-method importance) runs full-size
  teacher forwards and takes far longer; uniform is the default.

    .venv/bin/python benchmarks/gpu.py [--experts 1|2] [--batch 2] [--steps 10] [--skip SECTION ...]
                                       [--projection-method uniform|importance] [--json OUT] [--markdown OUT]
    .venv/bin/python benchmarks/gpu.py --smoke      # tiny shapes on CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wanlite.config import A14B, GUIDANCE_LOW, TINY_TEACHER, WanArch, get_preset
from wanlite.distill import objective
from wanlite.distill.tracking import PEAK_BF16_TFLOPS, wan_forward_flops
from wanlite.distill.parallel import shard_trained
from wanlite.distill.train import init_distributed
from wanlite.pipeline import TEXT_LEN

# The student's output is never modified in place, the only case this FSDP2 warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

SECTIONS = ("peak", "teacher", "generation", "student", "distill", "few-step", "projection", "evaluate")
SPEEDUP_GOAL = 25.0
"""Issue 8: lite-1024 generation per step at least this many times faster than one teacher expert."""
FEW_STEPS, TEACHER_STEPS, FEW_STEP_GOAL = 4, 40, 500.0
"""Issue 13: the 4-step, CFG-free student per image at least 500x faster than A14B's 40 CFG steps."""
Row = tuple[str, str, str]
"""One markdown table row: what was measured, the figure, a note."""


# --- setup ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """Shapes and settings of this run: full size, or tiny for --smoke."""

    device: torch.device
    teacher_arch: WanArch
    preset: str
    size: int
    batch: int
    experts: int
    steps: int
    warmup: int
    grad_checkpointing: bool
    smoke: bool

    @property
    def teacher(self) -> str:
        """The teacher's name in labels."""
        return "tiny teacher" if self.smoke else "A14B"

    @property
    def student_arch(self) -> WanArch:
        return get_preset(self.preset).arch

    @property
    def tokens(self) -> int:
        """Latent tokens of one 1-frame image: VAE downsamples 8x, the patch is 2x2."""
        return (self.size // 16) ** 2

    @property
    def latent(self) -> tuple[int, int, int, int]:
        return (16, 1, self.size // 8, self.size // 8)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def compute(self) -> torch.dtype:
        """bf16 on GPU; fp32 on CPU, where bf16 is emulated and only the script is being checked."""
        return torch.bfloat16 if self.cuda else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()


def device_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: without this a throughput number means little."""
    import diffusers

    info: dict[str, Any] = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    if device.type != "cuda":
        return {"name": "cpu", "threads": torch.get_num_threads(), **info}
    props = torch.cuda.get_device_properties(device)
    return {
        "name": torch.cuda.get_device_name(device),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "driver": _nvidia_smi("driver_version"),
        "cuda_runtime": torch.version.cuda,
        **info,
    }


def device_line(info: dict[str, Any]) -> str:
    """The device in one line, for the printed header and the markdown."""
    parts = [str(info.get("name", "?"))]
    parts += [f"{k.replace('_', ' ')} {info[k]}" for k in ("driver", "cuda_runtime", "torch") if info.get(k)]
    return ", ".join(parts)


def _nvidia_smi(query: str) -> str | None:
    """One nvidia-smi field of GPU 0 (torch has no public driver-version call), None if unavailable."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


# --- results ------------------------------------------------------------------------------------


@dataclass
class Report:
    """Results so far; every `record` prints the section and rewrites the JSON and markdown files."""

    command: str
    json_path: Path | None
    markdown_path: Path | None
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    def record(self, section: str, figures: dict[str, Any], rows: Sequence[Row] = ()) -> None:
        self.results[section] = figures
        self.rows.extend(rows)
        print(f"--- {section}\n{json.dumps(figures, indent=1)}", flush=True)
        if self.json_path:
            _write(self.json_path, json.dumps({"command": self.command, **self.results}, indent=1) + "\n")
        if self.markdown_path:
            _write(self.markdown_path, self.markdown())

    def markdown(self) -> str:
        """A table ready to paste into BENCHMARKS.md."""
        lines = [
            f"`{self.command}`",
            "",
            f"Device: {device_line(self.results.get('device', {}))}.",
            "",
            "| measurement | figure | note |",
            "|---|---:|---|",
        ]
        lines += [f"| {what} | {figure} | {note} |" for what, figure, note in self.rows]
        return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    """Replace `path` atomically, so a run killed mid-write never leaves half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)


# --- timing and models ------------------------------------------------------------------------


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


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    return round(flops / seconds / peak, 4) if peak else None


def build(factory: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight model built directly on the device in `dtype` (no fp32 copy of 14B on the host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return factory()
    finally:
        torch.set_default_dtype(previous)


class Models:
    """The models the sections share, built on first use and dropped by `release`."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup

    def _teacher(self) -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        arch = self.setup.teacher_arch
        model = build(lambda: WanTransformer3DModel.from_config(arch.diffusers_config()), *self._where())
        return model.eval().requires_grad_(False)

    def _where(self) -> tuple[torch.device, torch.dtype]:
        return self.setup.device, self.setup.compute

    @functools.cached_property
    def high(self) -> torch.nn.Module:
        return self._teacher()

    @functools.cached_property
    def low(self) -> torch.nn.Module:
        """With --experts 1 the high-noise expert serves both ranges: same FLOPs, half the memory."""
        return self._teacher() if self.setup.experts == 2 else self.high

    @functools.cached_property
    def experts(self) -> tuple[objective.Expert, objective.Expert]:
        return objective.Expert(self.high, 4.0), objective.Expert(self.low, 3.0)

    @functools.cached_property
    def student_inference(self) -> torch.nn.Module:
        """The student as generation runs it: plain module, bf16 weights."""
        from wanlite.student import WanLiteStudent

        model = build(lambda: WanLiteStudent.from_arch(self.setup.student_arch), *self._where())
        return model.eval().requires_grad_(False)

    @functools.cached_property
    def student_training(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The student as the trainer holds it: fp32 master weights, FSDP2 per block, AdamW."""
        from torch.distributed.device_mesh import init_device_mesh

        from wanlite.student import WanLiteStudent

        torch.manual_seed(0)
        student = WanLiteStudent.from_arch(self.setup.student_arch).to(self.setup.device)
        if self.setup.grad_checkpointing:
            student.enable_gradient_checkpointing()
        mesh = init_device_mesh(self.setup.device.type, (torch.distributed.get_world_size(),))
        shard_trained(student, student.blocks, mesh)
        return student, torch.optim.AdamW(student.parameters(), lr=1e-5)

    def release(self) -> None:
        """Drop every model (the projection's child process may want the GPU memory)."""
        for name in ("high", "low", "experts", "student_inference", "student_training"):
            self.__dict__.pop(name, None)
        if self.setup.cuda:
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Batch:
    """Random inputs of the trainer's shapes: latents, timesteps and full 512-token text."""

    x_t: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    negative: torch.Tensor

    @classmethod
    def random(cls, setup: Setup, batch: int, dtype: torch.dtype = torch.float32) -> Batch:
        g = torch.Generator(setup.device).manual_seed(0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, device=setup.device, dtype=dtype)

        t = torch.linspace(100, 990, batch, device=setup.device)  # both experts' ranges when batch >= 2
        return cls(randn(batch, *setup.latent), t, randn(batch, TEXT_LEN, 4096), randn(batch, TEXT_LEN, 4096))


@contextlib.contextmanager
def memory_peak(setup: Setup, figures: dict[str, Any]) -> Iterator[None]:
    """Record the section's peak GPU memory in `figures` (nothing on CPU)."""
    if setup.cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    yield
    if setup.cuda:
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(setup.device) / 2**30, 2)


# --- sections -----------------------------------------------------------------------------------


def measure_peak(setup: Setup, spec: float | None) -> tuple[dict[str, Any], list[Row]]:
    """Achieved GEMM FLOP/s: MFU against what the GPU can do here, not only against the spec sheet."""
    n = 1024 if setup.smoke else 8192
    a, b = (torch.randn(n, n, device=setup.device, dtype=setup.compute) for _ in range(2))
    peak = 2 * n**3 / timed(lambda: a @ b, setup.steps, warmup=3, device=setup.device)
    figures = {
        "gemm": n,
        "dtype": str(setup.compute).removeprefix("torch."),
        "matmul_peak_tflops": _sig(peak / 1e12),
        "spec_peak_tflops": spec and spec / 1e12,
    }
    note = f"spec sheet {spec / 1e12:.0f}" if spec else "no spec figure for this device"
    peak = figures["matmul_peak_tflops"]
    what = f"{figures['dtype']} matmul peak ({n}³ GEMMs), the MFU denominator"
    return figures, [(what, f"{peak:g} TFLOP/s", note)]


def measure_teacher(setup: Setup, models: Models, peak: float | None) -> tuple[dict[str, Any], list[Row]]:
    """One expert's guided forward on the trainer's batch: the teacher half of every distillation step."""
    batch = Batch.random(setup, setup.batch)
    expert = models.experts[0]

    def forward() -> None:
        with torch.no_grad(), setup.autocast():
            objective.expert_velocity(expert, batch.x_t, batch.t, batch.context, batch.negative)

    figures: dict[str, Any] = {"forwards": 2 * setup.batch, "tokens": setup.tokens}
    with memory_peak(setup, figures):
        seconds = timed(forward, setup.steps, setup.warmup, setup.device)
    flops = 2 * setup.batch * wan_forward_flops(setup.teacher_arch, setup.tokens)  # CFG: two passes per sample
    figures.update(seconds=round(seconds, 4), tflops=_sig(flops / seconds / 1e12), mfu=mfu(flops, seconds, peak))
    what = f"teacher forward: {setup.teacher} expert, {setup.batch} CFG pairs at {setup.size}², 512 text tokens"
    return figures, [(what, f"{seconds * 1e3:.0f} ms, MFU {_pct(figures['mfu'])}", f"{figures['tflops']} TFLOP/s")]


def measure_generation(setup: Setup, models: Models, peak: float | None) -> tuple[dict[str, Any], list[Row]]:
    """Time per denoising step, batch 1: what a user waits for, student vs the teacher it replaces."""
    one = Batch.random(setup, 1, dtype=setup.compute)
    x, cond, uncond = one.x_t, one.context, one.negative
    t = torch.full((1,), 500.0, device=setup.device)  # the value does not change the cost
    teacher, student = models.high, models.student_inference

    def cfg_step(model: torch.nn.Module) -> Callable[[], object]:
        """Two separate forwards, conditional then unconditional, as `WanPipeline` runs CFG."""
        return lambda: objective.guided(
            objective.predict(model, x, t, cond), objective.predict(model, x, t, uncond), GUIDANCE_LOW
        )

    figures: dict[str, Any] = {"tokens": setup.tokens, "text_tokens": TEXT_LEN, "batch": 1}
    with memory_peak(setup, figures), torch.inference_mode():
        student_s = timed(lambda: objective.predict(student, x, t, cond), setup.steps, setup.warmup, setup.device)
        student_cfg_s = timed(cfg_step(student), setup.steps, setup.warmup, setup.device)
        teacher_s = timed(cfg_step(teacher), setup.steps, setup.warmup, setup.device)
    speedup = teacher_s / student_s
    figures.update(
        student_folded_ms_per_step=round(student_s * 1e3, 3),
        student_cfg_ms_per_step=round(student_cfg_s * 1e3, 3),
        teacher_cfg_ms_per_step=round(teacher_s * 1e3, 3),
        speedup_folded=round(speedup, 1),
        speedup_student_cfg=round(teacher_s / student_cfg_s, 1),
        goal=f">= {SPEEDUP_GOAL:g}x",
        goal_met=speedup >= SPEEDUP_GOAL,
        student_forward_mfu=mfu(wan_forward_flops(setup.student_arch, setup.tokens), student_s, peak),
        teacher_forward_mfu=mfu(2 * wan_forward_flops(setup.teacher_arch, setup.tokens), teacher_s, peak),
    )
    where = f"{setup.size}², batch 1"
    rows = [
        (f"generation per step, {setup.teacher} expert with CFG (2 forwards), {where}", f"{teacher_s * 1e3:.1f} ms",
         f"MFU {_pct(figures['teacher_forward_mfu'])}"),
        (f"generation per step, {setup.preset} CFG folded (1 forward), {where}", f"{student_s * 1e3:.2f} ms",
         f"MFU {_pct(figures['student_forward_mfu'])}"),
        ("speed-up per step, CFG-folded student vs teacher expert", f"{speedup:.1f}×",
         f"goal ≥ {SPEEDUP_GOAL:g}×: {'met' if speedup >= SPEEDUP_GOAL else 'NOT met'}"),
        (f"generation per step, {setup.preset} with CFG (2 forwards), {where}", f"{student_cfg_s * 1e3:.2f} ms",
         f"{figures['speedup_student_cfg']}× vs teacher (students distilled without guidance)"),
    ]  # fmt: skip
    return figures, rows


def measure_few_step(setup: Setup, models: Models, peak: float | None) -> tuple[dict[str, Any], list[Row]]:
    """Transformer time per image: the K-step CFG-free student end to end vs the teacher's 40 CFG steps."""
    from wanlite.distill.steps import sample
    from wanlite.distill.steps_options import StepsConfig, schedule

    sigmas = schedule(StepsConfig(teacher="", student="", embeddings="", sample_steps=FEW_STEPS))
    one = Batch.random(setup, 1, dtype=setup.compute)
    x, cond, uncond = one.x_t, one.context, one.negative
    t = torch.full((1,), 500.0, device=setup.device)
    teacher, student = models.high, models.student_inference

    def teacher_step() -> object:
        return objective.guided(
            objective.predict(teacher, x, t, cond), objective.predict(teacher, x, t, uncond), GUIDANCE_LOW
        )

    figures: dict[str, Any] = {"tokens": setup.tokens, "few_steps": FEW_STEPS, "sigmas": list(sigmas),
                               "teacher_steps": TEACHER_STEPS}  # fmt: skip
    with memory_peak(setup, figures), torch.inference_mode():
        student_s = timed(lambda: sample(student, sigmas, x, cond), setup.steps, setup.warmup, setup.device)
        teacher_step_s = timed(teacher_step, setup.steps, setup.warmup, setup.device)
    teacher_s = TEACHER_STEPS * teacher_step_s
    speedup = teacher_s / student_s
    figures.update(
        student_ms_per_image=round(student_s * 1e3, 3),
        teacher_ms_per_step=round(teacher_step_s * 1e3, 3),
        teacher_ms_per_image=round(teacher_s * 1e3, 1),
        student_forwards_per_image=FEW_STEPS,
        teacher_forwards_per_image=2 * TEACHER_STEPS,
        speedup=round(speedup, 1),
        goal=f">= {FEW_STEP_GOAL:g}x",
        goal_met=speedup >= FEW_STEP_GOAL,
    )
    where = f"{setup.size}², batch 1"
    rows = [
        (f"per image, {setup.teacher} at {TEACHER_STEPS} steps with CFG (80 forwards), {where}",
         f"{teacher_s * 1e3:.0f} ms", f"{TEACHER_STEPS} x {teacher_step_s * 1e3:.1f} ms measured per CFG step"),
        (f"per image, {setup.preset} {FEW_STEPS}-step CFG-free ({FEW_STEPS} forwards), {where}",
         f"{student_s * 1e3:.2f} ms", "timed end to end: forwards + Euler updates"),
        ("speed-up per image, few-step student vs teacher", f"{speedup:.0f}×",
         f"goal ≥ {FEW_STEP_GOAL:g}×: {'met' if speedup >= FEW_STEP_GOAL else 'NOT met'}"),
    ]  # fmt: skip
    return figures, rows


def measure_student(setup: Setup, models: Models, peak: float | None) -> tuple[dict[str, Any], list[Row]]:
    """The student half of a distillation step, alone: its MFU says how well a 1024-wide model fills the GPU."""
    student, optimizer = models.student_training
    batch = Batch.random(setup, setup.batch)
    target = torch.randn_like(batch.x_t)

    def step() -> None:
        with setup.autocast():
            v = objective.predict(student, batch.x_t, batch.t, batch.context)
        _update(student, optimizer, objective.mse_per_sample(v, target).mean())

    figures: dict[str, Any] = {"batch": setup.batch, "grad_checkpointing": setup.grad_checkpointing}
    with memory_peak(setup, figures):
        seconds = timed(step, setup.steps, setup.warmup, setup.device)
    flops = 3 * setup.batch * wan_forward_flops(setup.student_arch, setup.tokens)
    figures.update(
        seconds=round(seconds, 4), mfu=mfu(flops, seconds, peak), samples_per_s=round(setup.batch / seconds, 2)
    )
    what = f"student training step: {setup.preset}, FSDP2, batch {setup.batch} at {setup.size}²"
    figure = f"{figures['samples_per_s']} samples/s, MFU {_pct(figures['mfu'])}"
    return figures, [(what, figure, f"{seconds * 1e3:.0f} ms/step, fwd + bwd + clip + AdamW")]


def measure_distill(setup: Setup, models: Models, peak: float | None) -> tuple[dict[str, Any], list[Row]]:
    """The trainer's whole step: teacher targets (CFG, expert routing) and the student update."""
    student, optimizer = models.student_training
    batch = Batch.random(setup, setup.batch)
    high = objective.routes_high(batch.t)

    def step() -> None:
        with setup.autocast():
            out = objective.teacher_targets(*models.experts, batch.x_t, batch.t, batch.context, batch.negative,
                                            run_high=bool(high.any()), run_low=bool((~high).any()))  # fmt: skip
            v = objective.predict(student, batch.x_t, batch.t, batch.context)
        _update(student, optimizer, objective.mse_per_sample(v, out.velocity).mean())

    figures: dict[str, Any] = {"batch": setup.batch, "experts_resident": setup.experts}
    with memory_peak(setup, figures):
        seconds = timed(step, setup.steps, setup.warmup, setup.device)
    flops = setup.batch * (
        2 * wan_forward_flops(setup.teacher_arch, setup.tokens)
        + 3 * wan_forward_flops(setup.student_arch, setup.tokens)
    )
    figures.update(
        seconds=round(seconds, 4),
        mfu=mfu(flops, seconds, peak),
        samples_per_s=round(setup.batch / seconds, 3),
        tokens_per_s=round(setup.batch * setup.tokens / seconds),
    )
    what = f"distillation step: {setup.experts} resident expert(s) + {setup.preset}, batch {setup.batch}"
    memory = f", peak {figures['peak_memory_gib']} GiB" if "peak_memory_gib" in figures else ""
    figure = f"{figures['samples_per_s']} samples/s, MFU {_pct(figures['mfu'])}"
    return figures, [(what, figure, f"{seconds * 1e3:.0f} ms/step{memory}")]


def _update(student: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Backward, clip and step, as the trainer does."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_projection(setup: Setup, method: str, work: Path) -> tuple[dict[str, Any], list[Row]]:
    """`wanlite project` on a full-shape teacher in a fresh process: its own wall and peak RSS, nothing inherited."""
    from wanlite.checkpoint.synth import synth_teacher

    started = time.perf_counter()
    teacher = synth_teacher(work / "teacher", size="tiny" if setup.smoke else "a14b", sparse=not setup.smoke)
    synth_s = time.perf_counter() - started
    files = [p for p in teacher.rglob("*") if p.is_file()]
    student = work / "student"
    device = str(setup.device) if method == "importance" else "cpu"  # uniform never computes
    command = ["wanlite", "project", "--teacher", str(teacher), "--preset", setup.preset]
    command += ["--method", method, "--device", device, "--out", str(student)]
    wall, peak_rss_kib = run_measured(command, work / "project.log")
    report = json.loads((student / "projection_report.json").read_text())
    figures = {
        "command": shlex.join(command),
        "teacher": "sparse synthetic A14B (zeros from page cache)" if not setup.smoke else "synthetic tiny",
        "teacher_apparent_gb": round(sum(p.stat().st_size for p in files) / 1e9, 1),
        "teacher_on_disk_mb": round(sum(p.stat().st_blocks * 512 for p in files) / 1e6, 1),
        "synth_teacher_s": round(synth_s, 1),
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak_rss_kib / 2**20, 2),
        "in_process_wall_s": report.get("wall_s"),
        "in_process_peak_rss_mb": report.get("peak_rss_mb"),
        "student_parameters": report["totals"]["parameters"],
        "student_mb": round(sum(p.stat().st_size for p in student.rglob("*.safetensors")) / 1e6, 1),
    }
    what = f"projection: `wanlite project --method {method}`, {setup.teacher} -> {setup.preset}, fresh process"
    note = "sparse synthetic teacher: data are zeros from page cache, no disk I/O counted"
    if setup.smoke:
        note = "tiny synthetic teacher"
    note += f"; in-process (no imports) {figures['in_process_wall_s']} s, {figures['in_process_peak_rss_mb']} MB"
    return figures, [(what, f"{wall:.1f} s wall, peak RSS {figures['peak_rss_gib']} GiB", note)]


def measure_evaluate(setup: Setup, work: Path) -> tuple[dict[str, Any], list[Row]]:
    """Evaluation's peak device memory, measured, beside the figure computed from the model shapes."""
    from wanlite.checkpoint.synth import SIZES, synth_teacher
    from wanlite.config import EVAL_SIGMAS
    from wanlite.evaluate import EvaluationError, evaluate
    from wanlite.placement import placement_for, planned_memory
    from wanlite.student import WanLiteStudent

    teacher = synth_teacher(work / "teacher", size="tiny" if setup.smoke else "a14b", sparse=not setup.smoke)
    student = work / "student"
    WanLiteStudent.from_arch(setup.student_arch).save_pretrained(student)
    shapes = SIZES["tiny" if setup.smoke else "a14b"]
    planned = planned_memory(
        placement_for(setup.device), teacher=setup.teacher_arch, student=setup.student_arch, t5=shapes.t5,
        vae=shapes.vae, size=setup.size, num_sigmas=len(EVAL_SIGMAS), baseline=True,
    )  # fmt: skip
    figures: dict[str, Any] = {"computed_gib": {k: round(v / 2**30, 2) for k, v in planned.to_dict().items()}}
    started = time.perf_counter()
    with memory_peak(setup, figures):
        try:
            evaluate(student, teacher, out_dir=work / "evaluation", num_prompts=1, seeds=(0,), steps=2,
                     size=setup.size, baseline=student, device=str(setup.device))  # fmt: skip
            figures["outcome"] = "report written"
        except EvaluationError as err:
            figures["outcome"] = f"refused (expected of a zero teacher): {err}"[:300]
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    measured = f"peak allocated {figures['peak_memory_gib']} GiB" if setup.cuda else "not measured on CPU"
    what = f"evaluate: {setup.preset} against {setup.teacher}, {setup.size}², 1 prompt x 1 seed, baseline given"
    note = f"computed peak {figures['computed_gib']['peak']} GiB (sampling phase {figures['computed_gib']['sample']})"
    return figures, [(what, measured, note)]


def run_measured(command: list[str], log: Path) -> tuple[float, int]:
    """Run a `wanlite` command in a child; return (wall seconds, the child's own peak RSS in KiB).

    `os.wait4` gives the rusage of that one child, unlike RUSAGE_CHILDREN
    (the max over every child this process ever waited for).
    """
    argv = [sys.executable, "-c", "import sys; from wanlite.cli import main; sys.exit(main(sys.argv[1:]))"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([*argv, *command[1:]], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{shlex.join(command)} exited with {proc.returncode}:\n{tail}")
    return wall, usage.ru_maxrss


def _sig(value: float) -> float:
    """Three significant figures: TFLOP/s read well at full size and stay non-zero in the smoke run."""
    return float(f"{value:.3g}")


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "n/a"


# --- main ---------------------------------------------------------------------------------------


MODEL_SECTIONS = {
    "teacher": measure_teacher,
    "generation": measure_generation,
    "student": measure_student,
    "distill": measure_distill,
    "few-step": measure_few_step,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, choices=(1, 2), default=1, help="resident teacher experts (distill)")
    parser.add_argument("--batch", type=int, default=2, help="samples per training step (teacher runs 2x: CFG pairs)")
    parser.add_argument("--size", type=int, default=1024, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=10, help="timed iterations per measurement")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute student blocks in backward")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], metavar="SECTION", help=", ".join(SECTIONS))
    parser.add_argument("--projection-method", choices=("uniform", "importance"), default="uniform")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory for the projection (default: tmp)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 64x64, few steps, CPU ok: check the script")
    parser.add_argument("--json", type=Path, default=None, help="write the results here, rewritten after each section")
    parser.add_argument("--markdown", type=Path, default=None, help="write the BENCHMARKS.md table here, likewise")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.smoke:
        torch.set_num_threads(1)  # the smoke run checks the script; it must not crowd a shared CPU
    ctx = init_distributed()
    setup = Setup(
        device=ctx.device,
        teacher_arch=TINY_TEACHER if args.smoke else A14B,
        preset="tiny" if args.smoke else "lite-1024",
        size=64 if args.smoke else args.size,
        batch=args.batch,
        experts=args.experts,
        steps=2 if args.smoke else args.steps,
        warmup=1 if args.smoke else 2,
        grad_checkpointing=args.grad_checkpointing,
        smoke=args.smoke,
    )
    command = shlex.join(["python", "benchmarks/gpu.py", *sys.argv[1:]])
    report = Report(command, args.json, args.markdown)
    report.record("device", device_info(setup.device))
    print(f"=== benchmarks/gpu.py on {device_line(report.results['device'])}", flush=True)
    report.record(
        "setup",
        {
            "teacher": f"dim {setup.teacher_arch.dim}, {setup.teacher_arch.num_layers} layers, random weights",
            "student": f"{setup.preset}: dim {setup.student_arch.dim}, {setup.student_arch.num_layers} layers",
            "image": setup.size,
            "tokens": setup.tokens,
            "text_tokens": TEXT_LEN,
            "batch": setup.batch,
            "steps": setup.steps,
        },
    )

    name = str(report.results["device"]["name"])
    spec = next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    peak = spec  # the denominator if the measured peak is skipped or fails
    models = Models(setup)
    failed = []
    for section in SECTIONS:
        if section in args.skip:
            continue
        try:
            if section == "peak":
                figures, rows = measure_peak(setup, spec)
                peak = figures["matmul_peak_tflops"] * 1e12
            elif section in ("projection", "evaluate"):
                models.release()
                if args.work:
                    args.work.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(prefix="wanlite-gpu-bench-", dir=args.work) as work:
                    if section == "projection":
                        figures, rows = measure_projection(setup, args.projection_method, Path(work))
                    else:
                        figures, rows = measure_evaluate(setup, Path(work))
            else:
                figures, rows = MODEL_SECTIONS[section](setup, models, peak)
        except Exception as err:  # noqa: BLE001 - one failed section (an OOM, say) must not cost the others
            traceback.print_exc()
            figures, rows = {"error": f"{type(err).__name__}: {err}"[:2000]}, [(section, "failed", type(err).__name__)]
            failed.append(section)
        report.record(section, figures, rows)

    print("--- markdown\n" + report.markdown(), flush=True)
    torch.distributed.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
