"""Options of `wanlite distill-steps`: one dataclass that is also the command line, the K-step schedule.

Torch-free like `options`, so that `wanlite --help` stays light; the flags reach
`python -m wanlite.distill.steps` under torchrun through `config_to_argv`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from wanlite.config import GUIDANCE_HIGH, GUIDANCE_LOW, SAMPLE_SHIFT, ConfigError
from wanlite.distill.options import _opt

SUPPORTED_STEPS = (1, 2, 4)
"""Sampling steps K a few-step student can be trained for."""

SCHEDULE_SHIFT = 5.0
"""Shift of the default K-step schedule: at K = 4 it gives Wan2.2-Lightning's timesteps 1000, 937.5, 833.3, 625."""

DEFAULT_EXPERIMENT = "wanlite-distill-steps"
REQUIRED = ("teacher", "student", "embeddings")


@dataclass
class StepsConfig:
    """Everything a few-step (DMD2) run depends on; every field is also a command-line flag."""

    teacher: str = _opt("teacher checkpoint (the real score: guided, expert-routed): directory or store URI")
    student: str = _opt("the student to turn into a K-step generator (save_pretrained folder or store URI, "
                        "e.g. the `wanlite distill` result's student_uri)")  # fmt: skip
    embeddings: str = _opt("prompt embeddings: store URI or directory (from `wanlite encode-prompts`)")
    critic: str | None = _opt("initial weights of the critic (fake score); must have the student's architecture "
                              "(default: the student)", default=None)  # fmt: skip
    image_size: int = _opt("image side in pixels the generator is trained at (latents are image_size / 8)",
                           default=1024)  # fmt: skip
    sample_steps: int = _opt(f"K, the generator's sampling steps: one of {', '.join(map(str, SUPPORTED_STEPS))}",
                             default=4)  # fmt: skip
    schedule_shift: float = _opt("shift of the K-step schedule sigma_k = shift(1 - k/K) (5: Lightning's timesteps)",
                                 default=SCHEDULE_SHIFT)  # fmt: skip
    sigmas: str | None = _opt("explicit K-step schedule instead: comma-separated decreasing sigmas, the first 1.0, "
                              "e.g. 1,0.9375,0.8333,0.625", default=None)  # fmt: skip
    out: str | None = _opt("store root for checkpoints and the final student (default: $WANLITE_STORE)", default=None)
    run_name: str | None = _opt("run name (default: steps<K> + a hash of the config, so a re-run resumes itself)",
                                default=None)  # fmt: skip
    steps: int = _opt("generator updates", default=1000)
    critic_updates: int = _opt("critic updates before each generator update (DMD2's two time-scale rule)", default=5)
    batch_size: int = _opt("GLOBAL batch size of every generator and critic update", default=8)
    lr: float = _opt("generator learning rate", default=1e-5)
    critic_lr: float = _opt("critic learning rate", default=1e-5)
    weight_decay: float = _opt("AdamW weight decay (generator and critic)", default=0.01)
    warmup_steps: int = _opt("linear LR warmup, in generator updates (the critic follows the same factor)",
                             default=0)  # fmt: skip
    min_lr_ratio: float = _opt("cosine decays to this fraction of the rates (1: constant)", default=1.0)
    grad_clip: float = _opt("clip each model's gradient norm to this (0: off)", default=1.0)
    ema_decay: float = _opt("EMA decay of the shipped generator weights (0: ship the raw weights)", default=0.99)
    shift: float = _opt("shift of the noise levels at which the scores are compared and the critic learns",
                        default=SAMPLE_SHIFT)  # fmt: skip
    guidance_high: float = _opt("CFG scale of the real score's high-noise expert", default=GUIDANCE_HIGH)
    guidance_low: float = _opt("CFG scale of the real score's low-noise expert", default=GUIDANCE_LOW)
    seed: int = _opt("seed of the prompt order and every noise draw", default=0)
    checkpoint_every: int = _opt("write a checkpoint every N generator updates (and at the end)", default=100)
    log_every: int = _opt("log metrics every N generator updates", default=10)
    grid_every: int = _opt("log a teacher-vs-generator image grid every N generator updates (0: never)", default=0)
    grid_prompts: int = _opt("images per grid row (the first prompts of the embedding set)", default=4)
    grid_teacher_steps: int = _opt("sampling steps of the teacher row of the grid", default=40)
    mlflow_uri: str | None = _opt("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a local SQLite file)",
                                  default=None)  # fmt: skip
    experiment: str = _opt("MLflow experiment name", default=DEFAULT_EXPERIMENT)
    resume: bool = _opt("continue the run from its latest complete checkpoint", default=False)
    staging_dir: str | None = _opt("node-local directory for checkpoint staging (a folder per run and launch is "
                                   "made in it; default: the system temp directory)", default=None)  # fmt: skip
    hsdp: bool | None = _opt("shard within a node and replicate across nodes (HSDP); --no-hsdp shards over every "
                             "rank (default: HSDP when the job spans more than one node)", default=None)  # fmt: skip
    progress: bool = _opt("show a progress bar on rank 0", default=True)


TRAJECTORY_FIELDS = (
    "teacher", "student", "critic", "image_size", "sample_steps", "steps", "critic_updates", "batch_size", "lr",
    "critic_lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "ema_decay", "shift", "guidance_high",
    "guidance_low", "seed",
)  # fmt: skip
"""Fields that change what the weights become (with the resolved `schedule`); a resume must agree on all."""


def schedule(cfg: StepsConfig) -> tuple[float, ...]:
    """The K sigmas the generator runs at, decreasing from 1 (the terminal 0 is implied).

    Default: uniform levels 1, 1 - 1/K, ... shifted like the teacher's sampler,
    `s u / (1 + (s - 1) u)`; at K = 4, s = 5 they are Lightning's 1, .9375,
    .8333, .625. Explicit `--sigmas` must count K, start at 1 (the generator
    starts from pure noise) and decrease inside (0, 1].
    """
    k = cfg.sample_steps
    if k not in SUPPORTED_STEPS:
        raise ConfigError(f"sample_steps: expected one of {', '.join(map(str, SUPPORTED_STEPS))}, found {k}")
    if cfg.sigmas is None:
        if not (math.isfinite(cfg.schedule_shift) and cfg.schedule_shift > 0):
            raise ConfigError(f"schedule_shift: expected a positive number, found {cfg.schedule_shift}")
        s = cfg.schedule_shift
        return tuple(s * u / (1 + (s - 1) * u) for u in (1 - i / k for i in range(k)))
    try:
        sigmas = tuple(float(x) for x in cfg.sigmas.split(","))
    except ValueError:
        raise ConfigError(f"sigmas: expected comma-separated numbers, found {cfg.sigmas!r}") from None
    if len(sigmas) != k:
        raise ConfigError(f"sigmas: expected {k} values for sample_steps {k}, found {len(sigmas)} in {cfg.sigmas!r}")
    if sigmas[0] != 1.0 or not all(0 < b < a for a, b in zip(sigmas, sigmas[1:])):
        raise ConfigError(f"sigmas: expected decreasing values in (0, 1] starting at 1.0, found {cfg.sigmas!r}")
    return sigmas


def validate(cfg: StepsConfig) -> tuple[float, ...]:
    """Config errors that need no file, raised before any model is loaded; returns the schedule."""
    sigmas = schedule(cfg)
    positive = ("image_size", "steps", "critic_updates", "batch_size", "checkpoint_every", "log_every",
                "grid_prompts", "grid_teacher_steps")  # fmt: skip
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}: expected a positive integer, found {getattr(cfg, name)}")
    if cfg.image_size % 16:
        raise ConfigError(f"image_size: expected a multiple of 16 (VAE 8 x patch 2), found {cfg.image_size}")
    if cfg.grid_every < 0 or cfg.warmup_steps < 0:
        raise ConfigError("grid_every, warmup_steps: expected values >= 0")
    if not 0 <= cfg.ema_decay < 1:
        raise ConfigError(f"ema_decay: expected a value in [0, 1), found {cfg.ema_decay}")
    for name in ("lr", "critic_lr", "shift"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name}: expected a positive number, found {getattr(cfg, name)}")
    return sigmas


def fingerprint(cfg: StepsConfig, world_size: int, embeddings_digest: str) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by this run (the schedule as the sigmas it resolves to)."""
    fp: dict[str, Any] = {name: getattr(cfg, name) for name in TRAJECTORY_FIELDS}
    fp.update(schedule=list(schedule(cfg)), world_size=world_size, embeddings=embeddings_digest)
    return fp


def default_run_name(cfg: StepsConfig, fp: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    return f"steps{cfg.sample_steps}-{digest}"
