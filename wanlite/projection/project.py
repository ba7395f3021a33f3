"""Teacher -> student projection: validate, calibrate, select, slice, write, report.

Order matters: every check that can fail on bad input (shapes, experts,
calibration data, the output location) runs before the first teacher tensor is
read, and the output folder appears only complete (written under a temporary
name, renamed into place), with the report written last inside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from wanlite.checkpoint.reader import TeacherReader
from wanlite.checkpoint.transformer_keys import native_tensor_shapes, native_to_diffusers_names
from wanlite.config import EXPERTS, WanArch, get_preset, validate_student
from wanlite.projection import slicing
from wanlite.projection.calibrate import (
    CalibrationSet,
    NormRatios,
    build_calibration_set,
    collect_norm_ratios,
    collect_statistics,
    high_noise_share,
)
from wanlite.projection.select import Selection, importance_selection, uniform_selection
from wanlite.sampling import save_sampling, student_sampling
from wanlite.student import WanLiteStudent

log = logging.getLogger(__name__)

HIGH, LOW = EXPERTS
METHODS = ("importance", "uniform")
EXPERT_CHOICES = {"low": (LOW,), "high": (HIGH,), "mix": (HIGH, LOW)}
REPORT_JSON = "projection_report.json"
REPORT_MD = "projection_report.md"
DEFAULT_IMAGE_SIZE = 64
REPORT_VERSION = 2


class ProjectionError(ValueError):
    """Inputs a projection cannot honour; raised before any heavy work, naming what and why."""


@dataclass(frozen=True)
class ProjectionJob:
    """A validated projection, ready to run; `fingerprint` identifies its result."""

    reader: TeacherReader
    student: WanArch
    method: str
    expert: str
    sources: dict[str, float]
    calib: CalibrationSet | None
    dtype: torch.dtype
    fingerprint: str
    fixes: dict[str, bool]


def prepare_projection(
    teacher_dir: str | Path,
    preset_or_arch: str | WanArch,
    *,
    method: str = "importance",
    expert: str = "low",
    calib_samples: int = 8,
    calib_latents: torch.Tensor | None = None,
    calib_context: torch.Tensor | None = None,
    timesteps_per_sample: int = 2,
    image_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    calib_random: bool = False,
    norm_ratios: bool = True,
    rank_embedding_units: bool = True,
) -> ProjectionJob:
    """Every check that can fail on bad input, and the result's fingerprint; reads headers only.

    `preset_or_arch` is a preset name or a `WanArch`. `expert="mix"` blends
    both experts tensor by tensor, weighting the high-noise expert by the share
    of shifted timesteps it serves (63.2%). `calib_latents` [N,16,h,w] (clean,
    normalised) and `calib_context` [N,L<=512,text_dim] are the calibration
    inputs (N x `timesteps_per_sample` teacher passes): the pipeline's own
    teacher samples and prompt embeddings. An importance projection without
    them needs `calib_random=True`, and its report says the inputs were random.

    The projection fixes, each switchable for an ablation (False = the
    behaviour before it): `norm_ratios` folds a calibrated sigma_kept/sigma_all
    ratio into what follows every shrunken LayerNorm; `rank_embedding_units`
    ranks the embedding MLPs' hidden units by their own activations.
    """
    student, default_size = _resolve_student(preset_or_arch)
    reader = TeacherReader(teacher_dir)
    check_compatible(reader.arch, student, f"{reader.root} vs student")
    sources = _seed_experts(expert, method, reader)
    calib = None
    if method == "importance":
        if calib_latents is None and not calib_random:
            raise ProjectionError(
                "calibration: expected the pipeline's own data (calib_latents: teacher-data latents, with "
                "calib_context: their prompt embeddings; CLI --calib-data or --data/--embeddings), found none; "
                "pass calib_random=True (--calib-random) to rank on random inputs"
            )
        calib = build_calibration_set(
            reader.arch,
            num_samples=calib_samples,
            latent_size=(image_size or default_size) // 8,
            timesteps_per_sample=timesteps_per_sample,
            latents=calib_latents,
            context=calib_context,
            seed=seed,
        )
    fixes = {"norm_ratios": norm_ratios and method == "importance",
             "rank_embedding_units": rank_embedding_units and method == "importance"}  # fmt: skip
    fingerprint = _fingerprint(reader, student, method, expert, calib, dtype, fixes)
    return ProjectionJob(reader, student, method, expert, sources, calib, dtype, fingerprint, fixes)


def run_projection(
    job: ProjectionJob, out_dir: str | Path, *, device: str | None = None, calib_batch: int = 8
) -> dict[str, Any]:
    """Calibrate (importance), select, slice, and write the student folder; return its report.

    If `out_dir` already holds this projection (same fingerprint) its report is
    returned and nothing is recomputed; if it holds anything else, nothing is done.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    existing = _finished_report(out, job.fingerprint)
    if existing is not None:
        log.info("%s already holds this projection (fingerprint %s); nothing to do", out, job.fingerprint[:12])
        return existing
    reader, student = job.reader, job.student
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    calibration, ratios = None, None
    if job.calib is not None:
        stats = collect_statistics(reader, job.calib, device=device, batch_size=calib_batch)
        selection = importance_selection(
            stats, reader.arch, student, rank_embedding_units=job.fixes["rank_embedding_units"]
        )
        if job.fixes["norm_ratios"]:
            ratios = collect_norm_ratios(
                reader, job.calib, selection.layers, selection.channels, device=device, batch_size=calib_batch
            )
        calibration = {
            "source": job.calib.source,
            "samples": int(job.calib.latents.shape[0]),
            "inputs": job.calib.num_inputs,
            "latent_shape": list(job.calib.latents.shape[1:]),
            "timesteps": [round(float(t), 3) for t in job.calib.timesteps],
            "inputs_per_expert": stats.inputs_per_expert,
            "expert_loading": stats.loading,
            "tokens": stats.tokens,
            "sha256": job.calib.digest(),
        }
    else:
        selection = uniform_selection(reader.arch, student)
    state, entries = build_student_state(reader, student, selection, job.sources, job.dtype)
    if ratios is not None:
        fold_norm_ratios(state, entries, ratios, selection.channels)
    report = {
        "version": REPORT_VERSION,
        "fingerprint": job.fingerprint,
        "student": _arch_dict(student),
        "teacher": {
            "dir": str(reader.root),
            "layout": reader.layout,
            "arch": _arch_dict(reader.arch),
            "fingerprint": reader.fingerprint(),
        },
        "method": job.method,
        "expert": job.expert,
        "seeded_from": dict(job.sources),
        "dtype": str(job.dtype).removeprefix("torch."),
        "selection": selection.summary(),
        "calibration": calibration,
        "fixes": dict(job.fixes),
        "norm_ratios": None if ratios is None else ratios.summary(),
        "tensors": entries,
        "totals": _totals(entries, student),
    }
    _write_student(out, state, student, report, started, device)
    return json.loads((out / REPORT_JSON).read_text())


def project_student(
    teacher_dir: str | Path,
    preset_or_arch: str | WanArch,
    *,
    out_dir: str | Path,
    device: str | None = None,
    calib_batch: int = 8,
    **options: Any,
) -> dict[str, Any]:
    """Project a teacher expert (or a blend of both) onto a student shape; return the report.

    `options` are `prepare_projection`'s (method, expert, calib_samples,
    calib_latents, calib_context, timesteps_per_sample, image_size, seed, dtype).
    """
    job = prepare_projection(teacher_dir, preset_or_arch, **options)
    return run_projection(job, out_dir, device=device, calib_batch=calib_batch)


STORE_PREFIX = "students"


def project_step(
    teacher: str | Path,
    preset_or_arch: str | WanArch,
    *,
    out: str | None = None,
    device: str | None = None,
    calib_batch: int = 8,
    **options: Any,
) -> dict[str, Any]:
    """The DAG step: a teacher path or store URI in; the student's URI and a small summary out.

    `out`: a local directory, a store URI, or None for the content-addressed
    key `students/<fingerprint>/init` of the default store. Store outputs are
    projected into a temporary directory and published with `Store.put_dir`
    (files first, manifest last, fingerprint in its meta); a store that
    already holds this projection is answered from its report, with no work.
    """
    job = prepare_projection(_local_teacher(teacher), preset_or_arch, **options)
    if out is not None and "://" not in out:
        report = run_projection(job, out, device=device, calib_batch=calib_batch)
        uri = Path(out).resolve().as_uri()
    else:
        uri, report = _publish(job, out, device, calib_batch)
    return {
        "uri": uri,
        "fingerprint": job.fingerprint,
        "method": report["method"],
        "seeded_from": report["seeded_from"],
        "layers": report["selection"]["layers"],
        "totals": report["totals"],
    }


def _local_teacher(teacher: str | Path) -> Path:
    """A local directory for a teacher path or store URI (store URIs are manifest-verified)."""
    if "://" not in str(teacher):
        return Path(teacher)
    from wanlite.storage import local_dir

    return local_dir(str(teacher))


def _publish(job: ProjectionJob, out: str | None, device: str | None, calib_batch: int) -> tuple[str, dict[str, Any]]:
    from wanlite.storage import Store

    store, key = (Store.from_env(out), "") if out else (Store.from_env(), f"{STORE_PREFIX}/{job.fingerprint[:16]}/init")
    report_key = f"{key}/{REPORT_JSON}" if key else REPORT_JSON
    existing = store.read_manifest(key)
    if existing is not None:
        if existing.meta.get("fingerprint") != job.fingerprint:
            raise ProjectionError(
                f"{store.uri(key)}: already holds a different student (fingerprint "
                f"{str(existing.meta.get('fingerprint'))[:12]}, this projection {job.fingerprint[:12]})"
            )
        log.info("%s already holds this projection; nothing to do", store.uri(key))
        return store.uri(key), json.loads(store.get_bytes(report_key))
    with tempfile.TemporaryDirectory(prefix="wanlite-project-") as tmp:
        report = run_projection(job, Path(tmp) / "student", device=device, calib_batch=calib_batch)
        store.put_dir(Path(tmp) / "student", key, meta={"fingerprint": job.fingerprint, "kind": "student-init"})
    return store.uri(key), report


# --- validation (cheap, before any teacher tensor is read) ---------------------------


def _resolve_student(preset_or_arch: str | WanArch) -> tuple[WanArch, int]:
    if isinstance(preset_or_arch, WanArch):
        return validate_student(preset_or_arch), DEFAULT_IMAGE_SIZE
    preset = get_preset(preset_or_arch)
    return validate_student(preset.arch, f"preset {preset.name}"), preset.image_size


def check_compatible(teacher: WanArch, student: WanArch, source: str) -> None:
    """Raise naming every field where the student cannot be a selection of the teacher."""
    problems = []
    if teacher.head_dim != student.head_dim:
        problems.append(f"head_dim: teacher {teacher.head_dim}, student {student.head_dim} (heads are kept whole)")
    for name in ("dim", "num_heads", "ffn_dim", "num_layers"):
        if getattr(student, name) > getattr(teacher, name):
            problems.append(f"{name}: student {getattr(student, name)} exceeds the teacher's {getattr(teacher, name)}")
    for name in ("text_dim", "in_dim", "out_dim", "freq_dim", "patch_size"):
        if getattr(student, name) != getattr(teacher, name):
            problems.append(f"{name}: expected the teacher's {getattr(teacher, name)}, found {getattr(student, name)}")
    if problems:
        raise ProjectionError(f"{source}: " + "; ".join(problems))


def _seed_experts(expert: str, method: str, reader: TeacherReader) -> dict[str, float]:
    """Expert name -> blend weight of the experts that seed the student's weights."""
    if method not in METHODS:
        raise ProjectionError(f"method: expected one of {', '.join(METHODS)}, found {method!r}")
    if expert not in EXPERT_CHOICES:
        raise ProjectionError(f"expert: expected one of {', '.join(EXPERT_CHOICES)}, found {expert!r}")
    missing = [e for e in EXPERT_CHOICES[expert] if e not in reader.expert_names]
    if missing:
        raise ProjectionError(
            f"{reader.root}: --expert {expert} needs {', '.join(missing)}, which the teacher lacks "
            f"(found {', '.join(reader.expert_names)})"
        )
    if expert == "mix":
        share = high_noise_share()
        return {HIGH: share, LOW: 1.0 - share}
    return {EXPERT_CHOICES[expert][0]: 1.0}


def _fingerprint(
    reader: TeacherReader,
    student: WanArch,
    method: str,
    expert: str,
    calib: CalibrationSet | None,
    dtype: torch.dtype,
    fixes: dict[str, bool],
) -> str:
    identity = {
        "version": REPORT_VERSION,
        "teacher": reader.fingerprint(),
        "student": _arch_dict(student),
        "method": method,
        "expert": expert,
        "calibration": calib.digest() if calib is not None else None,
        "dtype": str(dtype),
        "fixes": fixes,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _finished_report(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The report of an identical finished projection at `out`, None if `out` is free; else raise."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ProjectionError(f"{out}: output location is a file, expected a directory or nothing")
    report_path = out / REPORT_JSON
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("fingerprint") == fingerprint:
            return report
        raise ProjectionError(
            f"{out}: already holds a different student (fingerprint {str(report.get('fingerprint'))[:12]}, "
            f"this projection {fingerprint[:12]}); choose another --out or remove it"
        )
    if any(out.iterdir()):
        raise ProjectionError(
            f"{out}: not empty and holds no finished projection ({REPORT_JSON}); refusing to overwrite"
        )
    return None


# --- building -------------------------------------------------------------------------


def build_student_state(
    reader: TeacherReader,
    student: WanArch,
    selection: Selection,
    sources: dict[str, float],
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Every student tensor (native names), read one teacher tensor at a time; plus report entries."""
    state: dict[str, torch.Tensor] = {}
    entries = []
    expected = native_tensor_shapes(student)
    for name, shape in expected.items():
        plan = slicing.plan(name, selection, reader.arch.dim)
        value, cited = None, []
        for expert, weight in sources.items():
            part = slicing.apply(plan, reader.tensor(expert, plan.teacher_name), dtype)
            value = part if len(sources) == 1 else (weight * part if value is None else value + weight * part)
            file, key = reader.location(expert, plan.teacher_name)
            cited.append(f"{file.relative_to(reader.root)}:{key}")
        if tuple(value.shape) != shape:  # a rule-table bug, never bad input: fail loudly
            raise RuntimeError(f"{name}: projected to {tuple(value.shape)}, expected {shape}")
        state[name] = value.contiguous()
        method = plan.describe()
        if len(sources) > 1:
            method += "; blend " + " + ".join(f"{w:.4f} x {e}" for e, w in sources.items())
        entries.append({"tensor": name, "shape": list(shape), "sources": cited, "method": method})
    return state, entries


SCALE_CHUNKS = {"norm1": 1, "norm2": 4}
"""Modulation chunk holding the scale applied after each non-affine block LayerNorm (shift, scale, gate x2)."""


def fold_norm_ratios(
    state: dict[str, torch.Tensor], entries: list[dict[str, Any]], ratios: NormRatios, channels: torch.Tensor
) -> None:
    """Fold each shrunken LayerNorm's sigma_kept/sigma_all ratio r into what follows it (native names, in place).

    norm1 and norm2 (no affine) are followed by `x (1 + scale) + shift` with
    scale = modulation chunk + time_projection chunk; `r (1 + scale) - 1` is
    exact when the modulation chunk becomes `r (1 + m) - 1` and the matching
    time_projection rows are multiplied by r. time_projection is shared by
    every block, so one r per norm (the mean over the kept blocks) is folded:
    exact, and the per-block spread stays in the report. norm3 is affine: its
    weight takes its own block's r, exactly. The head's scale is
    `modulation + e(t)` with e the time embedding, which also feeds
    time_projection, so its r is folded into the modulation at the
    calibration-mean e: exact where e(t) equals that mean, off by (r - 1)(e - mean) elsewhere.
    """
    d = state["head.modulation"].shape[-1]
    applied: dict[str, list[str]] = {}

    def put(name: str, value: torch.Tensor, how: str) -> None:
        state[name] = value.to(state[name].dtype).contiguous()
        applied.setdefault(name, []).append(how)

    for norm, chunk in SCALE_CHUNKS.items():
        r = sum(ratios.blocks[norm]) / len(ratios.blocks[norm])
        if r == 1.0:
            continue
        rows = slice(chunk * d, (chunk + 1) * d)
        for name in [k for k in state if k.endswith(".modulation") and k.startswith("blocks.")]:
            value = state[name].float().clone()
            value[:, chunk] = r * (1 + value[:, chunk]) - 1
            put(name, value, f"{norm} ratio {r:.6g} folded into scale chunk {chunk}: r (1 + m) - 1")
        for name in ("time_projection.1.weight", "time_projection.1.bias"):
            value = state[name].float().clone()
            value[rows] *= r
            put(name, value, f"rows of chunk {chunk} x {norm} ratio {r:.6g}")
    for j, r in enumerate(ratios.blocks["norm3"]):
        name = f"blocks.{j}.norm3.weight"
        if r != 1.0 and name in state:
            put(name, state[name].float() * r, f"x norm3 ratio {r:.6g} (sigma_kept/sigma_all)")
    if ratios.head != 1.0:
        r, mean = ratios.head, ratios.time_embedding_mean[channels].float()
        value = state["head.modulation"].float().clone()
        value[:, 1] = r * (1 + value[:, 1] + mean) - 1 - mean
        put("head.modulation", value, f"head norm ratio {r:.6g} folded into the scale chunk at the mean e(t)")
    for entry in entries:
        entry["method"] += "".join(f"; {how}" for how in applied.get(entry["tensor"], []))


def _totals(entries: list[dict[str, Any]], student: WanArch) -> dict[str, int]:
    expected = native_tensor_shapes(student)
    projected = {e["tensor"] for e in entries}
    return {
        "tensors": len(expected),
        "parameters": student.num_params(),
        "from_teacher": len(projected),
        "rescaled": sum("RMSNorm" in e["method"] or "ratio" in e["method"] for e in entries),
        "randomly_initialised": len(set(expected) - projected),
    }


def _write_student(
    out: Path, state: dict[str, torch.Tensor], student: WanArch, report: dict[str, Any], started: float, device: str
) -> None:
    """Save the student and its reports under a temporary name, then rename it into place."""
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    names = native_to_diffusers_names(student)
    with init_empty_weights():
        model = WanLiteStudent.from_arch(student)
    model.load_state_dict({names[k]: v for k, v in state.items()}, strict=True, assign=True)
    model.save_pretrained(staging)
    # A slice of the teacher has learned no folded guidance: it samples like the teacher's low-noise expert.
    save_sampling(staging, student_sampling(guided=False))
    report["wall_s"] = round(time.perf_counter() - started, 3)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if device.startswith("cuda"):
        report["peak_device_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    (staging / REPORT_MD).write_text(markdown_report(report))
    (staging / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")  # last: marks the folder complete
    if out.exists():
        out.rmdir()  # checked empty by _finished_report
    os.replace(staging, out)
    log.info("projected student written to %s (%s)", out, report["totals"])


def _arch_dict(arch: WanArch) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in arch.__dict__.items()}


def markdown_report(report: dict[str, Any]) -> str:
    """A human-readable rendering of the JSON report."""
    s, t, sel, tot = report["student"], report["teacher"], report["selection"], report["totals"]
    lines = [
        "# Projection report",
        "",
        f"- teacher: `{t['dir']}` ({t['layout']} layout, dim {t['arch']['dim']}, {t['arch']['num_layers']} layers)",
        f"- student: dim {s['dim']}, {s['num_heads']} heads, ffn {s['ffn_dim']}, {s['num_layers']} layers",
        f"- method: {report['method']}; seeded from: "
        + ", ".join(f"{e} ({w:.4f})" for e, w in report["seeded_from"].items()),
        f"- depth: {sel['depth']}; teacher blocks {sel['layers']}",
        f"- residual channels kept: {sel['channels']} (massive-activation channels kept: {sel['outlier_channels']})",
        f"- calibration: {_calibration_line(report['calibration'])}",
        *_fixes_lines(report),
        f"- totals: {tot['tensors']} tensors, {tot['parameters']:,} parameters, {tot['from_teacher']} from the "
        f"teacher, {tot['rescaled']} rescaled, **{tot['randomly_initialised']} randomly initialised**",
        f"- wall time: {report['wall_s']} s; peak RSS: {report['peak_rss_mb']} MB",
        "",
        "| student tensor | shape | source(s) | method |",
        "|---|---|---|---|",
    ]
    for e in report["tensors"]:
        lines.append(f"| `{e['tensor']}` | {e['shape']} | {'<br>'.join(e['sources'])} | {e['method']} |")
    return "\n".join(lines) + "\n"


def _calibration_line(calibration: dict[str, Any] | None) -> str:
    if calibration is None:
        return "none (uniform selection needs no data)"
    return (
        f"{calibration['samples']} samples ({calibration['source']}) x "
        f"{calibration['inputs'] // calibration['samples']} timesteps, per expert "
        f"{calibration['inputs_per_expert']}, experts {calibration.get('expert_loading')}, "
        f"sha256 {calibration['sha256'][:16]}"
    )


def _fixes_lines(report: dict[str, Any]) -> list[str]:
    fixes, ratios = report.get("fixes", {}), report.get("norm_ratios")
    lines = ["- fixes: " + ", ".join(f"{k} {'on' if v else 'off'}" for k, v in fixes.items())]
    if ratios is not None:
        blocks = "; ".join(f"{k} {[round(r, 4) for r in v]}" for k, v in ratios["blocks"].items())
        lines.append(f"- LayerNorm sigma_kept/sigma_all per student block: {blocks}; head {ratios['head']:.4f} "
                     f"({ratios['tokens']} calibration tokens)")  # fmt: skip
    return lines
