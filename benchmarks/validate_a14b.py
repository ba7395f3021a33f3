"""Benchmark: `wanlite validate` on a full-size (sparse) Wan 2.2 T2V-A14B checkpoint.

Validation must read headers only: ~2,200 expert tensors in twelve ~10 GB shards,
an 11 GB T5 `.pth` and the VAE, in seconds and well under 500 MB of RAM, so it can
run as a cheap CPU step before any GPU is booked. A sparse synthetic teacher has
the real file sizes and headers with holes for data, so any accidental data read
would show up as time (reading 126 GB of zeros) and RSS.

The validation runs in a child process so its peak RSS (`ru_maxrss` from
`os.wait4`) is its own; a second child that only imports the validator gives the
baseline the interpreter, torch, diffusers and transformers cost by themselves.

    .venv/bin/python benchmarks/validate_a14b.py [--workdir DIR]

Prints one Markdown table row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_VALIDATE = """
import json, sys, time
from pathlib import Path
from wanlite.checkpoint.validate import validate_teacher

def bytes_read():  # read(2) bytes so far: proves only headers were read (mmap'd data would not count, nor is touched)
    return int(next(l for l in Path("/proc/self/io").read_text().splitlines() if l.startswith("rchar")).split()[1])

read0, start = bytes_read(), time.perf_counter()
report = validate_teacher(sys.argv[1])
seconds, read = time.perf_counter() - start, bytes_read() - read0
report.write(sys.argv[2])
print(json.dumps({
    "seconds": seconds,
    "read": read,
    "expert_tensors": sum(c.tensors for n, c in report.components.items() if n.endswith("noise_model")),
    "bytes": sum(c.bytes for c in report.components.values()),
    "problems": [str(p) for p in report.problems],
}))
"""

_IMPORT_ONLY = "import wanlite.checkpoint.validate; from transformers import AutoTokenizer"


def run_child(code: str, *args: str) -> tuple[str, float, int]:
    """Run `code` in a fresh interpreter: (stdout, wall seconds, that child's own peak RSS in bytes).

    `os.wait4` returns the rusage of exactly this child, unlike RUSAGE_CHILDREN,
    which is the maximum over every child waited so far.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen not to wait again
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"child failed ({proc.returncode}):\n{err.read()[-4000:]}")
        return out.read(), wall, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def machine() -> str:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to synthesise the sparse teacher (default: a temp dir)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from wanlite.checkpoint.synth import synth_teacher

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        start = time.perf_counter()
        teacher = synth_teacher(Path(tmp) / "a14b", size="a14b", layout="native", seed=0, sparse=True)
        synth_s = time.perf_counter() - start
        disk = sum(p.stat().st_blocks * 512 for p in teacher.rglob("*") if p.is_file())
        _, base_wall, base_rss = run_child(_IMPORT_ONLY)
        out, wall, rss = run_child(_VALIDATE, str(teacher), str(Path(tmp) / "report"))
        result = json.loads(out.strip().splitlines()[-1])
    if result["problems"]:
        print("\n".join(result["problems"]), file=sys.stderr)
        return 1
    print(
        f"synthesised the sparse a14b teacher in {synth_s:.1f} s: {result['bytes'] / 1e9:.1f} GB apparent, "
        f"{disk / 1e6:.1f} MB on disk"
    )
    print()
    print(
        "| command | machine | expert tensors | validate_teacher() | bytes read | process (imports alone) "
        "| peak RSS (imports alone) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    print(
        f"| `python benchmarks/validate_a14b.py` | {machine()} | {result['expert_tensors']} | "
        f"{result['seconds']:.2f} s | {result['read'] / 2**20:.1f} MiB | {wall:.1f} s ({base_wall:.1f} s) | "
        f"{rss / 2**20:.0f} MiB ({base_rss / 2**20:.0f} MiB) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
