"""Training options: one dataclass that is also the command line, and the run's identity.

Kept free of torch so that `wanlite --help` and the launcher stay light; the
same flags reach `python -m wanlite.distill.train` under torchrun through
`config_to_argv`, so the CLI, the launcher and the ranks cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from wanlite.config import GUIDANCE_HIGH, GUIDANCE_LOW, SAMPLE_SHIFT, ConfigError
from wanlite.sampling import Sampling, student_sampling

DEFAULT_EXPERIMENT = "wanlite-distill"


def _opt(help_text: str, **kw: Any) -> Any:
    return field(metadata={"help": help_text}, **kw)


@dataclass
class TrainConfig:
    """Everything a training run depends on; every field is also a command-line flag."""

    teacher: str = _opt("teacher checkpoint: directory or store URI, native or diffusers layout")
    data: str = _opt("teacher-data latents: store URI or directory (from `wanlite teacher-data`)")
    embeddings: str = _opt("prompt embeddings: store URI or directory (from `wanlite encode-prompts`)")
    init: str | None = _opt("student to start from (save_pretrained folder or URI, e.g. `wanlite project` output); "
                            "default: random init of --preset", default=None)  # fmt: skip
    preset: str = _opt("student preset when --init is not given", default="tiny")
    out: str | None = _opt("store root for checkpoints and the final student (default: $WANLITE_STORE)", default=None)
    run_name: str | None = _opt("run name (default: preset + a hash of the config, so a re-run resumes itself)",
                           default=None)  # fmt: skip
    steps: int = _opt("total optimizer steps", default=1000)
    batch_size: int = _opt("GLOBAL batch size (per-rank batch x world size)", default=8)
    lr: float = _opt("peak learning rate", default=1e-4)
    weight_decay: float = _opt("AdamW weight decay", default=0.01)
    warmup_steps: int = _opt("linear LR warmup steps", default=100)
    min_lr_ratio: float = _opt("cosine decays to this fraction of --lr", default=0.1)
    grad_clip: float = _opt("clip the global gradient norm to this (0: off)", default=1.0)
    ema_decay: float = _opt("EMA decay of the shipped weights (0: ship the raw weights)", default=0.999)
    shift: float = _opt("noise-level shift (the teacher samples with 12)", default=SAMPLE_SHIFT)
    guidance_high: float = _opt("CFG scale of the high-noise expert's targets", default=GUIDANCE_HIGH)
    guidance_low: float = _opt("CFG scale of the low-noise expert's targets", default=GUIDANCE_LOW)
    cfg: bool = _opt("fold classifier-free guidance into the student (guided teacher targets)", default=True)
    gt_weight: float = _opt("weight of the ground-truth flow term eps - x0 (e.g. 0.1); unguided targets only "
                            "(--no-cfg): eps - x0 is not a guided velocity", default=0.0)  # fmt: skip
    feature_weight: float = _opt("weight of the masked, normalised feature loss: each student block against the "
                                 "teacher block it was projected from, on the kept channels (needs --init from "
                                 "`wanlite project`)", default=0.0)  # fmt: skip
    feature_mask_k: float = _opt("feature loss ignores teacher activations beyond k std devs", default=4.0)
    grad_checkpointing: bool = _opt("recompute student blocks in backward (less memory)", default=False)
    seed: int = _opt("seed of init, data order and noise", default=0)
    checkpoint_every: int = _opt("write a checkpoint every N steps (and at the end)", default=500)
    log_every: int = _opt("log metrics every N steps", default=10)
    grid_every: int = _opt("log a teacher-vs-student image grid every N steps (0: never)", default=0)
    grid_prompts: int = _opt("images per grid row (the first prompts of the embedding set)", default=4)
    grid_steps: int = _opt("sampling steps of the grid images and of the shipped student's recorded "
                           "sampling settings (wanlite_sampling.json)", default=40)  # fmt: skip
    mlflow_uri: str | None = _opt("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a local SQLite file)",
                                  default=None)  # fmt: skip
    experiment: str = _opt("MLflow experiment name", default=DEFAULT_EXPERIMENT)
    resume: bool = _opt("continue the run from its latest complete checkpoint", default=False)
    staging_dir: str | None = _opt("node-local directory for checkpoint staging (a folder per run and launch is "
                                   "made in it; default: the system temp directory)", default=None)  # fmt: skip
    hsdp: bool | None = _opt("shard within a node and replicate across nodes (HSDP); --no-hsdp shards over every "
                             "rank (default: HSDP when the job spans more than one node)", default=None)  # fmt: skip
    peak_tflops: float | None = _opt("per-GPU peak bf16 TFLOP/s for MFU (default: known by device name)",
                                     default=None)  # fmt: skip
    progress: bool = _opt("show a progress bar on rank 0", default=True)


REQUIRED = ("teacher", "data", "embeddings")


def shipped_sampling(cfg: TrainConfig) -> Sampling:
    """How the student this run ships must be sampled: its grids use it and its folder records it.

    `--cfg` (guided targets) folds guidance in: guidance 1, no negative prompt.
    """
    return student_sampling(guided=cfg.cfg, steps=cfg.grid_steps, shift=cfg.shift)

TRAJECTORY_FIELDS = (
    "teacher", "init", "preset", "steps", "batch_size", "lr", "weight_decay", "warmup_steps", "min_lr_ratio",
    "grad_clip", "ema_decay", "shift", "guidance_high", "guidance_low", "cfg", "gt_weight", "feature_weight",
    "feature_mask_k", "seed",
)  # fmt: skip
"""Fields that change what the weights become; a checkpoint only resumes a run that agrees on all of them."""


# --- command line ----------------------------------------------------------------------


def add_arguments(
    parser: argparse.ArgumentParser, config_type: type = TrainConfig, required: tuple[str, ...] = REQUIRED
) -> None:
    """One flag per field of a config dataclass (`--batch-size`, `--no-cfg`, ...), help from the field."""
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        if f.name in required:
            parser.add_argument(flag, dest=f.name, required=True, help=f.metadata["help"])
        elif base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])  # fmt: skip
        else:
            parser.add_argument(flag, dest=f.name, type=base, default=f.default,
                                help=f"{f.metadata['help']} (default: {f.default})")  # fmt: skip


def config_from_args(args: argparse.Namespace, config_type: type = TrainConfig) -> Any:
    return config_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)})


def config_to_argv(cfg: Any) -> list[str]:
    """The flags that reproduce cfg (for launching `python -m wanlite.distill.train` under torchrun)."""
    argv = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif value is not None:
            argv += [flag, str(value)]
    return argv


# --- identity ----------------------------------------------------------------------------


def fingerprint(cfg: TrainConfig, world_size: int, data_digest: str, embeddings_digest: str) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by this run (inputs by content, not by path)."""
    fp = {name: getattr(cfg, name) for name in TRAJECTORY_FIELDS}
    fp.update(world_size=world_size, data=data_digest, embeddings=embeddings_digest)
    return fp


def default_run_name(cfg: TrainConfig, fp: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.preset}-{digest}"


def check_resumable(fp: dict[str, Any], recorded: dict[str, Any], where: str) -> None:
    """Refuse to resume from a checkpoint written by another config; name every field that differs."""
    differ = [k for k in sorted(set(fp) | set(recorded)) if fp.get(k) != recorded.get(k)]
    if differ:
        shown = "; ".join(f"{k}: checkpoint {recorded.get(k)!r}, now {fp.get(k)!r}" for k in differ)
        raise ConfigError(f"--resume: {where} was written by another config ({shown}); start a new --run-name instead")


def validate(cfg: TrainConfig) -> None:
    """Config errors that need no file: raised before any model is loaded."""
    for name in ("steps", "batch_size", "checkpoint_every", "log_every", "grid_prompts", "grid_steps"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}: expected a positive integer, found {getattr(cfg, name)}")
    if not 0 <= cfg.gt_weight <= 1:
        raise ConfigError(f"gt_weight: expected a value in [0, 1], found {cfg.gt_weight}")
    if cfg.gt_weight and cfg.cfg:
        raise ConfigError(
            f"gt_weight: {cfg.gt_weight} with guided targets (cfg): the ground-truth term eps - x0 is the "
            "unguided velocity and would pull a CFG-folded student off its objective; use gt_weight 0, or --no-cfg"
        )
    if cfg.feature_weight and not cfg.init:
        raise ConfigError(
            "feature_weight: expected --init, a projected student (its projection report says which teacher "
            "block and channels each student block came from), found a random init"
        )
    if cfg.feature_weight < 0 or cfg.grid_every < 0 or cfg.warmup_steps < 0:
        raise ConfigError("feature_weight, grid_every, warmup_steps: expected values >= 0")
    if not 0 <= cfg.ema_decay < 1:
        raise ConfigError(f"ema_decay: expected a value in [0, 1), found {cfg.ema_decay}")
    floats = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), float)}
    for name, value in floats.items():  # nan passes every comparison below: refuse it first
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, found {value}")
    for name in ("lr", "shift", "guidance_high", "guidance_low", "feature_mask_k"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}: expected a value > 0, found {getattr(cfg, name)}")
    if cfg.weight_decay < 0 or cfg.grad_clip < 0:
        raise ConfigError(f"weight_decay, grad_clip: expected values >= 0, found {cfg.weight_decay}, {cfg.grad_clip}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError(f"min_lr_ratio: expected a value in [0, 1], found {cfg.min_lr_ratio}")
    if cfg.peak_tflops is not None and cfg.peak_tflops <= 0:
        raise ConfigError(f"peak_tflops: expected a value > 0, found {cfg.peak_tflops}")
