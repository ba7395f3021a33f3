"""Host memory of a training rank's prompt-embedding set: the RSS that `EmbeddingSet.load` adds. Not a test.

Writes (once, in --work) an embedding set of --prompts prompts with --tokens
tokens each at T5-XXL width (4096) in bf16, through `encode_prompts` with
the tiny teacher's tokenizer and T5's output replaced by constant rows (what
is measured is the set's size, not T5), then in a fresh process per checkout
loads it and draws one batch of 64 prompts, recording the RSS added (VmHWM).

    .venv/bin/python benchmarks/embedding_memory.py [--prompts 1000] [--tokens 60] [--code DIR ...]

--code: checkouts whose `wanlite` loads the set (default: this one), e.g. a
`git archive <commit>` copy for a before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROBE = """
import json, sys, torch
from pathlib import Path
def hwm():
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")) / 1024
from wanlite.distill.data import EmbeddingSet
before = hwm()
emb = EmbeddingSet.load(sys.argv[1])
loaded = hwm()
context, _ = emb.compact(torch.arange(64))
print(json.dumps({"load_mb": loaded - before, "load_and_batch_mb": hwm() - before, "batch": list(context.shape)}))
"""


def prepare(work: Path, prompts: int, tokens: int) -> str:
    """The embedding set's URI (reused when already in --work)."""
    from wanlite.checkpoint.synth import synth_teacher
    from wanlite.distill import encode

    done = work / f"embeddings-{prompts}x{tokens}.json"
    if done.exists():
        return json.loads(done.read_text())["uri"]
    tiny = work / "tiny"
    if not tiny.exists():
        synth_teacher(tiny)
    encode.encode = lambda _tok, _enc, batch: [torch.ones(tokens, 4096, dtype=torch.bfloat16) for _ in batch]
    result = encode.encode_prompts(tiny, [f"prompt {i}" for i in range(prompts)], (work / "store").as_uri(),
                                   progress=False)  # fmt: skip
    done.write_text(json.dumps(result))
    return result["uri"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/wanlite-embedding-memory"))
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--code", type=Path, nargs="+", default=[REPO])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    uri = prepare(args.work, args.prompts, args.tokens)
    stored_mb = args.prompts * args.tokens * 4096 * 2 / 2**20
    for code in args.code:
        out = subprocess.run([sys.executable, "-c", PROBE, uri], cwd=args.work, env={**os.environ, "PYTHONPATH": str(code.resolve())},
                             capture_output=True, text=True, check=True)  # fmt: skip
        row = {"code": str(code), "stored_bf16_mb": round(stored_mb), **json.loads(out.stdout.strip().splitlines()[-1])}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
