"""File names of a Wan 2.2 T2V-A14B checkpoint and detection of its layout.

Two layouts are accepted as teacher input (WAN_FORMATS.md §1 and §6): the native
one the Wan-AI repository ships (`high_noise_model/`, `low_noise_model/`, `.pth`
files for T5 and VAE) and the diffusers one (`model_index.json` + one folder per
pipeline component). The names live here, once, so the synthesiser, the
validator and the readers cannot disagree about them.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Literal

Layout = Literal["native", "diffusers"]

NATIVE_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
NATIVE_VAE = "Wan2.1_VAE.pth"
NATIVE_TOKENIZER = "google/umt5-xxl"
EXPERT_DIRS = ("high_noise_model", "low_noise_model")
EXPERT_CONFIG = "config.json"
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_SHARD = "diffusion_pytorch_model.safetensors"

MODEL_INDEX = "model_index.json"
DIFFUSERS_EXPERTS = {"high_noise_model": "transformer", "low_noise_model": "transformer_2"}
"""diffusers' `WanPipeline.transformer` is the HIGH-noise expert; `transformer_2` the low-noise one."""
DIFFUSERS_COMPONENTS = ("transformer", "transformer_2", "text_encoder", "tokenizer", "vae", "scheduler")


class LayoutError(ValueError):
    """A directory that is neither checkpoint layout; the message says what was found."""


def shard_name(index: int, total: int) -> str:
    """Shard file name as diffusers/HF write it: 1-based, 5-digit, `-of-` the total."""
    return f"diffusion_pytorch_model-{index:05d}-of-{total:05d}.safetensors"


def detect_layout(path: str | Path) -> Layout:
    """Return "native" or "diffusers" for a teacher directory.

    A directory that has both markers is refused rather than guessed: which
    weights a reader then uses would be an accident of check order.
    """
    root = Path(path)
    if not root.is_dir():
        raise LayoutError(f"{root}: expected a checkpoint directory, found {_describe(root)}")
    has_native = all((root / d / EXPERT_CONFIG).is_file() for d in EXPERT_DIRS)
    has_diffusers = (root / MODEL_INDEX).is_file()
    if has_native and has_diffusers:
        raise LayoutError(
            f"{root}: expected one layout, found both native ({', '.join(EXPERT_DIRS)}) and diffusers ({MODEL_INDEX})"
        )
    if has_native:
        return "native"
    if has_diffusers:
        return "diffusers"
    present = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "") if present else "an empty directory"
    raise LayoutError(
        f"{root}: expected a native Wan 2.2 layout ({'/, '.join(EXPERT_DIRS)}/ each with {EXPERT_CONFIG}) "
        f"or a diffusers layout ({MODEL_INDEX}); found {shown}"
    )


def _describe(path: Path) -> str:
    if not path.exists():
        return "nothing (no such path)"
    return "a file" if path.is_file() else "a special file"


def is_shard_name(shard: object) -> bool:
    """A weight_map entry that stays inside its folder: a relative path with no `..`, no drive, no backslash."""
    if not isinstance(shard, str) or not shard or "\\" in shard or ":" in shard:
        return False
    path = PurePosixPath(shard)
    return not path.is_absolute() and ".." not in path.parts
