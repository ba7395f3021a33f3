"""Projection memory and speed on a full-width (dim 5120) synthetic teacher. Not a test.

Writes a Wan teacher with A14B's width (dim 5120, ffn 13824, 40 heads, fp32 like
the official experts) but only a few layers, then measures, each in a fresh
process:

- plain read: `safe_open` + `get_tensor` (+ a copy, since safetensors may map
  lazily) of exactly the teacher tensors the projection reads (the I/O floor);
- uniform projection (`--method uniform`): reads, slices, writes the student;
- importance projection: the same plus calibration passes through both
  experts, streamed one submodule at a time.

Goals (issue 4): peak RSS <= student size + 2 x the largest teacher tensor + 1 GB;
wall time <= 1.5 x the plain read (for the slicing path; calibration is compute
that scales with the calibration set and is reported separately).

    .venv/bin/python benchmarks/projection_memory.py [--work DIR] [--layers 2]

The high-noise expert is hard links to the low-noise one's files (same bytes,
no extra disk): the benchmark is about memory and I/O, not about weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def teacher_arch(layers: int):
    from wanlite.config import A14B

    return A14B.replace(num_layers=layers)


def student_arch(layers: int):
    from wanlite.config import get_preset

    return get_preset("lite-1024").arch.replace(num_layers=layers)


def write_teacher(root: Path, layers: int) -> Path:
    """Stream a full-width teacher to disk (never more than one 64 MB chunk in memory)."""
    import torch

    from wanlite.checkpoint.layout import EXPERT_DIRS
    from wanlite.checkpoint.synth import SynthTensors, write_native_expert
    from wanlite.checkpoint.transformer_keys import native_tensor_shapes

    arch = teacher_arch(layers)
    high, low = (root / e for e in EXPERT_DIRS)
    if (low / "config.json").is_file() and json.loads((low / "config.json").read_text()) == arch.native_config():
        return root
    tensors = SynthTensors(native_tensor_shapes(arch), torch.float32, 0, "low_noise_model")
    write_native_expert(low, tensors, arch, max_shard_bytes=2 * 10**9)
    high.mkdir(parents=True, exist_ok=True)
    for file in low.iterdir():
        target = high / file.name
        if not target.exists():
            os.link(file, target)
    return root


def child(mode: str, teacher: Path, layers: int, out: Path) -> dict:
    """One measurement, run in a fresh process so its peak RSS is its own."""
    import torch
    from safetensors import safe_open

    from wanlite.checkpoint.reader import TeacherReader
    from wanlite.checkpoint.transformer_keys import native_tensor_shapes
    from wanlite.projection import project_student
    from wanlite.projection.select import uniform_selection
    from wanlite.projection.slicing import plan

    student = student_arch(layers)
    reader = TeacherReader(teacher)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if mode == "plain-read":
        selection = uniform_selection(reader.arch, student)
        names = {plan(n, selection, reader.arch.dim).teacher_name for n in native_tensor_shapes(student)}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            file, key = reader.location("low_noise_model", name)
            by_file.setdefault(file, []).append(key)
        nbytes = 0
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt") as fh:
                for key in keys:  # clone: get_tensor may map lazily; a read must touch every byte
                    nbytes += fh.get_tensor(key).clone().nbytes
        result = {"bytes_read": nbytes}
    else:
        report = project_student(
            teacher, student, out_dir=out, method=mode, calib_samples=2, calib_random=True, image_size=64, device="cpu",
            dtype=torch.float32,
        )
        result = {"totals": report["totals"], "calibration_inputs": (report["calibration"] or {}).get("inputs")}
    result["wall_s"] = round(time.perf_counter() - started, 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["import_rss_mb"] = round(baseline, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wanlite-projection-bench")
    parser.add_argument("--layers", type=int, default=2, help="teacher (and student) layers (default 2)")
    parser.add_argument("--child", choices=("plain-read", "uniform", "importance"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    teacher = args.work / "teacher"
    if args.child:
        print(json.dumps(child(args.child, teacher, args.layers, args.work / f"student-{args.child}")))
        return 0

    from wanlite.checkpoint.transformer_keys import native_tensor_shapes

    started = time.perf_counter()
    write_teacher(teacher, args.layers)
    print(f"teacher written/verified in {time.perf_counter() - started:.1f} s: {teacher}", flush=True)
    results = {}
    for mode in ("plain-read", "plain-read", "uniform", "importance"):  # first read warms the page cache
        shutil.rmtree(args.work / f"student-{mode}", ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--work", str(args.work), "--layers", str(args.layers), "--child", mode],
            capture_output=True, text=True, check=True,
        )
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(mode, results[mode], flush=True)

    largest = max(4 * math.prod(s) for s in native_tensor_shapes(teacher_arch(args.layers)).values())
    student_bytes = 4 * student_arch(args.layers).num_params()
    budget_mb = (student_bytes + 2 * largest + 2**30) / 2**20
    read = results["plain-read"]["wall_s"]
    summary = {
        "teacher": f"dim 5120, ffn 13824, {args.layers} layers, fp32",
        "student": f"lite-1024 width, {args.layers} layers ({student_bytes / 2**20:.0f} MB fp32)",
        "largest_teacher_tensor_mb": round(largest / 2**20, 1),
        "rss_budget_mb": round(budget_mb, 1),
        "results": results,
        "uniform_wall_over_plain_read": round(results["uniform"]["wall_s"] / read, 2),
        "goals": {
            "uniform_rss": results["uniform"]["peak_rss_mb"] <= budget_mb,
            "importance_rss": results["importance"]["peak_rss_mb"] <= budget_mb,
            "uniform_wall": results["uniform"]["wall_s"] <= 1.5 * read,
        },
    }
    (args.work / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
