"""Scoring students against the toy teacher: held-out velocity MSE, samples, Fréchet distance, attributes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from benchmarks.toyworld.decoder import AttributeDecoder, accuracy
from benchmarks.toyworld.world import attribute_labels
from wanlite.config import GUIDANCE_HIGH, GUIDANCE_LOW, SAMPLE_SHIFT, get_preset
from wanlite.distill import objective
from wanlite.distill.data import EmbeddingSet, LatentSet
from wanlite.pipeline import build_pipeline
from wanlite.student import WanLiteStudent
from wanlite.text_padding import compact_text_padding

EVAL_BATCH = 32


@dataclass
class HeldOut:
    """Fixed noisy inputs built from held-out teacher samples, and the teacher's guided velocity at each.

    The target is exactly what the trainer regresses onto (the routed expert,
    CFG folded in), so the curve measures distillation progress on data the
    student never saw, at fixed noise: no sampling noise between checkpoints.
    """

    x_t: torch.Tensor
    t: torch.Tensor
    rows: torch.Tensor
    target: torch.Tensor

    @classmethod
    def build(cls, data: LatentSet, emb: EmbeddingSet, high: torch.nn.Module, low: torch.nn.Module,
              sigmas_per_sample: int, seed: int) -> HeldOut:  # fmt: skip
        gen = torch.Generator().manual_seed(seed)
        x0 = data.latents.repeat_interleave(sigmas_per_sample, 0)
        rows = data.prompt_index.repeat_interleave(sigmas_per_sample)
        k = sigmas_per_sample  # stratified quantiles of the shifted schedule: both experts' ranges are covered
        u = (torch.arange(k).repeat(len(data)) + torch.rand(len(x0), generator=gen)) / k
        sigma = objective.shift_sigmas(u, SAMPLE_SHIFT)
        eps = torch.randn(x0.shape, generator=gen)
        x_t, t = objective.add_noise(x0, eps, sigma), objective.to_timestep(sigma)
        experts = (objective.Expert(compact_text_padding(high), GUIDANCE_HIGH),
                   objective.Expert(compact_text_padding(low), GUIDANCE_LOW))  # fmt: skip
        target = torch.cat([
            objective.teacher_targets(*experts, x_t[i : i + EVAL_BATCH], t[i : i + EVAL_BATCH],
                                      *emb.compact(rows[i : i + EVAL_BATCH], with_negative=True),
                                      run_high=True, run_low=True).velocity
            for i in range(0, len(x0), EVAL_BATCH)
        ])  # fmt: skip
        return cls(x_t, t, rows, target)

    def save(self, path: Path) -> None:
        torch.save(vars(self), path)

    @classmethod
    def load(cls, path: Path) -> HeldOut:
        return cls(**torch.load(path, weights_only=True))

    @torch.no_grad()
    def mse(self, student: torch.nn.Module, emb: EmbeddingSet) -> float:
        student = compact_text_padding(student)
        total = 0.0
        for i in range(0, len(self.t), EVAL_BATCH):
            sl = slice(i, i + EVAL_BATCH)
            context, _ = emb.compact(self.rows[sl])
            v = objective.predict(student, self.x_t[sl], self.t[sl], context)
            total += float(objective.mse_per_sample(v, self.target[sl]).sum())
        return total / len(self.t)


def student_from_checkpoint(checkpoint_dir: Path) -> WanLiteStudent:
    """The raw student weights of a trainer checkpoint (DCP), read without a process group."""
    student = WanLiteStudent.from_arch(get_preset("tiny").arch)
    state = {"model": {f"student.{k}": v for k, v in student.state_dict().items()}}
    with warnings.catch_warnings():  # no process group here is the point, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(checkpoint_dir), no_dist=True)
    student.load_state_dict({k.removeprefix("student."): v for k, v in state["model"].items()})
    return student.eval()


@torch.no_grad()
def sample_student(teacher: Path, student: torch.nn.Module, emb: EmbeddingSet, rows: torch.Tensor,
                   seeds: list[int], size: int, steps: int) -> torch.Tensor:  # fmt: skip
    """Latents [n, 16, 1, s, s] from the student through stock `WanPipeline` (CFG folded in: guidance 1)."""
    pipe = build_pipeline(teacher, compact_text_padding(student), with_text_encoder=False, with_vae=False)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(rows), EVAL_BATCH):
        sl = slice(i, i + EVAL_BATCH)
        out.append(pipe(
            prompt_embeds=emb.compact(rows[sl])[0], height=size * 8, width=size * 8, num_frames=1,
            num_inference_steps=steps, guidance_scale=1.0,
            generator=[torch.Generator().manual_seed(s) for s in seeds[sl]], output_type="latent",
        ).frames.float())  # fmt: skip
    return torch.cat(out)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [n, d] and b [m, d] (the FID formula)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def score_samples(decoder: AttributeDecoder, samples: torch.Tensor, rows: torch.Tensor,
                  reference: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """Attribute accuracy of samples for their prompts, and their Fréchet distance to the reference samples."""
    with torch.no_grad():
        fd = frechet_distance(decoder.features(samples), decoder.features(reference))
    return {"frechet": fd, **{f"acc_{k}": v for k, v in accuracy(decoder, samples, attribute_labels(rows)).items()}}


@torch.no_grad()
def sample_teacher(teacher: Path, high: torch.nn.Module, low: torch.nn.Module, emb: EmbeddingSet, rows: torch.Tensor,
                   seeds: list[int], size: int, steps: int) -> torch.Tensor:  # fmt: skip
    """Latents [n, 16, 1, s, s] from the two experts as Wan 2.2 samples: routed at t = 875, CFG 4.0 / 3.0."""
    pipe = build_pipeline(teacher, compact_text_padding(high), compact_text_padding(low), with_text_encoder=False,
                          with_vae=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(rows), EVAL_BATCH):
        sl = slice(i, i + EVAL_BATCH)
        context, negative = emb.compact(rows[sl], with_negative=True)
        out.append(pipe(
            prompt_embeds=context, negative_prompt_embeds=negative, height=size * 8, width=size * 8, num_frames=1,
            num_inference_steps=steps, guidance_scale=GUIDANCE_HIGH, guidance_scale_2=GUIDANCE_LOW,
            generator=[torch.Generator().manual_seed(s) for s in seeds[sl]], output_type="latent",
        ).frames.float())  # fmt: skip
    return torch.cat(out)
