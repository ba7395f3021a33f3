"""The model card: a README.md stored with every registered version and set as its MLflow description.

A registry page is where a user decides whether and how to use a model, so the
card says what the model is (architecture, parameters, teacher), how it was
made (training configuration, the run that trained it), how good it is
(evaluation metrics, the teacher-vs-student grid) and how to sample it (the
recorded sampling settings, in ComfyUI and in diffusers). Plain Markdown: MLflow
renders descriptions as Markdown, and the same text is the artifact README.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wanlite.config import WanArch
from wanlite.sampling import SAMPLERS, Sampling

CARD_FILE = "README.md"
LICENCE_NOTE = (
    "Derived from Wan 2.2 T2V-A14B (Wan-AI), released under the Apache License 2.0; this student's weights "
    "are a derivative of those weights, and the Apache-2.0 terms (notice, no trademark grant) apply to them."
)


def mlflow_run_url(tracking_uri: str | None, experiment_id: str, run_id: str) -> str | None:
    """The run's page on an HTTP tracking server, or None when there is no web server to link to."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_version_url(tracking_uri: str | None, name: str, version: str) -> str | None:
    """The model version's page on an HTTP tracking server, or None."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/models/{name}/versions/{version}"


def model_card(
    *,
    name: str,
    arch: WanArch,
    preset: str,
    sampling: Sampling | None,
    eval_report: Mapping[str, Any],
    export_report: Mapping[str, Any],
    teacher_sha256: str | None,
    data_hash: str | None,
    training: Mapping[str, Any] | None,
    grid: str | None,
) -> str:
    """The card's Markdown. `training`: {run_id, url, params} of the training run, when known."""
    metrics = eval_report.get("metrics", {})
    lines = [
        f"# {name}",
        "",
        "A small **text-to-image** Wan transformer distilled from Wan 2.2 T2V-A14B by wanlite. It is a stock "
        "diffusers `WanTransformer3DModel` (and, exported, a native Wan 2.1 T2V file ComfyUI loads as is); "
        "text encoding and decoding are the teacher's umt5-xxl and Wan 2.1 VAE.",
        "",
        "## Architecture",
        "",
        "| field | value |",
        "|---|---|",
        f"| preset | `{preset}` |",
        f"| parameters | {arch.num_params():,} |",
        f"| dim / FFN | {arch.dim} / {arch.ffn_dim} |",
        f"| heads x head dim | {arch.num_heads} x {arch.head_dim} |",
        f"| layers | {arch.num_layers} |",
        f"| teacher sha256 | `{teacher_sha256 or 'unknown'}` |",
        f"| distillation data hash | `{data_hash or 'unknown'}` |",
        f"| ComfyUI file | `{export_report.get('file')}` ({export_report.get('dtype')}, sha256 "
        f"`{str(export_report.get('sha256', ''))[:16]}…`) |",
        "",
        "## Sampling settings (how this model must be sampled)",
        "",
        *_sampling_lines(sampling),
        "",
        "## Training",
        "",
        *_training_lines(training),
        "",
        "## Evaluation",
        "",
        f"Quality gate: **{'passed' if eval_report.get('passed') else 'failed'}**; score (mean velocity relative "
        f"MSE vs the teacher, lower is better): **{float(eval_report.get('score', float('nan'))):.4g}**.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float))),
        "",
        f"{len(eval_report.get('prompts', []))} held-out prompts x seeds {eval_report.get('seeds')}, "
        f"{eval_report.get('size')} px.",
        "",
        f"Teacher (left) vs student (right): the run artifact `{grid}`." if grid else "No grid was logged.",
        "",
        "## Use it",
        "",
        *_usage_lines(name, sampling),
        "",
        "## Licence",
        "",
        LICENCE_NOTE,
        "",
    ]
    return "\n".join(lines)


def _sampling_lines(s: Sampling | None) -> list[str]:
    if s is None:
        return ["This version records no sampling settings (registered before wanlite recorded them)."]
    guidance = (
        "1 (classifier-free guidance is folded into the weights: do **not** add CFG)"
        if s.guidance == 1.0
        else f"{s.guidance:g}" + (" with Wan's negative prompt" if s.negative_prompt else " with an empty negative")
    )
    lines = [
        "| setting | value |",
        "|---|---|",
        f"| steps | {s.steps} |",
        f"| flow shift | {s.shift:g} (ComfyUI: ModelSamplingSD3 shift; its Wan default is 8) |",
        f"| guidance (CFG) | {guidance} |",
        f"| sampler | `{s.sampler}` (ComfyUI `{SAMPLERS[s.sampler]}`) |",
    ]
    if s.sigmas is not None:
        lines.append(f"| sigmas | {', '.join(f'{x:g}' for x in s.sigmas)} (then 0) |")
    return [*lines, "", f"Machine-readable: the `wanlite_sampling` tag and export-header entry: `{s.to_json()}`"]


def _training_lines(training: Mapping[str, Any] | None) -> list[str]:
    if not training or not training.get("run_id"):
        return ["The training run is not known to this registration."]
    run = f"[{training['run_id']}]({training['url']})" if training.get("url") else f"`{training['run_id']}`"
    params = training.get("params") or {}
    rows = [f"| {k} | {v} |" for k, v in sorted(params.items())]
    return [f"Trained in MLflow run {run}.", "", "| parameter | value |", "|---|---|", *rows] if rows else [
        f"Trained in MLflow run {run}."
    ]


def _usage_lines(name: str, s: Sampling | None) -> list[str]:
    cfg = s.guidance if s else 3.0
    steps = s.steps if s else 40
    shift = s.shift if s else 12.0
    return [
        "**ComfyUI.** `wanlite download models:/" + name + "@champion --comfyui /path/to/ComfyUI` places the "
        "file in `models/diffusion_models/` and a ready workflow in `user/default/workflows/` (Workflows "
        f"sidebar): Load Diffusion Model -> ModelSamplingSD3 (shift {shift:g}) -> KSampler ({steps} steps, "
        f"cfg {cfg:g}) with the umt5-xxl CLIP loader (type wan), EmptyHunyuanLatentVideo (length 1), VAE "
        "decode and Save Image.",
        "",
        "**diffusers.** `wanlite generate --model models:/" + name + "@champion --teacher WAN22_DIR --prompt "
        "'…' --out image.png` runs stock `WanPipeline` with this transformer and the teacher's T5 and VAE, "
        "with the settings above. By hand: load the `diffusers/` folder with "
        f"`WanTransformer3DModel.from_pretrained`, then call the pipeline with `num_inference_steps={steps}`, "
        f"`guidance_scale={cfg:g}`, `num_frames=1` and a scheduler with `flow_shift={shift:g}`.",
    ]
