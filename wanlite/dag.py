"""The wanlite DAG as plain functions: one adapter per step, and the wiring between them.

fetch -> validate -> encode-prompts -> teacher-data -> project -> train -> evaluate -> round-trip -> export -> register
  -> distill-steps -> evaluate-few-step -> round-trip-few-step -> export-few-step -> register-few-step

The few-step branch turns the distilled student into a K-step, CFG-free one
(`wanlite.distill.steps`) and ships it like the first: evaluated, round-tripped,
exported (`<preset file>-<K>step.safetensors`) and registered as its own model,
`wanlite-<preset>-<K>step`, whose aliases compete among few-step versions only.

Each adapter takes JSON-able arguments (store URIs, names, numbers) and returns
a small JSON-able manifest (URIs, sha256, metrics): tensors never cross a step
boundary. The same functions run three ways: in-process by `run_dag` (the
`wanlite demo`), inside a Prefect step flow (flows/steps.py), and in their own
container through a step deployment, which is why `wire` is the single place
that says which output feeds which input.

Idempotence without any orchestrator: every step writes under a key derived
from its inputs (content-addressed: the inputs are themselves content-addressed
URIs), data first and manifest last, and a step whose output manifest already
exists returns it without recomputing. Registration is idempotent by the
exported file's sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from wanlite import __version__
from wanlite.config import ConfigError, get_preset

log = logging.getLogger(__name__)

STEPS = (
    "fetch",
    "validate",
    "encode-prompts",
    "teacher-data",
    "project",
    "train",
    "evaluate",
    "round-trip",
    "export",
    "register",
    "distill-steps",
    "evaluate-few-step",
    "round-trip-few-step",
    "export-few-step",
    "register-few-step",
)
SYNTHETIC_PREFIX = "synthetic:"
"""`teacher="synthetic:tiny"`: synthesise the tiny teacher (seed 0) instead of fetching one."""

FEW_STEP_SUFFIX = "-few-step"
"""Steps of the few-step branch: the step of the same name without it, applied to the few-step student."""

Progress = Callable[[int, int], None]
CALIB_SAMPLES, CALIB_TIMESTEPS = 32, 4
"""Teacher samples (x0 + their prompts) that rank channels, heads and neurons for the projection, and noise
levels per sample (stratified over the shifted schedule, so both experts' ranges are covered)."""


class StepError(RuntimeError):
    """A step's own verdict is negative (invalid teacher, failed gate); the message names the report.

    `result` is the step's published manifest, so a caller can still show the
    report that explains the failure.
    """

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


# --- run parameters -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's outputs. `None` fields take the preset's defaults."""

    preset: str = "tiny"
    teacher: str = SYNTHETIC_PREFIX + "tiny"
    store: str | None = None
    tracking_uri: str | None = None
    train_prompts: str = "default"
    eval_prompts: str = "held-out"
    num_prompts: int | None = None
    num_eval_prompts: int | None = None
    sample_steps: int | None = None
    samples_per_prompt: int | None = None
    projection_method: str = "importance"
    projection_expert: str | None = None
    guided: bool = True
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    checkpoint_every: int | None = None
    ema_decay: float | None = None
    export_dtype: str = "bf16"
    few_steps: int = 4
    few_step_updates: int | None = None
    few_step_critic_updates: int | None = None
    few_step_lr: float | None = None
    seed: int = 0
    nproc: int | None = None

    def resolved(self) -> RunSpec:
        """Preset defaults filled in, the store root and tracking URI made explicit."""
        from wanlite.distill.steps_options import SUPPORTED_STEPS
        from wanlite.distill.tracking import tracking_uri
        from wanlite.storage import Store

        get_preset(self.preset)
        if self.few_steps not in SUPPORTED_STEPS:  # refused before the first step runs, not after the 40-step ships
            supported = ", ".join(map(str, SUPPORTED_STEPS))
            raise ConfigError(f"few_steps: expected one of {supported}, found {self.few_steps}")
        defaults = PRESET_DEFAULTS[self.preset]
        filled = {k: defaults[k] for k in defaults if getattr(self, k) is None}
        return dataclasses.replace(
            self,
            **filled,
            store=Store.from_env(self.store).root,
            tracking_uri=tracking_uri(self.tracking_uri),
        )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RunSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"run parameters: unknown {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
        return cls(**params)


PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    # Seconds per step on a CPU: a handful of prompts, a few sampler steps, a
    # short distillation. It proves the wiring, not the quality.
    "tiny": {
        # Blending both experts gives the tiny student a start in both noise
        # ranges. The gate asks it to beat predicting zero and its projected
        # init by 10 % in each: 24 steps reached 0.93 of zero's error on the
        # low-noise range (fail), 72 steps 0.74 (measured on the synthetic teacher).
        "num_prompts": 8,
        "num_eval_prompts": 3,  # several prompts in the grid a person judges on the registry page
        "sample_steps": 4,
        "samples_per_prompt": 1,
        "projection_expert": "mix",
        "steps": 64,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 2,
        "checkpoint_every": 16,
        "ema_decay": 0.0,
        # A few DMD updates at a small rate: the few-step branch runs end to end, the student barely moves.
        "few_step_updates": 2,
        "few_step_critic_updates": 2,
        "few_step_lr": 1e-5,
    },
    # The production run: every prompt, the teacher's own 40-step sampler, 20k steps of batch 64.
    "lite-1024": {
        "num_prompts": None,
        "num_eval_prompts": 16,
        "sample_steps": 40,
        "samples_per_prompt": 16,  # 4,736 images for 296 prompts; cost model in the README
        "projection_expert": "low",
        "steps": 20000,
        "batch_size": 64,
        "lr": 1e-4,
        "warmup_steps": 500,
        "checkpoint_every": 500,
        "ema_decay": 0.999,
        # DMD2's two time-scale rule (5 critic updates per generator update); rate and length are
        # starting points for the lite-1024 run, not yet measured at that size.
        "few_step_updates": 2000,
        "few_step_critic_updates": 5,
        "few_step_lr": 1e-5,
    },
}


def input_key(step: str, **inputs: Any) -> str:
    """A store key component fixed by a step's inputs (which are content-addressed URIs and configs)."""
    blob = json.dumps({"step": step, "inputs": inputs, "wanlite": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _store(root: str) -> Any:
    from wanlite.storage import Store

    return Store.from_env(root)


def _published(store: Any, key: str) -> dict[str, Any] | None:
    """The `result` a finished step recorded in its manifest, or None if it never finished."""
    manifest = store.read_manifest(key)
    return None if manifest is None else dict(manifest.meta.get("result", {}))


def _publish(store: Any, key: str, local_dir: Path, result: dict[str, Any], kind: str) -> dict[str, Any]:
    """Upload `local_dir` under `key` (manifest last) with `result` in its meta; return the result."""
    result = {**result, "uri": store.uri(key)}
    store.put_dir(local_dir, key, meta={"kind": kind, "result": result}, progress=False)
    return result


# --- the steps ----------------------------------------------------------------------------------


def fetch(teacher: str, store: str) -> dict[str, Any]:
    """Copy the teacher into `teachers/<address>/` (skipped when already there); `synthetic:tiny` synthesises it."""
    from wanlite.checkpoint.fetch import fetch_teacher

    st = _store(store)
    if teacher.startswith(SYNTHETIC_PREFIX):
        from wanlite.checkpoint.synth import synth_teacher

        size = teacher.removeprefix(SYNTHETIC_PREFIX)
        if size != "tiny":
            raise ConfigError(f"teacher: only {SYNTHETIC_PREFIX}tiny can be synthesised for a run, found {teacher!r}")
        with tempfile.TemporaryDirectory(prefix="wanlite-synth-") as tmp:
            report = fetch_teacher(str(synth_teacher(Path(tmp) / "teacher", size="tiny", seed=0)), st, progress=False)
    else:
        report = fetch_teacher(teacher, st, progress=False)
    # The manifest digest covers every file's sha256: the teacher's identity for provenance.
    return {**report, "teacher_sha256": st.read_manifest(report["key"]).digest}


def validate(teacher_uri: str, store: str) -> dict[str, Any]:
    """Check every teacher tensor by its header; raise StepError naming the report if invalid."""
    from wanlite.checkpoint.validate import validate_teacher
    from wanlite.pipeline import local_path

    st = _store(store)
    key = f"reports/validate/{input_key('validate', teacher=teacher_uri)}"
    result = _published(st, key)
    if result is None:
        report = validate_teacher(local_path(teacher_uri))
        with tempfile.TemporaryDirectory(prefix="wanlite-validate-") as tmp:
            report.write(tmp)
            summary = {"valid": report.ok, "layout": report.layout, "problems": len(report.problems)}
            result = _publish(st, key, Path(tmp), {**summary, "markdown": report.to_markdown()}, "validation")
    if not result["valid"]:
        problems = f"{result['problems']} problem(s)"
        raise StepError(f"teacher {teacher_uri} is invalid ({problems}); see {result['uri']}", result)
    return result


def encode_prompts(teacher_uri: str, store: str, prompts: str = "default", num_prompts: int | None = None) -> dict:
    """T5-encode the prompt set once (content-addressed by prompts and T5 weights)."""
    from wanlite.distill.encode import encode_prompts as run_encoder
    from wanlite.prompts import iter_prompts

    chosen = list(islice(iter_prompts(prompts), num_prompts)) if num_prompts else prompts
    return run_encoder(teacher_uri, chosen, store, progress=False)


def teacher_data(
    teacher_uri: str,
    embeddings_uri: str,
    store: str,
    preset: str,
    sample_steps: int,
    seed: int = 0,
    samples_per_prompt: int = 1,
) -> dict[str, Any]:
    """Sample `samples_per_prompt` clean latents per prompt with the teacher at the preset's image size."""
    from wanlite.distill.teacher_data import teacher_data as sample_teacher

    image_size = get_preset(preset).image_size
    return sample_teacher(
        teacher_uri, embeddings_uri, store, image_size=image_size, steps=sample_steps, seed=seed,
        samples_per_prompt=samples_per_prompt, progress=False,
    )  # fmt: skip


def project(
    teacher_uri: str,
    data_uri: str,
    embeddings_uri: str,
    store: str,
    preset: str,
    method: str = "importance",
    expert: str = "low",
    seed: int = 0,
) -> dict[str, Any]:
    """Project the teacher onto the preset's student shape, calibrated on the teacher's own samples."""
    from wanlite.distill.data import EmbeddingSet, LatentSet
    from wanlite.pipeline import local_path
    from wanlite.projection.project import markdown_report, project_student

    st = _store(store)
    inputs = dict(teacher=teacher_uri, data=data_uri, embeddings=embeddings_uri, preset=preset, method=method,
                  expert=expert, seed=seed, calib_samples=CALIB_SAMPLES, calib_timesteps=CALIB_TIMESTEPS)  # fmt: skip
    key = f"students/{input_key('project', **inputs)}/init"
    result = _published(st, key)
    if result is not None:
        return result
    data, emb = LatentSet.load(data_uri), EmbeddingSet.load(embeddings_uri)
    n = min(CALIB_SAMPLES, len(data))
    with tempfile.TemporaryDirectory(prefix="wanlite-project-") as tmp:
        report = project_student(
            local_path(teacher_uri),
            preset,
            out_dir=Path(tmp) / "student",
            method=method,
            expert=expert,
            seed=seed,
            calib_samples=n,
            timesteps_per_sample=CALIB_TIMESTEPS,
            calib_latents=data.latents[:n, :, 0],
            calib_context=emb.context(data.prompt_index[:n]),
        )
        summary = {k: report[k] for k in ("totals", "seeded_from")}
        summary["markdown"] = markdown_report(report)
        return _publish(st, key, Path(tmp) / "student", summary, "wanlite-student-init")


def train(
    teacher_uri: str,
    data_uri: str,
    embeddings_uri: str,
    init_uri: str,
    store: str,
    tracking_uri: str,
    preset: str,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    checkpoint_every: int,
    ema_decay: float,
    guided: bool = True,
    seed: int = 0,
    nproc: int | None = None,
    on_progress: Progress | None = None,
    sample_steps: int = 40,
) -> dict[str, Any]:
    """Distil (or resume, or return the finished run); `nproc` None: every local GPU, else one CPU rank.

    `sample_steps`: the student's recorded sampling steps, also used for the
    teacher-vs-student grid (4 prompts) logged to the training run at its end.
    """
    from wanlite.distill.data import artifact_digest
    from wanlite.distill.launch import distill
    from wanlite.distill.options import TrainConfig, default_run_name, fingerprint
    from wanlite.distill.train import final_result

    nproc = nproc or _local_gpus() or 1
    cfg = TrainConfig(
        teacher=teacher_uri, data=data_uri, embeddings=embeddings_uri, init=init_uri, preset=preset, out=store,
        steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, checkpoint_every=checkpoint_every,
        log_every=max(1, min(10, steps // 4)), ema_decay=ema_decay, cfg=guided, seed=seed, mlflow_uri=tracking_uri,
        resume=True, progress=False, grid_every=steps, grid_steps=sample_steps,
    )  # fmt: skip
    # The run name is what the ranks derive themselves; fixing it up front lets
    # us find a finished run and watch checkpoints appear for progress.
    fp = fingerprint(cfg, nproc, artifact_digest(data_uri), artifact_digest(embeddings_uri))
    cfg = dataclasses.replace(cfg, run_name=default_run_name(cfg, fp))
    run_key = f"runs/{cfg.run_name}"
    st = _store(store)
    done = final_result(st, run_key)
    if done is not None:
        return done
    with _CheckpointWatch(st, run_key, steps, on_progress):
        return distill(cfg, nproc=nproc)


def distill_steps(
    teacher_uri: str,
    student_uri: str,
    embeddings_uri: str,
    store: str,
    tracking_uri: str,
    preset: str,
    few_steps: int,
    steps: int,
    critic_updates: int,
    batch_size: int,
    lr: float,
    checkpoint_every: int,
    seed: int = 0,
    nproc: int | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Turn the distilled student into a `few_steps`-step, CFG-free one (DMD2), or return the finished run."""
    from wanlite.distill.data import artifact_digest
    from wanlite.distill.steps import distill_steps as run_steps
    from wanlite.distill.steps import run_name
    from wanlite.distill.steps_options import StepsConfig
    from wanlite.distill.train import final_result

    nproc = nproc or _local_gpus() or 1
    cfg = StepsConfig(
        teacher=teacher_uri, student=student_uri, embeddings=embeddings_uri, image_size=get_preset(preset).image_size,
        sample_steps=few_steps, out=store, steps=steps, critic_updates=critic_updates, batch_size=batch_size,
        lr=lr, critic_lr=lr, checkpoint_every=checkpoint_every, log_every=max(1, min(10, steps // 4)), seed=seed,
        mlflow_uri=tracking_uri, resume=True, progress=False,
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, run_name=run_name(cfg, nproc, artifact_digest(embeddings_uri)))
    run_key = f"runs/{cfg.run_name}"
    st = _store(store)
    done = final_result(st, run_key)
    if done is not None:
        return done
    with _CheckpointWatch(st, run_key, steps, on_progress):
        return run_steps(cfg, nproc=nproc)


def evaluate(
    student_uri: str,
    teacher_uri: str,
    store: str,
    prompts: str = "held-out",
    num_prompts: int | None = None,
    sample_steps: int = 40,
    guided: bool = True,
    baseline_uri: str | None = None,
) -> dict[str, Any]:
    """Velocity error, Fréchet distance and an image grid; raise StepError when the gate fails.

    `guided`: the student was distilled on CFG-guided targets, so it is compared with the guided teacher.
    `baseline_uri`: the run's projected init, which the student must beat (as it must beat predicting zero).
    """
    from wanlite.evaluate import evaluate as run_evaluation
    from wanlite.evaluate import GRID_PNG, markdown_report

    st = _store(store)
    inputs = dict(student=student_uri, teacher=teacher_uri, prompts=prompts, n=num_prompts, steps=sample_steps,
                  guided=guided, baseline=baseline_uri)  # fmt: skip
    key = f"evals/{input_key('evaluate', **inputs)}"
    result = _published(st, key)
    if result is None:
        with tempfile.TemporaryDirectory(prefix="wanlite-eval-") as tmp:
            report = run_evaluation(
                student_uri, teacher_uri, out_dir=tmp, prompts=prompts, num_prompts=num_prompts,
                steps=sample_steps, guided=guided, baseline=baseline_uri,
            )  # fmt: skip
            summary = {
                "passed": report["passed"],
                "score": report["score"],
                "metrics": report["metrics"],
                "grid": report.get("grid"),
                "markdown": markdown_report(report, grid_uri=f"{st.uri(key)}/{GRID_PNG}"),
            }
            result = _publish(st, key, Path(tmp), summary, "evaluation")
    if not result["passed"]:
        raise StepError(f"evaluation of {student_uri} failed its gate; see {result['uri']}", result)
    return result


def round_trip(student_uri: str, teacher_uri: str, store: str) -> dict[str, Any]:
    """Reload the student in a fresh process with stock diffusers; raise StepError unless identical."""
    from wanlite.roundtrip import roundtrip

    st = _store(store)
    key = f"roundtrips/{input_key('round-trip', student=student_uri)}"
    result = _published(st, key)
    if result is None:
        # The teacher is hidden from the reloading process only when it is a local
        # directory; a store URI is never visible to it in the first place.
        hidden = teacher_uri if "://" not in teacher_uri else None
        report = roundtrip(student_uri, teacher=hidden)
        with tempfile.TemporaryDirectory(prefix="wanlite-roundtrip-") as tmp:
            Path(tmp, ROUNDTRIP_REPORT).write_text(json.dumps(report, indent=2))
            summary = {k: report[k] for k in ("passed", "exact", "max_abs_diff", "dtype")}
            result = _publish(st, key, Path(tmp), summary, "roundtrip")
    if not result["passed"]:
        raise StepError(f"round-trip of {student_uri} failed; see {result['uri']}", result)
    return result


ROUNDTRIP_REPORT = "roundtrip.json"


def export(student_uri: str, store: str, teacher_sha256: str | None = None, dtype: str = "bf16") -> dict[str, Any]:
    """Write the ComfyUI single file (+ its report) under a key fixed by the student and dtype."""
    from wanlite.export import EXPORT_REPORT, export_student

    st = _store(store)
    key = f"exports/{input_key('export', student=student_uri, dtype=dtype, teacher=teacher_sha256)}"
    manifest = st.read_manifest(key)
    if manifest is not None:
        report = json.loads(st.get_bytes(f"{key}/{EXPORT_REPORT}"))
        return {**_export_summary(report), "uri": st.uri(key)}
    report = export_student(student_uri, st.uri(key), dtype=dtype, teacher_sha256=teacher_sha256)
    return {**_export_summary(report), "uri": st.uri(key)}


def _export_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    summary = {"file": report["file"], "sha256": report["sha256"], "dtype": report["dtype"]}
    if report.get("workflow"):  # exports written before workflows existed have none
        summary.update(workflow=report["workflow"], sampling=report["sampling"])
    return summary


def register(
    student_uri: str,
    export_uri: str,
    roundtrip_uri: str,
    eval_uri: str,
    tracking_uri: str,
    preset: str,
    teacher_sha256: str | None = None,
    data_hash: str | None = None,
    training_run_id: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Gate on every report, then create (or find: `registry.register` is idempotent) the model version.

    `training_run_id`: the MLflow run that trained the student; the version links to it.
    `name`: the registered model (default `wanlite-<preset>`; the few-step student's is its own).
    """
    from wanlite import registry
    from wanlite.evaluate import REPORT_JSON as EVAL_REPORT
    from wanlite.pipeline import local_path

    shipment = registry.check_shipment(
        student_uri,
        export_uri,
        roundtrip_report=local_path(roundtrip_uri) / ROUNDTRIP_REPORT,
        eval_report=local_path(eval_uri) / EVAL_REPORT,
    )
    return registry.register(
        shipment, tracking_uri=tracking_uri, preset=preset, teacher_sha256=teacher_sha256, data_hash=data_hash,
        training_run_id=training_run_id,
        name=name,
    )  # fmt: skip


def few_step_model_name(preset: str, few_steps: int) -> str:
    """The registered model of a run's few-step student: `wanlite-<preset>-<K>step`."""
    return f"wanlite-{preset}-{few_steps}step"


def best_alias(registration: Mapping[str, Any]) -> str:
    """The alias to tell users to download: `champion` when this version holds it."""
    aliases = registration["aliases"]
    return "champion" if "champion" in aliases else aliases[0]


# --- helpers -------------------------------------------------------------------------------------


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class _CheckpointWatch:
    """Report training progress from the checkpoints that appear in the store (any number of ranks).

    The trainer may run in torchrun child processes, so the only progress signal
    every launch mode shares is the store; polling it costs one listing per period.
    """

    def __init__(self, store: Any, run_key: str, total: int, on_progress: Progress | None, period_s: float = 5.0):
        self.store, self.run_key, self.total, self.callback, self.period = store, run_key, total, on_progress, period_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="wanlite-progress", daemon=True)

    def __enter__(self) -> _CheckpointWatch:
        if self.callback is not None:
            self.thread.start()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.stop.set()
        if self.callback is not None:
            self.thread.join()
            if exc_type is None:
                self.callback(self.total, self.total)

    def _loop(self) -> None:
        from wanlite.distill.checkpointing import latest_checkpoint

        last = -1
        while not self.stop.wait(self.period):
            try:
                found = latest_checkpoint(self.store, self.run_key)
            except Exception as err:  # progress is best-effort; training must not die of it
                log.debug("progress poll failed: %s", err)
                continue
            step = found[0] if found else 0
            if step != last:
                last = step
                self.callback(step, self.total)


# --- the wiring ----------------------------------------------------------------------------------

ADAPTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "fetch": fetch,
    "validate": validate,
    "encode-prompts": encode_prompts,
    "teacher-data": teacher_data,
    "project": project,
    "train": train,
    "evaluate": evaluate,
    "round-trip": round_trip,
    "export": export,
    "register": register,
    "distill-steps": distill_steps,
    "evaluate-few-step": evaluate,
    "round-trip-few-step": round_trip,
    "export-few-step": export,
    "register-few-step": register,
}


def wire(step: str, spec: RunSpec, out: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The arguments of `step`, from the run spec and the manifests of the steps before it.

    `spec` must be `resolved()`: every step of a run uses the same store and tracking URI.
    """
    store = spec.store
    if step == "fetch":
        return {"teacher": spec.teacher, "store": store}
    teacher = out["fetch"]["uri"]
    if step == "validate":
        return {"teacher_uri": teacher, "store": store}
    if step == "encode-prompts":
        return {"teacher_uri": teacher, "store": store, "prompts": spec.train_prompts, "num_prompts": spec.num_prompts}
    embeddings = out["encode-prompts"]["uri"]
    if step == "teacher-data":
        return {"teacher_uri": teacher, "embeddings_uri": embeddings, "store": store, "preset": spec.preset,
                "sample_steps": spec.sample_steps, "seed": spec.seed,
                "samples_per_prompt": spec.samples_per_prompt}  # fmt: skip
    data = out["teacher-data"]["uri"]
    if step == "project":
        return {"teacher_uri": teacher, "data_uri": data, "embeddings_uri": embeddings, "store": store,
                "preset": spec.preset, "method": spec.projection_method, "expert": spec.projection_expert,
                "seed": spec.seed}  # fmt: skip
    if step == "train":
        return {"teacher_uri": teacher, "data_uri": data, "embeddings_uri": embeddings,
                "init_uri": out["project"]["uri"], "store": store, "tracking_uri": spec.tracking_uri,
                "preset": spec.preset, "steps": spec.steps, "batch_size": spec.batch_size, "lr": spec.lr,
                "warmup_steps": spec.warmup_steps, "checkpoint_every": spec.checkpoint_every,
                "ema_decay": spec.ema_decay, "guided": spec.guided, "seed": spec.seed, "nproc": spec.nproc,
                "sample_steps": spec.sample_steps}  # fmt: skip
    student = out["train"]["student_uri"]
    if step == "distill-steps":
        return {"teacher_uri": teacher, "student_uri": student, "embeddings_uri": embeddings, "store": store,
                "tracking_uri": spec.tracking_uri, "preset": spec.preset, "few_steps": spec.few_steps,
                "steps": spec.few_step_updates, "critic_updates": spec.few_step_critic_updates,
                "batch_size": spec.batch_size, "lr": spec.few_step_lr, "checkpoint_every": spec.checkpoint_every,
                "seed": spec.seed, "nproc": spec.nproc}  # fmt: skip
    # The few-step branch ships its student through the same steps, under its own step names.
    few = step.endswith(FEW_STEP_SUFFIX)
    base = step.removesuffix(FEW_STEP_SUFFIX)
    if few:
        student = out["distill-steps"]["student_uri"]
    names = {k: k + FEW_STEP_SUFFIX if few else k for k in ("evaluate", "round-trip", "export")}
    if base == "evaluate":
        # The guided teacher is the reference of both students (each folded CFG in); each samples as it records.
        return {"student_uri": student, "teacher_uri": teacher, "store": store, "prompts": spec.eval_prompts,
                "num_prompts": spec.num_eval_prompts, "sample_steps": spec.sample_steps,
                "guided": spec.guided or few,
                # Both students must beat the projection they started from. Not the 40-step student for the
                # few-step one: DMD trains its samples, not its velocity at every sigma, so that bar is not its.
                "baseline_uri": out["project"]["uri"]}  # fmt: skip
    if base == "round-trip":
        return {"student_uri": student, "teacher_uri": teacher, "store": store}
    teacher_sha = out["fetch"]["teacher_sha256"]
    if base == "export":
        return {"student_uri": student, "store": store, "teacher_sha256": teacher_sha, "dtype": spec.export_dtype}
    if base == "register":
        name = few_step_model_name(spec.preset, spec.few_steps) if few else None
        trained = out["distill-steps" if few else "train"]
        return {"student_uri": student, "export_uri": out[names["export"]]["uri"],
                "roundtrip_uri": out[names["round-trip"]]["uri"], "eval_uri": out[names["evaluate"]]["uri"],
                "tracking_uri": spec.tracking_uri, "preset": spec.preset, "teacher_sha256": teacher_sha,
                "data_hash": out["teacher-data"]["digest"], "name": name,
                "training_run_id": trained.get("mlflow_run_id")}  # fmt: skip
    raise ConfigError(f"step: unknown step {step!r}; the DAG is {' -> '.join(STEPS)}")


def run_dag(
    spec: RunSpec, *, on_step: Callable[[str, dict[str, Any]], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Run every step in this process, in order; the first failure raises and nothing after it runs."""
    spec = spec.resolved()
    outputs: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        log.info("step %s", step)
        outputs[step] = ADAPTERS[step](**wire(step, spec, outputs))
        if on_step is not None:
            on_step(step, outputs[step])
    return outputs
