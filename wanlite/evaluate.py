"""Evaluate a student against its teacher on held-out prompts: velocity error, samples, distance.

Three views, each answering a different question:

- velocity relative MSE, `sum ||v_s - v_t||^2 / sum ||v_t||^2`, on a fixed sigma
  grid, split by expert range (t >= 875: high-noise expert; below: low-noise).
  This is what distillation optimises, so it is the quality gate. A constant
  threshold would be met by a dead model (predicting zero scores exactly 1.0),
  so the gate is a margin against trivial baselines scored on the same grid:
  the zero predictor, and the run's own starting point (the projected init)
  when it is given. A student must beat each by `margin` in every range.
- student and teacher samples side by side from the same seeds (identical
  initial noise), decoded with the teacher's VAE: what a person looks at.
- the Fréchet distance between the distributions of latent pixel vectors
  (16-d, one per latent position) of student and teacher samples: a distribution
  distance that needs no pretrained feature network. FID and CLIP score on the
  decoded images are added when torchmetrics and their weights are present
  locally; otherwise the report says "not computed" and why.

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
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wanlite import __version__
from wanlite.checkpoint.reader import TeacherReader
from wanlite.config import (
    EVAL_MARGIN,
    EVAL_SEEDS,
    EVAL_SIGMAS,
    EXPERTS,
    GUIDANCE_HIGH,
    GUIDANCE_LOW,
    NUM_TRAIN_TIMESTEPS,
    PRESETS,
    SAMPLE_STEPS,
    ConfigError,
    WanArch,
)
from wanlite.distill.encode import encode
from wanlite.distill.objective import Expert, add_noise, predict, routes_high, teacher_targets
from wanlite.export import dir_sha256, load_student, preset_for
from wanlite.pipeline import (
    build_pipeline,
    decode_latents,
    load_text_encoder,
    load_tokenizer,
    load_vae,
    local_path,
    pad_embeddings,
)
from wanlite.placement import TEXT_BATCH, OneResident, Placement, device_memory, encode_bytes, placement_for
from wanlite.prompts import NEGATIVE_PROMPT, iter_prompts
from wanlite.sampling import Sampling, load_sampling, student_sampling

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
    """The evaluation's prompts: the first `limit` of the set (only those are read) or all of it."""
    if limit is not None and limit < 1:
        raise ConfigError(f"num_prompts: expected a positive number, found {limit}")
    prompts = list(islice(iter_prompts(PROMPT_ALIASES.get(str(source), source)), limit))
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ConfigError(f"prompts {source}: prompt {empty[0]} is empty")
    return prompts


class EvaluationError(ConfigError):
    """An evaluation that cannot give a trustworthy verdict; the message names what and why."""


def prompt_embeddings(
    teacher_dir: Path, prompts: Sequence[str], placement: Placement
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Padded T5 embeddings [n, 512, D] of the prompts and of Wan's negative prompt, in host memory.

    T5 is loaded for this call only, in the placement's precision, and gone
    when it returns, so it never shares the device with a transformer. The
    third value is the encode phase's computed device bytes. Tokenisation and
    padding are `WanPipeline.encode_prompt`'s (`distill.encode.encode`).
    """
    tokenizer = load_tokenizer(teacher_dir)
    text_encoder = load_text_encoder(teacher_dir, dtype=placement.text_dtype, device=placement.device)
    trimmed = [e for start in range(0, len(prompts), TEXT_BATCH)
               for e in encode(tokenizer, text_encoder, prompts[start : start + TEXT_BATCH])]  # fmt: skip
    negative = encode(tokenizer, text_encoder, [NEGATIVE_PROMPT])[0]
    memory = encode_bytes(text_encoder, min(TEXT_BATCH, len(prompts)))
    del text_encoder
    if placement.device.type == "cuda":
        torch.cuda.empty_cache()  # hand T5's blocks back before the experts arrive
    return pad_embeddings(trimmed), pad_embeddings([negative]).expand(len(prompts), -1, -1), memory


def evaluate(
    student: str | Path,
    teacher: str | Path,
    *,
    out_dir: str | Path,
    prompts: str | Path = "held-out",
    num_prompts: int | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    steps: int | None = None,
    size: int | None = None,
    guided: bool | None = None,
    baseline: str | Path | None = None,
    margin: float = EVAL_MARGIN,
    device: str | None = None,
) -> dict[str, Any]:
    """Run the evaluation, write `evaluation.json`, `evaluation.md` and `grid.png`; return the report.

    The student samples with its recorded settings (`wanlite_sampling.json`);
    `steps` sets the teacher's steps (default: the student's) and overrides
    the student's unless it has explicit sigmas; `guided` overrides whether
    its guidance is folded in. `guided`: compare with the teacher's
    CFG-guided velocity (4.0 high / 3.0 low, Wan's negative prompt), for
    students distilled with guidance folded in (the default when the record
    says guidance 1); they then sample without CFG. Otherwise both velocities
    are conditional and the student samples with CFG 3.0. The report lists
    every setting that was not the model's. `baseline`: the run's starting
    point (the projected init), scored on the same grid; the gate asks the
    student to beat it and the zero predictor by `margin` (a fraction of the
    baseline's error) in every expert range. `device` defaults to CUDA when
    available; where the models live on it is `placement.placement_for`'s
    choice (on CUDA: bf16 experts, one at a time), named in the report with
    its computed peak device memory.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_grid(sigmas, seeds, steps if steps is not None else SAMPLE_STEPS, margin)
    prompt_list = resolve_prompts(prompts, num_prompts)
    model, arch, student_dir = load_student(student)
    sampling, guided, notes = evaluation_sampling(load_sampling(student_dir), str(student), steps, guided)
    steps = steps if steps is not None else sampling.steps
    require_finite_weights(model, student_dir)
    preset = preset_for(arch)
    if size is None:
        size = preset.image_size if preset else PRESETS["lite-1024"].image_size
    if size <= 0 or size % 16:
        raise ConfigError(f"size: expected a positive multiple of 16 (VAE 8 x patch 2), found {size}")
    teacher_dir = local_path(teacher)
    teacher_arch = TeacherReader(teacher_dir).arch
    check_pairing(arch, teacher_arch, f"student {student}")
    predictors: dict[str, Any] = {STUDENT: model, ZERO: None}
    if baseline is not None:
        init, init_arch, _ = load_student(baseline)
        check_pairing(init_arch, teacher_arch, f"baseline {baseline}")
        predictors[INIT] = init
    placement = placement_for(device)
    cond, uncond, encode_memory = prompt_embeddings(teacher_dir, prompt_list, placement)
    setup = _Setup.build(model, teacher_dir, guided, placement, sampling)
    memory = device_memory(
        placement, encode=encode_memory, expert=setup.experts[0].model, vae=setup.vae, size=size,
        predictors=[m for m in predictors.values() if m is not None], num_sigmas=len(sigmas),
    )  # fmt: skip
    log.info("evaluate: %s; computed peak device memory %.1f GB", placement.describe(), memory.peak / 1e9)
    stats = {name: VelocityStats() for name in predictors}
    rows, teacher_latents, student_latents = [], [], []
    for i, prompt in enumerate(prompt_list):
        for seed in seeds:
            log.info("evaluate: prompt %d/%d, seed %d", i + 1, len(prompt_list), seed)
            context, negative = cond[i : i + 1].to(device), uncond[i : i + 1].to(device)
            t_lat, s_lat = setup.sample(context, negative, seed, size, steps, sampling.steps)
            for who, latents in (("teacher", t_lat), ("student", s_lat)):
                if not torch.isfinite(latents).all():
                    raise EvaluationError(f"{who} sampled non-finite latents (NaN or inf) for prompt {i}, seed {seed}; "
                                          "no report written")  # fmt: skip
            _velocity_grid(stats, predictors, setup.experts, t_lat, context, negative if guided else None, sigmas, seed,
                           placement)  # fmt: skip
            teacher_latents.append(t_lat)
            student_latents.append(s_lat)
            rows.append((prompt, seed, decode_latents(setup.vae, t_lat)[0], decode_latents(setup.vae, s_lat)[0]))
    settings = {
        "student": str(student), "student_sha256": dir_sha256(student_dir), "teacher": str(teacher),
        "teacher_fingerprint": setup.fingerprint, "prompts": prompt_list, "prompt_source": str(prompts),
        "seeds": list(seeds), "sigmas": list(sigmas), "steps": steps, "size": size, "guided": guided,
        "student_guidance": setup.student_cfg, "teacher_guidance": [GUIDANCE_HIGH, GUIDANCE_LOW],
        "sampling": sampling.to_dict(), "sampling_notes": notes,
        "baseline": None if baseline is None else str(baseline),
        "placement": {"description": placement.describe(), "computed_device_bytes": memory.to_dict()},
        "precision": str(placement.expert_dtype).removeprefix("torch."),  # bf16 (GPU) and fp32 scores differ
    }  # fmt: skip
    quality = sample_quality(teacher_latents, student_latents, rows, device)
    report = _report(stats, quality, margin, settings)
    _write_outputs(report, rows, out_dir)
    return report


def evaluation_sampling(
    recorded: Sampling | None, source: str, steps: int | None, guided: bool | None
) -> tuple[Sampling, bool, list[str]]:
    """The student's sampling for the evaluation, whether its targets are guided, and notes on overrides.

    Without a record (a student written before records existed) the old
    defaults apply: conditional targets, CFG 3.0, and the notes say so.
    """
    notes = []
    if recorded is None:
        recorded = student_sampling(guided=bool(guided), steps=steps or SAMPLE_STEPS)
        notes.append(f"{source} records no sampling settings; assumed {recorded.to_json()}")
    folded = recorded.guidance == 1.0
    guided = folded if guided is None else guided
    wanted = student_sampling(guided=guided, steps=recorded.steps, shift=recorded.shift)
    # A schedule of explicit sigmas (a few-step student) keeps its own steps; `steps` then sets the teacher's only.
    sampling, changed = recorded.overridden(
        steps=steps if recorded.sigmas is None else None, guidance=None if guided == folded else wanted.guidance,
        negative_prompt=None if guided == folded else wanted.negative_prompt,
    )  # fmt: skip
    return sampling, guided, notes + [f"overridden {c}" for c in changed]


STUDENT, ZERO, INIT = "student", "zero", "init"
"""Predictors scored on the grid: the student, and the baselines it must beat."""

PAIRED_FIELDS = ("in_dim", "out_dim", "text_dim", "freq_dim", "patch_size")
"""What a student must share with its teacher to be compared on the same inputs."""


def check_pairing(student: WanArch, teacher: WanArch, source: str) -> None:
    """Raise naming every field where the student cannot take the teacher's inputs and targets."""
    problems = [
        f"{name}: expected the teacher's {getattr(teacher, name)}, found {getattr(student, name)}"
        for name in PAIRED_FIELDS
        if getattr(student, name) != getattr(teacher, name)
    ]
    if problems:
        raise EvaluationError(f"{source} does not fit the teacher: " + "; ".join(problems))


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
    def build(cls, student: Any, teacher_dir: Path, guided: bool, placement: Placement, sampling: Sampling) -> _Setup:
        """The experts go where `placement` says (one at a time: built in host memory, brought in on call)."""
        reader = TeacherReader(teacher_dir)
        home = "cpu" if placement.one_expert else placement.device
        high, low = (reader.device_expert(name, dtype=placement.expert_dtype, device=home) for name in EXPERTS)
        if placement.one_expert:
            OneResident([high, low], placement.device)
        vae = load_vae(teacher_dir).to(placement.device)
        teacher_pipe = build_pipeline(teacher_dir, high, low, with_text_encoder=False, vae=vae)
        student_pipe = build_pipeline(teacher_dir, student, with_text_encoder=False, vae=vae,
                                      sampling=sampling).to(placement.device)  # fmt: skip
        for pipe in (teacher_pipe, student_pipe):
            pipe.set_progress_bar_config(disable=True)
        experts = (Expert(high, GUIDANCE_HIGH if guided else 1.0), Expert(low, GUIDANCE_LOW if guided else 1.0))
        return cls(teacher_pipe, student_pipe, vae, experts, sampling.guidance, reader.fingerprint())

    def sample(
        self, cond: torch.Tensor, uncond: torch.Tensor, seed: int, size: int, steps: int, student_steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher and student latents [1, 16, 1, h, w] from the same initial noise (same seed)."""
        common = {
            "prompt_embeds": cond,
            "negative_prompt_embeds": uncond,
            "height": size,
            "width": size,
            "num_frames": 1,
            "output_type": "latent",
        }
        teacher = self.teacher_pipe(
            **common, num_inference_steps=steps, guidance_scale=GUIDANCE_HIGH, guidance_scale_2=GUIDANCE_LOW,
            generator=_gen(seed),
        ).frames  # fmt: skip
        student = self.student_pipe(
            **common, num_inference_steps=student_steps, guidance_scale=self.student_cfg, generator=_gen(seed)
        ).frames
        return teacher.float(), student.float()


def _check_grid(sigmas: Sequence[float], seeds: Sequence[int], steps: int, margin: float) -> None:
    if not sigmas or not all(0 < s <= 1 for s in sigmas):
        raise ConfigError(f"sigmas: expected values in (0, 1], found {list(sigmas)}")
    if not seeds:
        raise ConfigError("seeds: expected at least one seed, found none")
    if steps < 1:
        raise ConfigError(f"steps: expected a positive number, found {steps}")
    if not (math.isfinite(margin) and margin < 1):
        raise ConfigError(f"margin: expected a number below 1 (a fraction of the baseline's error), found {margin}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def _velocity_grid(
    stats: dict[str, VelocityStats],
    predictors: dict[str, Any],
    experts: tuple[Expert, Expert],
    x0: torch.Tensor,
    context: torch.Tensor,
    negative: torch.Tensor | None,
    sigmas: Sequence[float],
    seed: int,
    placement: Placement,
) -> None:
    """Every predictor vs the routed teacher velocity at every sigma, for one clean latent x0 [1, C, 1, h, w].

    A predictor of None is the zero predictor.
    """
    k = len(sigmas)
    sigma = torch.tensor(sigmas, dtype=torch.float32)
    eps = torch.randn((k, *x0.shape[1:]), generator=_gen(10_000 + seed)).to(x0.device)
    x_t = add_noise(x0.expand(k, *x0.shape[1:]), eps, sigma.to(x0.device))
    t = sigma.to(x0.device) * NUM_TRAIN_TIMESTEPS
    ctx = context.expand(k, *context.shape[1:])
    neg = negative.expand(k, *negative.shape[1:]) if negative is not None else None
    is_high = routes_high(t)
    with placement.teacher_autocast():
        target = teacher_targets(
            *experts, x_t, t, ctx, neg, run_high=bool(is_high.any()), run_low=bool((~is_high).any())
        ).velocity.cpu()
    for name, model in predictors.items():
        if model is None:
            pred = torch.zeros_like(target)
        else:
            model.to(x_t.device)
            pred = predict(model, x_t.to(model.dtype), t, ctx.to(model.dtype)).float().cpu()
        for j, s in enumerate(sigmas):
            (stats[name].high if is_high[j] else stats[name].low).add(pred[j : j + 1], target[j : j + 1])
            stats[name].per_sigma.setdefault(float(s), RelMSE()).add(pred[j : j + 1], target[j : j + 1])


def _ranges(stats: VelocityStats) -> dict[str, float]:
    return {name: r.value for name, r in (("high", stats.high), ("low", stats.low)) if r.count}


def gate_failures(stats: dict[str, VelocityStats], margin: float) -> list[str]:
    """Every (range, baseline) where the student is not `margin` below the baseline's rel. MSE."""
    student = _ranges(stats[STUDENT])
    failures = []
    for name in (n for n in stats if n != STUDENT):
        for r, base in _ranges(stats[name]).items():
            bound = (1 - margin) * base
            if not student[r] <= bound:
                failures.append(
                    f"velocity_rel_mse_{r} = {student[r]:.4g}: not {margin:.0%} below the {name} predictor's "
                    f"{base:.4g} (needs <= {bound:.4g})"
                )
    return failures


def _report(
    stats: dict[str, VelocityStats], quality: dict[str, Any], margin: float, settings: dict[str, Any]
) -> dict[str, Any]:
    ranges = _ranges(stats[STUDENT])
    metrics = {f"velocity_rel_mse_{name}": v for name, v in ranges.items()}
    metrics.update({f"velocity_rel_mse_sigma_{s:g}": r.value for s, r in sorted(stats[STUDENT].per_sigma.items())})
    metrics["frechet_latent"] = quality["frechet_latent"]
    metrics.update({k: v["value"] for k, v in quality.items() if isinstance(v, dict) and "value" in v})
    baselines = {
        name: {f"velocity_rel_mse_{r}": v for r, v in _ranges(s).items()}
        for name, s in stats.items()
        if name != STUDENT
    }
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    bad += [f"{b}.{k}" for b, m in baselines.items() for k, v in m.items() if not math.isfinite(v)]
    if bad:
        raise EvaluationError(
            f"evaluation of {settings['student']}: expected finite metrics, found non-finite {', '.join(bad)} "
            "(a diverged student or a teacher with zero velocity on the grid); no report written"
        )
    failures = gate_failures(stats, margin)
    return {
        "kind": "evaluate",
        "passed": not failures,
        "gate": {
            "rule": f"velocity rel. MSE at least {margin:.0%} below every baseline's, in every expert range",
            "margin": margin,
            "baselines": baselines,
            "failures": failures,
        },
        "score": float(np.mean(list(ranges.values()))),
        "score_definition": "mean velocity relative MSE over the expert ranges (lower is better)",
        "metrics": metrics,
        "sample_quality": {k: v for k, v in quality.items() if k != "frechet_latent"},
        "grid": GRID_PNG,
        "num_samples": len(settings["prompts"]) * len(settings["seeds"]),
        **settings,
        "wanlite_version": __version__,
    }


# --- sample-space quality ----------------------------------------------------------------

CLIP_MODEL = "openai/clip-vit-base-patch16"
"""CLIP score backbone, looked up in the local Hugging Face cache only."""


def sample_quality(
    teacher_latents: list[torch.Tensor], student_latents: list[torch.Tensor], rows: Rows, device: str
) -> dict[str, Any]:
    """Fréchet distance of latent pixels, plus FID and CLIP score on the decoded images when computable.

    FID and CLIP need pretrained networks; they are computed only from weights
    already on this machine (nothing is downloaded). Otherwise the entry is
    `{"not_computed": why}`: never a figure from another network.
    """
    teacher, student = torch.cat(teacher_latents), torch.cat(student_latents)
    for name, lat in (("teacher", teacher), ("student", student)):
        if not torch.isfinite(lat).all():
            raise EvaluationError(f"{name} samples: expected finite latents, found NaN/inf (a diverged model?)")
    fd = frechet_distance(
        *gaussian_stats(latent_pixel_features(student)), *gaussian_stats(latent_pixel_features(teacher))
    )
    t_img = torch.stack([t for _, _, t, _ in rows]).clamp(0, 1)
    s_img = torch.stack([s for _, _, _, s in rows]).clamp(0, 1)
    return {
        "frechet_latent": fd,
        "fid": _fid(t_img, s_img, device),
        "clip_score": _clip_score(s_img, [p for p, _, _, _ in rows], device),
    }


def _fid(teacher: torch.Tensor, student: torch.Tensor, device: str) -> dict[str, Any]:
    """FID (student vs teacher images) with torchmetrics' Inception, from locally cached weights only."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as err:
        return {"not_computed": f"torchmetrics' FID is not importable ({err}); install torchmetrics[image]"}
    if teacher.shape[0] < 2:
        return {"not_computed": f"FID needs at least 2 images per side, found {teacher.shape[0]}"}
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob("*inception-2015-12-05*")):
        return {"not_computed": f"Inception weights (inception-2015-12-05) are not in {hub}; nothing is downloaded"}
    fid = FrechetInceptionDistance(normalize=True).to(device)
    fid.update(teacher.to(device), real=True)
    fid.update(student.to(device), real=False)
    return {"value": float(fid.compute()), "images": int(teacher.shape[0])}


def _clip_score(images: torch.Tensor, prompts: list[str], device: str) -> dict[str, Any]:
    """Mean CLIP score of the student's images against their prompts, from a locally cached CLIP only."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from torchmetrics.multimodal.clip_score import CLIPScore
    except ImportError as err:
        return {"not_computed": f"torchmetrics' CLIP score is not importable ({err}); install torchmetrics[multimodal]"}
    if not isinstance(try_to_load_from_cache(CLIP_MODEL, "config.json"), str):
        return {"not_computed": f"{CLIP_MODEL} is not in the local Hugging Face cache; nothing is downloaded"}
    metric = CLIPScore(model_name_or_path=CLIP_MODEL).to(device)
    return {"value": float(metric((images * 255).to(torch.uint8).to(device), prompts)), "model": CLIP_MODEL}


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


def markdown_report(report: dict[str, Any], grid_uri: str | None = None) -> str:
    """The report for people. `grid_uri`: where the grid is stored, named as a link instead of embedded.

    Beside `evaluation.md` the grid is embedded by its relative name; a copy of
    the report shown elsewhere (a Prefect artifact) cannot resolve that name, so
    it names the stored grid instead.
    """
    gate = report["gate"]
    verdict = "PASSED" if report["passed"] else "FAILED: " + "; ".join(gate["failures"])
    rows = {"student": report["metrics"], **{f"{name} predictor": m for name, m in gate["baselines"].items()}}
    table = [
        f"| {name} | " + " | ".join(f"{m.get(f'velocity_rel_mse_{r}', math.nan):.4g}" for r in ("high", "low")) + " |"
        for name, m in rows.items()
    ]
    quality = [
        f"- {name}: " + (f"{v['value']:.4g}" if "value" in v else f"not computed ({v['not_computed']})")
        for name, v in report.get("sample_quality", {}).items()
    ]
    lines = [
        "# wanlite evaluation",
        "",
        f"Quality gate ({gate['rule']}): **{verdict}**",
        "",
        "| predictor | velocity rel. MSE, high-noise range | low-noise range |",
        "|---|---|---|",
        *table,
        "",
        f"Score (mean velocity rel. MSE, lower is better): **{report['score']:.4g}**",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.4g} |" for k, v in report["metrics"].items()),
        "",
        "Sample-space quality on the decoded images:",
        "",
        *quality,
        "",
        f"{len(report['prompts'])} held-out prompts x seeds {report['seeds']}, {report['steps']} steps, "
        f"{report['size']}x{report['size']}, sigma grid {report['sigmas']}, guided targets: {report['guided']}.",
        "",
        f"Placement: {report['placement']['description']}; computed peak device memory "
        f"{report['placement']['computed_device_bytes']['peak'] / 1e9:.1f} GB.",
        "",
        f"![teacher (left) vs student (right)]({report['grid']})" if grid_uri is None
        else f"Image grid, teacher (left) vs student (right): `{grid_uri}`",
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
