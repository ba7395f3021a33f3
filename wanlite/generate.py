"""Generate one image with a student: registered model, diffusers folder or ComfyUI file.

The student is only the transformer; text encoding and decoding are the
teacher's T5 and VAE, run through stock diffusers `WanPipeline` with one frame
(`wanlite.pipeline.build_pipeline`), so what users get here is what the
evaluation grid and ComfyUI show.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from wanlite.config import GUIDANCE_LOW, PRESETS, SAMPLE_STEPS, ConfigError, WanArch
from wanlite.export import load_export, load_student, preset_for
from wanlite.pipeline import build_pipeline, local_path
from wanlite.prompts import NEGATIVE_PROMPT

log = logging.getLogger(__name__)


def load_model(model: str | Path, *, tracking_uri: str | None = None) -> tuple[Any, WanArch, str]:
    """The student transformer from `models:/NAME@ALIAS`, a diffusers folder or an export file.

    Returns (model, arch, description of where it came from).
    """
    text = str(model)
    if text.startswith("models:/"):
        from wanlite.download import fetch_version_dir

        with tempfile.TemporaryDirectory(prefix="wanlite-model-") as tmp:
            folder, version = fetch_version_dir(text, "diffusers", Path(tmp), tracking_uri=tracking_uri)
            student, arch, _ = load_student(folder)
        return student, arch, f"{text} (version {version.version})"
    path = local_path(text) if "://" in text else Path(text)  # a store URI: file://, s3://
    if path.is_file():
        student = load_export(path, dtype=torch.float32)
        return student, WanArch.from_diffusers_config(dict(student.config), str(path)), str(path)
    student, arch, _ = load_student(path)
    return student, arch, str(path)


def generate(
    model: str | Path,
    teacher: str | Path,
    prompt: str,
    out: str | Path,
    *,
    negative_prompt: str = NEGATIVE_PROMPT,
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE_LOW,
    seed: int = 0,
    size: int | None = None,
    tracking_uri: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Sample one image and write it to `out` (PNG); return what was done."""
    if not prompt or not prompt.strip():
        raise ConfigError(f"prompt: expected a non-empty prompt, found {prompt!r}")
    if steps < 1:
        raise ConfigError(f"steps: expected a positive number, found {steps}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out: expected a .png file, found {out}")
    student, arch, source = load_model(model, tracking_uri=tracking_uri)
    preset = preset_for(arch)
    size = size or (preset.image_size if preset else PRESETS["lite-1024"].image_size)
    if size % 16:
        raise ConfigError(f"size: expected a multiple of 16 (VAE 8 x patch 2), found {size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = build_pipeline(teacher, student).to(device)
    log.info("generating %dx%d with %s, %d steps, CFG %g, seed %d", size, size, source, steps, guidance, seed)
    image = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        height=size,
        width=size,
        num_frames=1,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pil",
    ).frames[0][0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    image.save(tmp, format="PNG")
    tmp.replace(out)
    return {
        "kind": "generate",
        "model": source,
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "size": size,
        "out": str(out),
    }
