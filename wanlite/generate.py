"""Generate one image with a student: registered model, diffusers folder or ComfyUI file.

The student is only the transformer; text encoding and decoding are the
teacher's T5 and VAE, run through stock diffusers `WanPipeline` with one frame
(`wanlite.pipeline.build_pipeline`), so what users get here is what the
evaluation grid and ComfyUI show. Steps, shift, guidance and the negative
prompt come from the model's own `Sampling` record (folder, export header or
registered version); a flag overrides them and the report lists what it changed.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from wanlite.config import PRESETS, ConfigError, WanArch
from wanlite.export import load_export, load_student, preset_for, read_export
from wanlite.pipeline import build_pipeline, local_path, sampling_call_kwargs
from wanlite.prompts import NEGATIVE_PROMPT
from wanlite.sampling import Sampling, from_header, from_tags, load_sampling, teacher_sampling

log = logging.getLogger(__name__)


def load_model(
    model: str | Path, *, tracking_uri: str | None = None
) -> tuple[Any, WanArch, str, Sampling | None]:
    """The student transformer from `models:/NAME@ALIAS`, a diffusers folder or an export file.

    Returns (model, arch, description of where it came from, its sampling
    record or None for a model written before records existed).
    """
    text = str(model)
    if text.startswith("models:/"):
        from wanlite.download import fetch_version_dir

        with tempfile.TemporaryDirectory(prefix="wanlite-model-") as tmp:
            folder, version = fetch_version_dir(text, "diffusers", Path(tmp), tracking_uri=tracking_uri)
            student, arch, _ = load_student(folder)
            sampling = from_tags(dict(version.tags), f"{text} (version {version.version})") or load_sampling(folder)
        return student, arch, f"{text} (version {version.version})", sampling
    path = local_path(text) if "://" in text else Path(text)  # a store URI: file://, s3://
    if path.is_file():
        sampling = from_header(read_export(path).metadata, str(path))
        student = load_export(path, dtype=torch.float32)
        return student, WanArch.from_diffusers_config(dict(student.config), str(path)), str(path), sampling
    student, arch, folder = load_student(path)
    return student, arch, str(path), load_sampling(folder)


def resolve_sampling(
    recorded: Sampling | None, source: str, **overrides: Any
) -> tuple[Sampling, list[str]]:
    """The model's settings with the caller's non-None overrides, and notes saying what was not the model's.

    A model without a record (written before records existed) gets the
    teacher's settings, and the notes say so.
    """
    notes = []
    if recorded is None:
        recorded = teacher_sampling()
        notes.append(f"{source} records no sampling settings; using the teacher's ({recorded.to_json()})")
    sampling, changed = recorded.overridden(**overrides)
    return sampling, notes + [f"overridden {c}" for c in changed]


def generate(
    model: str | Path,
    teacher: str | Path,
    prompt: str,
    out: str | Path,
    *,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    size: int | None = None,
    tracking_uri: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Sample one image and write it to `out` (PNG); return what was done.

    `steps`, `guidance`, `negative_prompt`: None takes the model's record; a
    value overrides it (a negative prompt given at guidance 1 is unused).
    """
    if not prompt or not prompt.strip():
        raise ConfigError(f"prompt: expected a non-empty prompt, found {prompt!r}")
    if steps is not None and steps < 1:
        raise ConfigError(f"steps: expected a positive number, found {steps}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out: expected a .png file, found {out}")
    student, arch, source, recorded = load_model(model, tracking_uri=tracking_uri)
    sampling, notes = resolve_sampling(recorded, source, steps=steps, guidance=guidance)
    if negative_prompt and not sampling.uses_cfg:
        notes.append("negative prompt ignored: guidance 1 runs no negative pass")
    elif negative_prompt:
        notes.append("negative prompt given by the caller")
    for note in notes:
        log.warning("%s", note)
    if sampling.uses_cfg:
        negative = negative_prompt or (NEGATIVE_PROMPT if sampling.negative_prompt else "")
    else:
        negative = None
    preset = preset_for(arch)
    size = size or (preset.image_size if preset else PRESETS["lite-1024"].image_size)
    if size % 16:
        raise ConfigError(f"size: expected a multiple of 16 (VAE 8 x patch 2), found {size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = build_pipeline(teacher, student, sampling=sampling).to(device)
    log.info("generating %dx%d with %s, sampling %s, seed %d", size, size, source, sampling.to_json(), seed)
    image = pipe(
        prompt=prompt,
        negative_prompt=negative,
        height=size,
        width=size,
        num_frames=1,
        **sampling_call_kwargs(sampling),
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
        "steps": sampling.steps,
        "guidance": sampling.guidance,
        "sampling": sampling.to_dict(),
        "sampling_from_model": recorded is not None and not notes,
        "sampling_notes": notes,
        "size": size,
        "out": str(out),
    }
