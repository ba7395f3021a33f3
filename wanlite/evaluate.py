"""Evaluate a student against its teacher on held-out prompts: velocity error, samples, distance.

Three views, each answering a different question:

- velocity relative MSE, `sum ||v_s - v_t||^2 / sum ||v_t||^2`, on a fixed sigma
  grid, split by expert range (t >= 875: high-noise expert; below: low-noise).
  This is what distillation optimises, so it is the quality gate; 1.0 is what
  predicting zero velocity scores, so the default gate asks for better than that.
- student and teacher samples side by side from the same seeds (identical
  initial noise), decoded with the teacher's VAE: what a person looks at.
- the Fréchet distance between the distributions of latent pixel vectors
  (16-d, one per latent position) of student and teacher samples: a distribution
  distance that needs no pretrained feature network (none is reachable here).

x0 for the velocity grid is the teacher's own sample for that prompt and seed,
so the comparison happens on the data manifold the teacher generates.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wanlite import __version__
from wanlite.checkpoint.reader import TeacherReader
from wanlite.config import (
    EVAL_SEEDS,
    EVAL_SIGMAS,
    GUIDANCE_HIGH,
    GUIDANCE_LOW,
    NUM_TRAIN_TIMESTEPS,
    PRESETS,
    SAMPLE_STEPS,
    ConfigError,
)
from wanlite.distill.objective import Expert, add_noise, predict, routes_high, teacher_targets
from wanlite.export import dir_sha256, load_student, preset_for
from wanlite.pipeline import build_pipeline, decode_latents, load_vae, local_path
from wanlite.prompts import NEGATIVE_PROMPT, load_prompts

log = logging.getLogger(__name__)

DEFAULT_SIGMAS, DEFAULT_SEEDS = EVAL_SIGMAS, EVAL_SEEDS
REPORT_JSON, REPORT_MD, GRID_PNG = "evaluation.json", "evaluation.md", "grid.png"
PROMPT_ALIASES = {"held-out": "eval"}
"""`--prompts held-out` is the shipped evaluation set, disjoint from the training prompts."""


@dataclass
class RelMSE:
    """Running `sum ||pred - target||^2 / sum ||target||^2` over a range of samples."""

    err: float = 0.0
    ref: float = 0.0
    count: int = 0

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.err += (pred.double() - target.double()).pow(2).sum().item()
        self.ref += target.double().pow(2).sum().item()
        self.count += pred.shape[0]

    @property
    def value(self) -> float:
        return self.err / self.ref if self.ref > 0 else math.nan


@dataclass
class VelocityStats:
    """Relative MSE per expert range and per sigma."""

    high: RelMSE = field(default_factory=RelMSE)
    low: RelMSE = field(default_factory=RelMSE)
    per_sigma: dict[float, RelMSE] = field(default_factory=dict)


# --- Fréchet distance -------------------------------------------------------------------


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features, in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features: expected [N >= 2, D], found shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2).

    `||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1^1/2 cov2 cov1^1/2)^1/2)`.
    The symmetric form has the same trace as `sqrtm(cov1 @ cov2)` but is a PSD
    matrix, so an eigen-decomposition gives it stably (no complex parts, no
    blow-up on the singular covariances few samples produce).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}")
    root1 = _psd_sqrt(cov1)
    inner = root1 @ cov2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)
    return max(value, 0.0)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def latent_pixel_features(latents: torch.Tensor) -> np.ndarray:
    """[B, C, F, H, W] latents -> [B*F*H*W, C]: one C-dim vector per latent position."""
    return latents.float().movedim(1, -1).reshape(-1, latents.shape[1]).cpu().numpy()


# --- the step ----------------------------------------------------------------------------


def resolve_prompts(source: str | Path, limit: int | None = None) -> list[str]:
    prompts = load_prompts(PROMPT_ALIASES.get(str(source), source))
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"num_prompts: expected a positive number, found {limit}")
        prompts = prompts[:limit]
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ConfigError(f"prompts {source}: prompt {empty[0]} is empty")
    return prompts


def evaluate(
    student: str | Path,
    teacher: str | Path,
    *,
    out_dir: str | Path,
    prompts: str | Path = "held-out",
    num_prompts: int | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    steps: int = SAMPLE_STEPS,
    size: int | None = None,
    guided: bool = False,
    max_rel_mse: float = 1.0,
    device: str | None = None,
) -> dict[str, Any]:
    """Run the evaluation, write `evaluation.json`, `evaluation.md` and `grid.png`; return the report.

    `guided`: compare with the teacher's CFG-guided velocity (4.0 high / 3.0
    low, Wan's negative prompt), for students distilled with guidance folded
    in; they then sample without CFG. Otherwise both velocities are
    conditional and the student samples with CFG 3.0. `device` defaults to
    CUDA when available.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_grid(sigmas, seeds, steps, max_rel_mse)
    prompt_list = resolve_prompts(prompts, num_prompts)
    model, arch, student_dir = load_student(student)
    require_finite_weights(model, student_dir)
    preset = preset_for(arch)
    if size is None:
        size = preset.image_size if preset else PRESETS["lite-1024"].image_size
    if size <= 0 or size % 16:
        raise ConfigError(f"size: expected a positive multiple of 16 (VAE 8 x patch 2), found {size}")
    setup = _Setup.build(model, local_path(teacher), guided, device)
    with torch.no_grad():
        cond, uncond = setup.teacher_pipe.encode_prompt(
            prompt_list, [NEGATIVE_PROMPT] * len(prompt_list), do_classifier_free_guidance=True, max_sequence_length=512
        )
    stats, rows, teacher_latents, student_latents = VelocityStats(), [], [], []
    for i, prompt in enumerate(prompt_list):
        for seed in seeds:
            log.info("evaluate: prompt %d/%d, seed %d", i + 1, len(prompt_list), seed)
            t_lat, s_lat = setup.sample(cond[i : i + 1], uncond[i : i + 1], seed, size, steps)
            for who, latents in (("teacher", t_lat), ("student", s_lat)):
                if not torch.isfinite(latents).all():
                    raise EvaluationError(f"{who} sampled non-finite latents (NaN or inf) for prompt {i}, seed {seed}; "
                                          "no report written")  # fmt: skip
            negative = uncond[i : i + 1] if guided else None
            _velocity_grid(stats, model, setup.experts, t_lat, cond[i : i + 1], negative, sigmas, seed)
            teacher_latents.append(t_lat)
            student_latents.append(s_lat)
            rows.append((prompt, seed, decode_latents(setup.vae, t_lat)[0], decode_latents(setup.vae, s_lat)[0]))
    report = _report(
        stats, teacher_latents, student_latents, max_rel_mse,
        settings={
            "student": str(student), "student_sha256": dir_sha256(student_dir), "teacher": str(teacher),
            "teacher_fingerprint": setup.fingerprint, "prompts": prompt_list, "prompt_source": str(prompts),
            "seeds": list(seeds), "sigmas": list(sigmas), "steps": steps, "size": size, "guided": guided,
            "student_guidance": setup.student_cfg, "teacher_guidance": [GUIDANCE_HIGH, GUIDANCE_LOW],
        },
    )  # fmt: skip
    _write_outputs(report, rows, out_dir)
    return report


class EvaluationError(ValueError):
    """The models cannot be evaluated as given (non-finite weights or samples); the message names which."""


def require_finite_weights(model: Any, source: Path) -> None:
    """A student with NaN/inf weights has no meaningful score: refuse it, naming the tensors."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise EvaluationError(f"{source}: non-finite weights (NaN or inf) in {len(bad)} tensor(s): {shown}")


@dataclass
class _Setup:
    """Teacher experts, the two pipelines (sharing the teacher's VAE) and the guidance they use."""

    teacher_pipe: Any
    student_pipe: Any
    vae: Any
    experts: tuple[Expert, Expert]
    student_cfg: float
    fingerprint: str

    @classmethod
    def build(cls, student: Any, teacher_dir: Path, guided: bool, device: str) -> _Setup:
        reader = TeacherReader(teacher_dir)
        high = reader.load_expert("high_noise_model")
        low = reader.load_expert("low_noise_model")
        vae = load_vae(teacher_dir)
        teacher_pipe = build_pipeline(teacher_dir, high, low, vae=vae).to(device)
        student_pipe = build_pipeline(teacher_dir, student, with_text_encoder=False, vae=vae).to(device)
        for pipe in (teacher_pipe, student_pipe):
            pipe.set_progress_bar_config(disable=True)
        experts = (Expert(high, GUIDANCE_HIGH if guided else 1.0), Expert(low, GUIDANCE_LOW if guided else 1.0))
        return cls(teacher_pipe, student_pipe, vae, experts, 1.0 if guided else GUIDANCE_LOW, reader.fingerprint())

    def sample(
        self, cond: torch.Tensor, uncond: torch.Tensor, seed: int, size: int, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher and student latents [1, 16, 1, h, w] from the same initial noise (same seed)."""
        common = {
            "prompt_embeds": cond,
            "negative_prompt_embeds": uncond,
            "height": size,
            "width": size,
            "num_frames": 1,
            "num_inference_steps": steps,
            "output_type": "latent",
        }
        teacher = self.teacher_pipe(
            **common, guidance_scale=GUIDANCE_HIGH, guidance_scale_2=GUIDANCE_LOW, generator=_gen(seed)
        ).frames
        student = self.student_pipe(**common, guidance_scale=self.student_cfg, generator=_gen(seed)).frames
        return teacher.float(), student.float()


def _check_grid(sigmas: Sequence[float], seeds: Sequence[int], steps: int, max_rel_mse: float) -> None:
    if not sigmas or not all(0 < s <= 1 for s in sigmas):
        raise ConfigError(f"sigmas: expected values in (0, 1], found {list(sigmas)}")
    if not seeds:
        raise ConfigError("seeds: expected at least one seed, found none")
    if steps < 1:
        raise ConfigError(f"steps: expected a positive number, found {steps}")
    if not max_rel_mse > 0:
        raise ConfigError(f"max_rel_mse: expected a positive number, found {max_rel_mse}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def _velocity_grid(
    stats: VelocityStats,
    student: Any,
    experts: tuple[Expert, Expert],
    x0: torch.Tensor,
    context: torch.Tensor,
    negative: torch.Tensor | None,
    sigmas: Sequence[float],
    seed: int,
) -> None:
    """Student vs routed teacher velocity at every sigma, for one clean latent x0 [1, C, 1, h, w]."""
    k = len(sigmas)
    sigma = torch.tensor(sigmas, dtype=torch.float32)
    eps = torch.randn((k, *x0.shape[1:]), generator=_gen(10_000 + seed)).to(x0.device)
    x_t = add_noise(x0.expand(k, *x0.shape[1:]), eps, sigma.to(x0.device))
    t = sigma.to(x0.device) * NUM_TRAIN_TIMESTEPS
    ctx = context.expand(k, *context.shape[1:])
    neg = negative.expand(k, *negative.shape[1:]) if negative is not None else None
    is_high = routes_high(t)
    target = teacher_targets(
        *experts, x_t, t, ctx, neg, run_high=bool(is_high.any()), run_low=bool((~is_high).any())
    ).velocity
    pred = predict(student, x_t.to(student.dtype), t, ctx.to(student.dtype)).float()
    target, pred = target.cpu(), pred.cpu()
    for j, s in enumerate(sigmas):
        (stats.high if is_high[j] else stats.low).add(pred[j : j + 1], target[j : j + 1])
        stats.per_sigma.setdefault(float(s), RelMSE()).add(pred[j : j + 1], target[j : j + 1])


def _report(
    stats: VelocityStats,
    teacher_latents: list[torch.Tensor],
    student_latents: list[torch.Tensor],
    max_rel_mse: float,
    settings: dict[str, Any],
) -> dict[str, Any]:
    teacher_feats = latent_pixel_features(torch.cat(teacher_latents))
    student_feats = latent_pixel_features(torch.cat(student_latents))
    fd = frechet_distance(*gaussian_stats(student_feats), *gaussian_stats(teacher_feats))
    ranges = {name: r.value for name, r in (("high", stats.high), ("low", stats.low)) if r.count}
    metrics = {f"velocity_rel_mse_{name}": v for name, v in ranges.items()}
    metrics.update({f"velocity_rel_mse_sigma_{s:g}": r.value for s, r in sorted(stats.per_sigma.items())})
    metrics["frechet_latent"] = fd
    score = float(np.mean(list(ranges.values())))
    failures = [f"{k} = {v:.4g} > {max_rel_mse:g}" for k, v in metrics.items()
                if k in {f"velocity_rel_mse_{n}" for n in ranges} and not v <= max_rel_mse]  # fmt: skip
    failures += [f"{k} is not finite" for k, v in metrics.items() if not math.isfinite(v)]
    return {
        "kind": "evaluate",
        "passed": not failures,
        "gate": {"max_velocity_rel_mse": max_rel_mse, "failures": failures},
        "score": score,
        "score_definition": "mean velocity relative MSE over the expert ranges (lower is better)",
        "metrics": metrics,
        "grid": GRID_PNG,
        "num_samples": len(teacher_latents),
        **settings,
        "wanlite_version": __version__,
    }


# --- outputs -----------------------------------------------------------------------------


def image_grid(rows: Sequence[tuple[torch.Tensor, torch.Tensor]], pad: int = 2) -> Image.Image:
    """Rows of (teacher, student) images [3, H, W] in [0, 1], side by side on a white canvas."""
    _, h, w = rows[0][0].shape
    canvas = Image.new("RGB", (2 * w + 3 * pad, len(rows) * (h + pad) + pad), "white")
    for r, pair in enumerate(rows):
        for c, img in enumerate(pair):
            array = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(array), (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


def markdown_report(report: dict[str, Any]) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["gate"]["failures"])
    lines = [
        "# wanlite evaluation",
        "",
        f"Quality gate (velocity relative MSE <= {report['gate']['max_velocity_rel_mse']:g} per expert range): "
        f"**{verdict}**",
        "",
        f"Score (mean velocity rel. MSE, lower is better): **{report['score']:.4g}**",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.4g} |" for k, v in report["metrics"].items()),
        "",
        f"{len(report['prompts'])} held-out prompts x seeds {report['seeds']}, {report['steps']} steps, "
        f"{report['size']}x{report['size']}, sigma grid {report['sigmas']}, guided targets: {report['guided']}.",
        "",
        f"![teacher (left) vs student (right)]({report['grid']})",
        "",
        "Rows (teacher left, student right):",
        "",
        *(f"{i + 1}. seed {s}: {p}" for i, (p, s) in enumerate(_row_labels(report))),
        "",
    ]
    return "\n".join(lines)


def _row_labels(report: dict[str, Any]) -> list[tuple[str, int]]:
    return [(p, s) for p in report["prompts"] for s in report["seeds"]]


Rows = list[tuple[str, int, torch.Tensor, torch.Tensor]]
"""(prompt, seed, teacher image, student image) per sample."""


def _write_outputs(report: dict[str, Any], rows: Rows, out: str | Path) -> None:
    """Write the grid and the Markdown first and the JSON report last (readers trust the JSON)."""
    if "://" in str(out):
        from wanlite.storage import Store

        with tempfile.TemporaryDirectory(prefix="wanlite-eval-") as tmp:
            _write_local(report, rows, Path(tmp))
            Store.from_env(str(out)).put_dir(tmp, "", meta={"kind": "evaluate", "passed": report["passed"]})
        return
    _write_local(report, rows, Path(out))


def _write_local(report: dict[str, Any], rows: Rows, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    image_grid([(t, s) for _, _, t, s in rows]).save(out / GRID_PNG)
    (out / REPORT_MD).write_text(markdown_report(report))
    tmp = out / f".{REPORT_JSON}.partial"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / REPORT_JSON)
