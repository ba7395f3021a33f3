"""Train the toy teacher once, measure how well it models its world, and ship it in the repository.

    .venv/bin/python -m benchmarks.toyworld.make_teacher            # the shipped teacher (defaults)
    .venv/bin/python -m benchmarks.toyworld.make_teacher --help

The run checkpoints every `--every` steps under `--work` and resumes from there
when started again, so it survives an interrupted session. At each checkpoint it
samples the EMA experts as Wan 2.2 does (routed at t = 875, CFG 4.0 / 3.0, UniPC
shift 12) for every prompt and reads the samples back with the fixed attribute
decoder. The experts are written to `--out` in the native Wan 2.2 layout with
`teacher.json`: the command, recipe, world seed, wall time, threads and the
accuracy curve. `benchmarks.toyworld.teacher.assemble` puts them next to the
synthetic tiny T5, VAE and tokenizer they were trained with (regenerated
deterministically, so they need not be shipped).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.toyworld import decoder as decoder_mod
from benchmarks.toyworld import teacher as teacher_mod
from benchmarks.toyworld.evaluate import sample_teacher, score_samples
from benchmarks.toyworld.world import MAP_SEED, World, prompts
from wanlite.distill.data import EmbeddingSet

log = logging.getLogger(__name__)

EVAL_SEED = 2_000_000
LATENT_SIZE = 16
SAMPLE_STEPS = 20


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    defaults = teacher_mod.Recipe()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.toyworld.make_teacher", description=__doc__.split("\n")[0])
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"(default: {value})")
    parser.add_argument("--world-seed", type=int, default=MAP_SEED, help=f"seed of the world's latent map ({MAP_SEED})")
    parser.add_argument("--every", type=int, default=250, help="checkpoint and measure every N steps (250)")
    parser.add_argument("--eval-per-prompt", type=int, default=2, help="samples per prompt at each measurement (2)")
    parser.add_argument("--decoder-steps", type=int, default=decoder_mod.DEFAULT_STEPS,
                        help=f"attribute decoder training steps ({decoder_mod.DEFAULT_STEPS})")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path(".wanlite/toyworld-teacher"), help="checkpoints, caches")
    parser.add_argument("--out", type=Path, default=teacher_mod.SHIPPED, help=f"where the experts go ({teacher_mod.SHIPPED})")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="end at this step of the schedule and ship the EMA weights reached (a later run resumes)")
    parser.add_argument("--extend", action="store_true",
                        help="continue a finished or stopped run to a larger --steps, stretching its cosine "
                             "(a warm restart; teacher.json records each schedule)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = teacher_mod.Recipe(**{k: getattr(args, k) for k in asdict(defaults)})

    work = args.work / f"world{args.world_seed}"
    work.mkdir(parents=True, exist_ok=True)
    base, emb_uri = teacher_mod.base_teacher(work)
    emb, world = EmbeddingSet.load(emb_uri), World(LATENT_SIZE, seed=args.world_seed)
    decoder = decoder_mod.load_or_train(work / f"decoder-{args.decoder_steps}.pt", world, steps=args.decoder_steps)
    rows = torch.arange(len(prompts())).repeat(args.eval_per_prompt)
    seeds = [EVAL_SEED + i for i in range(len(rows))]
    reference = world.render_rows(rows, torch.Generator().manual_seed(EVAL_SEED))
    commands_file = work / "commands.json"  # every invocation that shaped these weights, resumes included
    commands = json.loads(commands_file.read_text()) if commands_file.is_file() else []
    commands.append("python -m benchmarks.toyworld.make_teacher " + shlex.join(sys.argv[1:] if argv is None else argv))
    commands_file.write_text(json.dumps(commands, indent=1))
    history_file = work / "history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    started = time.perf_counter()

    def measure(step: int, experts: dict[str, torch.nn.Module]) -> None:
        samples = sample_teacher(base, experts[teacher_mod.HIGH], experts[teacher_mod.LOW], emb, rows, seeds,
                                 LATENT_SIZE, SAMPLE_STEPS)  # fmt: skip
        scores = score_samples(decoder, samples, rows, reference)
        history.append({"step": step, "wall_s": round(time.perf_counter() - started, 1), **scores})
        history_file.write_text(json.dumps(history, indent=1))
        log.info("toy teacher step %d: %s", step, {k: round(v, 3) for k, v in scores.items()})

    step, experts, segments = teacher_mod.train_experts(world, emb, recipe, checkpoint=work / "checkpoint.pt",
                                                        every=args.every, stop_at=args.stop_at, on_checkpoint=measure,
                                                        extend=args.extend)  # fmt: skip
    if not history or history[-1]["step"] != step:
        measure(step, experts)
    world_scores = score_samples(decoder, reference, rows, reference)
    record = {
        "command": commands[-1], "commands": commands,
        "recipe": asdict(recipe), "schedule_segments": segments, "world_seed": args.world_seed, "threads": args.threads,
        "latent_size": LATENT_SIZE, "sample_steps": SAMPLE_STEPS, "eval_samples": len(rows),
        "decoder_steps": args.decoder_steps, "decoder_on_rendered_world": world_scores,
        "train_wall_s": sum(h["wall_s"] for h in _segments(history)), "history": history,
        "final": history[-1],
    }  # fmt: skip
    teacher_mod.ship(experts, args.out, record)
    print(json.dumps(record["final"], indent=1))
    return 0


def _segments(history: list[dict]) -> list[dict]:
    """The last measurement of each resumed segment (wall time restarts at 0 in each)."""
    return [h for i, h in enumerate(history) if i + 1 == len(history) or history[i + 1]["wall_s"] < h["wall_s"]]


if __name__ == "__main__":
    sys.exit(main())
