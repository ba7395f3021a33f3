"""Per-rank peak host RSS of `wanlite distill --nproc N` with an A14B-width teacher. Not a test.

Writes (once, in --work) a sparse synthetic teacher at A14B width with
`--layers` blocks per expert (`wanlite synth-teacher --size a14b --layers N
--sparse`: real shapes, tensors read back as zeros, seconds to write), the
tiny teacher's prompt embeddings and latents (32x32 images; the data only has
to match in channels and text width), then runs one training step (global
batch max(2, N)) with a checkpoint for each --nproc and records every rank's
peak RSS (VmHWM, the kernel's high-water mark, polled from /proc until the
rank exits).

    .venv/bin/python benchmarks/teacher_memory.py [--work DIR] [--layers 2] [--nproc 1 2] [--code DIR]

--code runs another checkout's `wanlite` (e.g. `git archive <commit> | tar -x -C DIR`
for a before/after comparison) against the same teacher and data.
Target (issue 14): every rank <= 0.8 x both experts' bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare(work: Path, layers: int) -> dict[str, str]:
    """The teacher, embeddings and latents (reused when already in --work)."""
    from wanlite.checkpoint.synth import synth_teacher
    from wanlite.distill.encode import encode_prompts
    from wanlite.distill.teacher_data import teacher_data
    from wanlite.prompts import load_prompts

    teacher = work / f"a14b-{layers}layers"
    if not teacher.exists():
        synth_teacher(teacher, size="a14b", sparse=True, layers=layers)
    tiny = work / "tiny"
    if not tiny.exists():
        synth_teacher(tiny)
    store = (work / "data-store").as_uri()
    emb = encode_prompts(tiny, load_prompts("eval")[:2], store, progress=False)
    data = teacher_data(tiny, emb["uri"], store, image_size=32, steps=2, shard_size=2, batch_size=2, progress=False)
    return {"teacher": str(teacher), "embeddings": emb["uri"], "data": data["uri"]}


def _hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def measure(inputs: dict[str, str], work: Path, nproc: int, code: Path) -> dict[str, float]:
    """Peak RSS (MB) of every rank of one run: rank -> MB."""
    import psutil

    run = work / f"run-{code.name}-{nproc}-{time.time_ns()}"
    argv = ["distill", "--teacher", inputs["teacher"], "--data", inputs["data"], "--embeddings", inputs["embeddings"],
            "--out", (run / "store").as_uri(), "--staging-dir", str(run / "staging"), "--steps", "1",
            "--batch-size", str(max(2, nproc)), "--checkpoint-every", "1", "--warmup-steps", "1",
            "--nproc", str(nproc),
            "--mlflow-uri", f"sqlite:///{run / 'mlflow.db'}", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONDONTWRITEBYTECODE": "1"}
    run.mkdir(parents=True)
    # cwd=run: Python puts the working directory before PYTHONPATH, so from a checkout's root
    # the job (and its torchrun ranks) would import that checkout's wanlite instead of --code's.
    job = subprocess.Popen([sys.executable, "-c", "import sys; from wanlite.cli import main; sys.exit(main())", *argv],
                           env=env, cwd=run, stdout=subprocess.DEVNULL, stderr=open(run.with_suffix(".log"), "wb"))  # fmt: skip
    peaks: dict[int, int] = {}
    ranks: dict[int, str] = {}
    while job.poll() is None:
        for proc in [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]:
            try:
                rank = proc.environ().get("RANK", "0" if proc.pid == job.pid and nproc == 1 else None)
                if rank is not None:
                    ranks[proc.pid] = rank
                    peaks[proc.pid] = max(peaks.get(proc.pid, 0), _hwm_kb(proc.pid))
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                continue
        time.sleep(0.05)
    if job.returncode != 0:
        raise RuntimeError(f"distill --nproc {nproc} failed; see {run.with_suffix('.log')}")
    return {ranks[pid]: kb / 1024 for pid, kb in sorted(peaks.items(), key=lambda kv: ranks[kv[0]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/wanlite-teacher-memory"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose wanlite runs (default: this one)")
    args = parser.parse_args()
    from wanlite.config import A14B

    args.work.mkdir(parents=True, exist_ok=True)
    inputs = prepare(args.work, args.layers)
    experts_mb = 2 * A14B.replace(num_layers=args.layers).num_params() * 4 / 2**20
    rows = []
    for nproc in args.nproc:
        start = time.perf_counter()
        peaks = measure(inputs, args.work, nproc, args.code.resolve())
        rows.append({"nproc": nproc, "peak_rss_mb": peaks, "max_over_experts": max(peaks.values()) / experts_mb,
                     "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"layers": args.layers, "both_experts_mb": round(experts_mb), "code": str(args.code),
                      "runs": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
