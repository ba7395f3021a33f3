"""Round-trip check: save a student, reload it in a FRESH process with stock diffusers, compare.

A student that only loads inside the process that built it (a custom loader,
state captured in Python objects, a teacher path in its config) is not
shippable. So the check saves with `save_pretrained`, loads in a new
interpreter with plain `WanTransformer3DModel.from_pretrained`, and compares
outputs on fixed inputs: bit-identical in fp32, within rounding in bf16/fp16.
While the child loads, the teacher directory is hidden from it (an empty
tmpfs mounted over it in a private mount namespace, or permissions removed
when not root) and the child reports whether it could still see any teacher
file: that is the proof the student is self-contained. The child also times
the load against a raw safetensors read of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import wanlite
from wanlite.config import WanArch
from wanlite.export import DTYPES, dir_sha256, load_student, parse_dtype

log = logging.getLogger(__name__)

PROBE_TIMESTEPS = (950.0, 300.0)
"""One timestep per expert range (t >= 875 is the high-noise expert's), so both regimes are probed."""

REL_TOLERANCE = {"fp32": 0.0, "bf16": 2 * 2**-8, "fp16": 2 * 2**-11}
"""Allowed max |diff| / max |reference|: exact in fp32, two units of rounding otherwise."""


class RoundtripError(RuntimeError):
    """The fresh-process load itself failed; the message carries the child's stderr."""


def probe_inputs(arch: WanArch, *, seed: int = 0, latent_hw: tuple[int, int] = (8, 8), tokens: int = 16) -> dict:
    """Fixed model inputs: one latent frame per probe timestep, random text states, seeded."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(PROBE_TIMESTEPS)
    return {
        "hidden_states": torch.randn(batch, arch.in_dim, 1, *latent_hw, generator=gen),
        "timestep": torch.tensor(PROBE_TIMESTEPS),
        "encoder_hidden_states": torch.randn(batch, tokens, arch.text_dim, generator=gen),
    }


def model_outputs(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Velocity prediction for `inputs`, computed in the model's dtype, returned in fp32."""
    dtype = model.dtype
    with torch.no_grad():
        out = model(
            hidden_states=inputs["hidden_states"].to(dtype),
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"].to(dtype),
            return_dict=False,
        )[0]
    return out.float()


def roundtrip(student: str | Path, *, dtype: str = "fp32", teacher: str | Path | None = None) -> dict[str, Any]:
    """Save `student` in `dtype`, reload it in a fresh process, compare outputs; return the report."""
    torch_dtype = parse_dtype(dtype)
    teacher_dir = _teacher_path(teacher)
    model, arch, student_dir = load_student(student, dtype=torch_dtype)
    inputs = probe_inputs(arch)
    reference = model_outputs(model, inputs)
    with tempfile.TemporaryDirectory(prefix="wanlite-roundtrip-") as tmp:
        work = Path(tmp)
        model.save_pretrained(work / "saved")
        del model
        save_file(inputs, str(work / "inputs.safetensors"))
        child = _run_child(work, dtype, teacher_dir)
        reloaded = load_file(str(work / "outputs.safetensors"))["sample"]
        saved_bytes = sum(p.stat().st_size for p in (work / "saved").glob("*.safetensors"))
    diff = (reloaded - reference).abs().max().item()
    scale = reference.abs().max().item()
    exact = torch.equal(reloaded, reference)
    within = exact or diff <= REL_TOLERANCE[dtype] * scale
    isolated = teacher_dir is None or not (child["teacher_visible"] or child["teacher_files_opened"])
    return {
        "kind": "roundtrip",
        "passed": bool(within and isolated),
        "dtype": dtype,
        "exact": exact,
        "max_abs_diff": diff,
        "max_abs_reference": scale,
        "rel_tolerance": REL_TOLERANCE[dtype],
        "student": str(student),
        "student_sha256": dir_sha256(student_dir),
        "saved_bytes": saved_bytes,
        "load_s": child["load_s"],
        "raw_read_s": child["raw_read_s"],
        "load_overhead": child["load_s"] / max(child["raw_read_s"], 1e-9),
        "loaded_class": child["loaded_class"],
        "teacher": str(teacher_dir) if teacher_dir else None,
        "teacher_isolation": child["isolation"],
        "teacher_visible_in_child": child["teacher_visible"],
        "teacher_files_opened": child["teacher_files_opened"],
        "wanlite_version": wanlite.__version__,
    }


def _teacher_path(teacher: str | Path | None) -> Path | None:
    if teacher is None:
        return None
    text = str(teacher).removeprefix("file://")
    path = Path(text).resolve()
    if "://" in text or not path.is_dir():
        raise FileNotFoundError(f"--teacher: expected a local teacher directory to hide, found {teacher}")
    return path


# --- the fresh process ----------------------------------------------------------------


def _run_child(work: Path, dtype: str, teacher: Path | None) -> dict[str, Any]:
    """Run the load in a new interpreter with the teacher hidden; return its JSON result."""
    cmd = [
        sys.executable, "-m", "wanlite.roundtrip",
        str(work / "saved"), str(work / "inputs.safetensors"), str(work / "outputs.safetensors"),
        "--dtype", dtype, "--threads", str(torch.get_num_threads()),
    ]  # fmt: skip
    isolation = "none"
    if teacher is not None:
        cmd += ["--teacher", str(teacher)]
        isolation = _isolation_method()
    if isolation == "mount-namespace":
        # Mount an empty read-only tmpfs over the teacher inside a private mount namespace:
        # in the child the path exists but holds nothing; the host is untouched.
        script = 'mount -t tmpfs -o ro,size=4k wanlite-hidden "$0" && exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(teacher), *cmd]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))}
    mode = teacher.stat().st_mode if teacher is not None else None
    try:
        if isolation == "permissions":
            teacher.chmod(0)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    finally:
        if isolation == "permissions":
            teacher.chmod(mode)
    if proc.returncode != 0:
        raise RoundtripError(
            f"fresh-process load of {work / 'saved'} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    result = json.loads((work / "child.json").read_text())
    result["isolation"] = isolation if teacher is not None else "not requested"
    return result


def _isolation_method() -> str:
    """How to hide the teacher: drop permissions (non-root), else a private mount namespace."""
    if os.geteuid() != 0:
        return "permissions"
    if shutil.which("unshare") and subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    ).returncode == 0:
        return "mount-namespace"
    return "audit-only"


def _package_root() -> str:
    """The directory holding the `wanlite` package, so the child imports this very code."""
    return str(Path(wanlite.__file__).resolve().parent.parent)


def _child_main(argv: list[str] | None = None) -> int:
    """Child side: load with stock diffusers, compute outputs, record timings and teacher visibility."""
    parser = argparse.ArgumentParser(prog="python -m wanlite.roundtrip")
    parser.add_argument("saved", type=Path)
    parser.add_argument("inputs", type=Path)
    parser.add_argument("outputs", type=Path)
    parser.add_argument("--dtype", choices=list(DTYPES), required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--teacher", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    opened: list[str] = []
    if args.teacher is not None:
        hidden = str(args.teacher)
        sys.addaudithook(lambda event, a: _record_open(event, a, hidden, opened))

    from diffusers import WanTransformer3DModel

    shards = sorted(args.saved.glob("*.safetensors"))
    for shard in shards:  # warm the page cache so both timings read from memory
        shard.read_bytes()
    start = time.perf_counter()
    for shard in shards:
        load_file(str(shard))
    raw_read_s = time.perf_counter() - start
    start = time.perf_counter()
    model = WanTransformer3DModel.from_pretrained(args.saved, torch_dtype=DTYPES[args.dtype]).eval()
    load_s = time.perf_counter() - start
    save_file({"sample": model_outputs(model, load_file(str(args.inputs))).contiguous()}, str(args.outputs))
    result = {
        "load_s": load_s,
        "raw_read_s": raw_read_s,
        "loaded_class": type(model).__name__,
        "teacher_visible": args.teacher is not None and _visible(args.teacher),
        "teacher_files_opened": sorted(set(opened)),
    }
    (args.outputs.parent / "child.json").write_text(json.dumps(result))
    return 0


def _record_open(event: str, args: tuple, hidden: str, opened: list[str]) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path.startswith(hidden):
            opened.append(path)


def _visible(teacher: Path) -> bool:
    """Whether the child can see any teacher file at all."""
    try:
        return any(teacher.iterdir())
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(_child_main())
