"""Few-step students on the toy world: train K-step students from a distilled one with the real
`wanlite distill-steps` trainer, sample them with their recorded schedule, score them like the study does.

    python -m benchmarks.toyworld.few_step --student-uri file:///…/runs/<distilled run>/final --k 1 2 4 --seeds 0 1 2

Everything the study prepared (teacher, embeddings, held-out data, decoder) is
reused from its work directory (`prepare` is cached). Per K and seed it prints
all-three and per-attribute accuracy, the Fréchet distance to the teacher's
held-out samples, transformer evaluations per image and CPU wall per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.toyworld.evaluate import score_samples
from benchmarks.toyworld.study import HELDOUT_SEED, Prepared, StudyConfig, _tag, prepare
from wanlite.distill.data import EmbeddingSet, LatentSet
from wanlite.distill.steps import distill_steps, sample
from wanlite.distill.steps_options import StepsConfig
from wanlite.pipeline import local_path
from wanlite.sampling import Sampling, load_sampling
from wanlite.student import WanLiteStudent
from wanlite.text_padding import compact_text_padding

EVAL_BATCH = 32


@dataclasses.dataclass
class FewStepConfig:
    """The DMD knobs of the few-step runs (the study's own knobs stay in StudyConfig)."""

    updates: int = 200
    critic_updates: int = 5
    batch_size: int = 16
    lr: float = 1e-4
    critic_lr: float = 1e-4
    shift: float = 12.0


def train_few_step(prep: Prepared, cfg: StudyConfig, student_uri: str, k: int, seed: int,
                   few: FewStepConfig) -> dict[str, Any]:  # fmt: skip
    """One K-step student from the distilled `student_uri` (resumed or found when it already ran)."""
    name = f"steps{k}-s{seed}-{_tag(student_uri, *dataclasses.astuple(few))}"
    return distill_steps(StepsConfig(
        teacher=str(prep.teacher), student=student_uri, embeddings=prep.embeddings, image_size=cfg.latent_size * 8,
        sample_steps=k, out=prep.store_uri, run_name=name, steps=few.updates, critic_updates=few.critic_updates,
        batch_size=few.batch_size, lr=few.lr, critic_lr=few.critic_lr, shift=few.shift, ema_decay=0.0,
        checkpoint_every=few.updates, log_every=max(1, few.updates // 20), seed=seed,
        mlflow_uri=f"sqlite:///{(cfg.work / 'mlflow.db').resolve()}", experiment="toyworld-few-step", resume=True,
        progress=False,
    ))  # fmt: skip


@torch.no_grad()
def sample_few_step(student_uri: str, emb: EmbeddingSet, rows: torch.Tensor, seeds: list[int],
                    size: int) -> tuple[torch.Tensor, Sampling]:  # fmt: skip
    """Latents [n, 16, 1, size, size] sampled the way the student's record says; noise per seed as WanPipeline's."""
    folder = local_path(student_uri)
    sampling = load_sampling(folder)
    if sampling is None or sampling.sigmas is None or sampling.uses_cfg:
        raise ValueError(f"{folder}: expected a few-step, CFG-free sampling record, found {sampling}")
    student = compact_text_padding(WanLiteStudent.from_pretrained(folder).eval())
    out = []
    for i in range(0, len(rows), EVAL_BATCH):
        sl = slice(i, i + EVAL_BATCH)
        noise = torch.cat([torch.randn((1, 16, 1, size, size), generator=torch.Generator().manual_seed(s))
                           for s in seeds[sl]])  # fmt: skip
        out.append(sample(student, sampling.sigmas, noise, emb.compact(rows[sl])[0]))
    return torch.cat(out), sampling


def score_few_step(prep: Prepared, cfg: StudyConfig, student_uri: str) -> dict[str, float]:
    """The study's held-out scores, plus transformer evaluations and CPU wall per image."""
    data, emb = LatentSet.load(prep.heldout_data), EmbeddingSet.load(prep.embeddings)
    seeds = [HELDOUT_SEED + i for i in range(len(data))]  # teacher-data's rule: sample i uses seed + i
    started = time.perf_counter()
    samples, sampling = sample_few_step(student_uri, emb, data.prompt_index, seeds, cfg.latent_size)
    wall = (time.perf_counter() - started) / len(data)
    scores = score_samples(prep.decoder, samples, data.prompt_index, data.latents)
    return {**scores, "evaluations_per_image": sampling.steps, "cpu_s_per_image": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.toyworld.few_step", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=StudyConfig.work, help="the study's work directory")
    parser.add_argument("--student-uri", required=True, help="a distilled student (a study run's student_uri)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="sampling steps of the students")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for f in dataclasses.fields(FewStepConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    cfg = StudyConfig(work=args.work)
    few = FewStepConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FewStepConfig)})
    torch.set_num_threads(cfg.threads)
    prep = prepare(cfg)
    rows = []
    for k in args.k:
        for seed in args.seeds:
            result = train_few_step(prep, cfg, args.student_uri, k, seed, few)
            scores = score_few_step(prep, cfg, result["student_uri"])
            rows.append({"k": k, "seed": seed, "run": result["run"], **scores})
            print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
