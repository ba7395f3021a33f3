"""Wan transformer architectures, presets, and validation of user-supplied configs.

One dataclass, `WanArch`, describes a Wan 2.x text-to-video transformer in the
native `WanModel` vocabulary (dim, ffn_dim, num_heads, ...). Everything else
converts to and from it: the native `config.json`, diffusers'
`WanTransformer3DModel` config, and the seed project's student vocabulary.
Keeping one source of truth means the synthesiser, the validator, the
projection and the exporter cannot disagree about what a shape should be.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from easydict import EasyDict

HEAD_DIM = 128
"""ComfyUI hard-codes head_dim 128 (num_heads = dim // 128); RoPE splits it 44/42/42."""

BOUNDARY_RATIO = 0.875
"""Wan 2.2 A14B: timesteps t >= 875 go to the high-noise expert."""

NUM_TRAIN_TIMESTEPS = 1000
SAMPLE_SHIFT = 12.0
SAMPLE_STEPS = 40
GUIDANCE_HIGH = 4.0
GUIDANCE_LOW = 3.0
EXPERTS = ("high_noise_model", "low_noise_model")

T2V_A14B = EasyDict(
    __name__="Config: Wan T2V A14B (sampling)",
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    boundary=BOUNDARY_RATIO,
    sample_shift=SAMPLE_SHIFT,
    sample_steps=SAMPLE_STEPS,
    sample_solver="unipc",
    sample_guide_scale=(GUIDANCE_LOW, GUIDANCE_HIGH),
    low_noise_checkpoint=EXPERTS[1],
    high_noise_checkpoint=EXPERTS[0],
)
"""The teacher's sampler settings under the names of the official `wan/configs/wan_t2v_A14B.py`
(`t2v_A14B`), so readers of Wan's code recognise them; `sample_guide_scale` is (low-noise, high-noise)."""

# Vocabulary the command line shows in --help; kept here, import-light, so that
# `wanlite --help` never loads torch or diffusers.
TEACHER_SIZES = ("tiny", "a14b")
EXPORT_DTYPES = ("bf16", "fp16", "fp32")
"""dtypes ComfyUI's Wan 2.1 T2V model runs in (it also offers fp8 at load time)."""
EVAL_SIGMAS = (0.95, 0.9, 0.8, 0.6, 0.4, 0.2)
"""Fixed evaluation noise levels: t = 950, 900 on the high-noise expert; 800..200 on the low-noise one."""
EVAL_SEEDS = (0, 1)
EVAL_MARGIN = 0.1
"""Evaluation gate: the student's velocity rel. MSE must be 10 % below every trivial baseline's, per expert range."""
CANDIDATE, CHAMPION = "candidate", "champion"
"""MLflow registry aliases: every registered version is a candidate; the best evaluated one is champion."""


class ConfigError(ValueError):
    """A config that cannot describe a valid model. The message names the field."""


@dataclass(frozen=True)
class WanArch:
    """Shape of a Wan T2V transformer, in native `WanModel` terms."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: expected a positive integer, found {value!r}")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim: {self.dim} is not divisible by num_heads={self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

    def num_params(self) -> int:
        """Parameter count of the native WanModel state dict (checked against real models)."""
        d, f, L = self.dim, self.ffn_dim, self.num_layers
        attn = 4 * (d * d + d) + 2 * d  # q,k,v,o + norm_q, norm_k
        block = 2 * attn + 2 * d + (f * d + f) + (d * f + d) + 6 * d  # self, cross, norm3, ffn, modulation
        embed = d * self.in_dim * self.patch_volume + d
        embed += (d * self.text_dim + d) + (d * d + d)  # text_embedding
        embed += (d * self.freq_dim + d) + (d * d + d)  # time_embedding
        embed += 6 * d * d + 6 * d  # time_projection
        head = 2 * d + (self.out_dim * self.patch_volume * d + self.out_dim * self.patch_volume)
        return embed + L * block + head

    # --- native WanModel config.json -------------------------------------------------
    def native_config(self) -> dict[str, Any]:
        """`config.json` exactly as the official Wan 2.2 checkpoint writes it."""
        return {
            "_class_name": "WanModel",
            "_diffusers_version": "0.33.0",
            "dim": self.dim,
            "eps": self.eps,
            "ffn_dim": self.ffn_dim,
            "freq_dim": self.freq_dim,
            "in_dim": self.in_dim,
            "model_type": "t2v",
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "out_dim": self.out_dim,
            "text_len": self.text_len,
        }

    @classmethod
    def from_native_config(cls, cfg: dict[str, Any], source: str = "config") -> WanArch:
        """Read a native `WanModel` config; `source` names the file in errors."""
        if cfg.get("_class_name") != "WanModel":
            raise ConfigError(f"{source}: _class_name: expected 'WanModel', found {cfg.get('_class_name')!r}")
        if cfg.get("model_type", "t2v") != "t2v":
            raise ConfigError(f"{source}: model_type: expected 't2v', found {cfg.get('model_type')!r}")
        required = ("dim", "ffn_dim", "num_heads", "num_layers")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            return cls(
                dim=cfg["dim"],
                ffn_dim=cfg["ffn_dim"],
                num_heads=cfg["num_heads"],
                num_layers=cfg["num_layers"],
                in_dim=cfg.get("in_dim", 16),
                out_dim=cfg.get("out_dim", 16),
                freq_dim=cfg.get("freq_dim", 256),
                text_len=cfg.get("text_len", 512),
                eps=cfg.get("eps", 1e-6),
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    # --- diffusers WanTransformer3DModel config ----------------------------------------
    def diffusers_config(self) -> dict[str, Any]:
        """Kwargs for `WanTransformer3DModel.from_config` (never the decorated __init__)."""
        return {
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_dim,
            "out_channels": self.out_dim,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": self.eps,
            "image_dim": None,
            "added_kv_proj_dim": None,
            "rope_max_seq_len": 1024,
            "pos_embed_seq_len": None,
        }

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any], source: str = "config") -> WanArch:
        """Read a diffusers `WanTransformer3DModel` config; `source` names the file in errors."""
        required = ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        for key, expected in (("image_dim", None), ("added_kv_proj_dim", None)):
            if cfg.get(key) != expected:
                raise ConfigError(f"{source}: {key}: expected {expected!r} for a T2V model, found {cfg.get(key)!r}")
        try:
            return cls(
                dim=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                ffn_dim=cfg["ffn_dim"],
                num_heads=cfg["num_attention_heads"],
                num_layers=cfg["num_layers"],
                in_dim=cfg.get("in_channels", 16),
                out_dim=cfg.get("out_channels", 16),
                text_dim=cfg.get("text_dim", 4096),
                freq_dim=cfg.get("freq_dim", 256),
                eps=cfg.get("eps", 1e-6),
                patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def replace(self, **changes: Any) -> WanArch:
        return dataclasses.replace(self, **changes)


# --- the teacher ---------------------------------------------------------------------

A14B = WanArch(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
"""One expert of Wan 2.2 T2V-A14B (14.29B parameters)."""

TINY_TEACHER = WanArch(dim=256, ffn_dim=640, num_heads=2, num_layers=4)
"""CI/demo teacher: real head_dim 128, real text_dim 4096, ~4.5M params per expert."""


# --- student presets -----------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named student size with the image size it is trained and exported for."""

    name: str
    arch: WanArch
    image_size: int
    teacher: WanArch

    @property
    def export_name(self) -> str:
        return f"wanlite-{self.name.removeprefix('lite-')}.safetensors"


# lite-1024 FFN: the teacher's ratio is 13824 / 5120 = 2.7; 2.7 x 1024 = 2765, rounded
# up to a multiple of 128 (tensor-core tile) gives 2816. Keeping the teacher's ratio
# lets FFN-neuron selection keep the same fraction of neurons as of channels.
PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", WanArch(dim=128, ffn_dim=256, num_heads=1, num_layers=2), 64, TINY_TEACHER),
    "lite-1024": Preset("lite-1024", WanArch(dim=1024, ffn_dim=2816, num_heads=8, num_layers=16), 1024, A14B),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def validate_student(arch: WanArch, source: str = "student config") -> WanArch:
    """Enforce what ComfyUI and the Wan RoPE need of a student; raise naming the field."""
    problems = []
    if arch.dim % HEAD_DIM:
        problems.append(f"dim: {arch.dim} is not a multiple of {HEAD_DIM} (ComfyUI fixes head_dim at {HEAD_DIM})")
    elif arch.num_heads != arch.dim // HEAD_DIM:
        problems.append(
            f"num_heads: expected dim/{HEAD_DIM} = {arch.dim // HEAD_DIM}, found {arch.num_heads} "
            f"(head_dim {arch.head_dim}; ComfyUI would silently run {arch.dim // HEAD_DIM} heads)"
        )
    for name, expected in (("in_dim", 16), ("out_dim", 16), ("text_dim", 4096), ("freq_dim", 256), ("eps", 1e-6)):
        if getattr(arch, name) != expected:
            problems.append(f"{name}: expected {expected}, found {getattr(arch, name)}")
    if tuple(arch.patch_size) != (1, 2, 2):
        problems.append(f"patch_size: expected (1, 2, 2), found {tuple(arch.patch_size)}")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return arch


# --- the seed project's student vocabulary --------------------------------------------

SEED_FIELDS = (
    "hidden_size",
    "depth",
    "num_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "text_max_length",
    "text_encoder_output_dim",
)


def arch_from_seed_config(cfg: dict[str, Any], source: str = "student config") -> tuple[WanArch, int]:
    """Map the seed notes' config vocabulary onto a Wan student; returns (arch, image_size).

    The seed design's 2-D patch size is the spatial patch of Wan's (1, p, p); its
    `num_channels` is the latent channel count, which the Wan 2.1 VAE fixes at 16.
    FFN width is not in that vocabulary, so it follows the teacher's 2.7x ratio
    (see PRESETS), unless the file also names `ffn_dim`.
    """
    missing = [k for k in ("hidden_size", "depth", "num_heads") if k not in cfg]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(cfg) - set(SEED_FIELDS) - {"ffn_dim", "model_type", "_class_name", "projection_factor"})
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; accepted: {', '.join(SEED_FIELDS)}")
    patch = cfg.get("patch_size", 2)
    if patch != 2:
        raise ConfigError(f"{source}: patch_size: expected 2 (Wan patchifies 1x2x2), found {patch!r}")
    dim = cfg["hidden_size"]
    ffn = cfg.get("ffn_dim") or _round_up(int(dim * A14B.ffn_dim / A14B.dim), HEAD_DIM)
    try:
        arch = WanArch(
            dim=dim,
            ffn_dim=ffn,
            num_heads=cfg["num_heads"],
            num_layers=cfg["depth"],
            in_dim=cfg.get("num_channels", 16),
            out_dim=cfg.get("num_channels", 16),
            text_dim=cfg.get("text_encoder_output_dim", 4096),
            text_len=cfg.get("text_max_length", 512),
        )
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    if arch.text_len != 512:
        raise ConfigError(f"{source}: text_max_length: expected 512 (Wan pads T5 output to 512), found {arch.text_len}")
    image_size = cfg.get("image_size", 1024)
    if image_size % 16:
        raise ConfigError(f"{source}: image_size: expected a multiple of 16 (VAE 8 x patch 2), found {image_size}")
    return validate_student(arch, source), image_size


def load_student_config(path: str | Path) -> tuple[WanArch, int | None]:
    """Read a student config file in either vocabulary: diffusers Wan or the seed notes'."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if "hidden_size" in cfg or "depth" in cfg:
        return arch_from_seed_config(cfg, str(path))
    if "num_attention_heads" in cfg:
        return validate_student(WanArch.from_diffusers_config(cfg, str(path)), str(path)), None
    raise ConfigError(
        f"{path}: neither a diffusers Wan config (num_attention_heads, ...) nor a seed config "
        f"({', '.join(SEED_FIELDS)})"
    )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
