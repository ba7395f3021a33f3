"""One Prefect flow per DAG step: a thin, cached, retried wrapper over `wanlite.dag`.

Each flow has its own deployment in prefect.yaml (own pool, own image), takes
store URIs and settings as parameters and returns the step's small JSON
manifest, persisted to the shared result storage so the orchestrator (another
process, maybe another machine) can read it. The step itself runs as a task
with the cross-run cache policy, so re-running a step deployment with the
same inputs is served from the cache even outside the orchestrator.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import INPUTS, TASK_SOURCE

from flows.common import RESULT_SERIALIZER, STEP_TASK_OPTIONS, WanliteCode
from wanlite import dag

HOUR = 3600


def step_task(name: str, fn: Callable[..., dict[str, Any]], **options: Any) -> Any:
    """`fn` as a cached task that retries only transient failures."""
    return task(fn, **{**STEP_TASK_OPTIONS, "name": name, **options})


def step_flow(name: str, timeout_s: float) -> Callable[[Callable[..., Any]], Any]:
    """A step flow: JSON result persisted for the orchestrator, bounded runtime (run_deployment waits forever)."""
    return flow(
        name=name,
        persist_result=True,
        result_serializer=RESULT_SERIALIZER,
        timeout_seconds=timeout_s,
        log_prints=True,
    )


def markdown(result: dict[str, Any], key: str, description: str) -> None:
    create_markdown_artifact(result["markdown"], key=key, description=description)


def lean(result: dict[str, Any]) -> dict[str, Any]:
    """The manifest without its rendered report: what downstream steps and the orchestrator keep."""
    return {k: v for k, v in result.items() if k != "markdown"}


@step_flow("fetch", 24 * HOUR)
def fetch_flow(teacher: str, store: str) -> dict[str, Any]:
    """Copy a teacher (local path, s3:// URI, hub id, or `synthetic:tiny`) into the store, content-addressed."""
    return step_task("fetch", dag.fetch)(teacher=teacher, store=store)


@step_flow("validate", 2 * HOUR)
def validate_flow(teacher_uri: str, store: str) -> dict[str, Any]:
    """Check every teacher tensor by its header; the Markdown report becomes an artifact, valid or not."""
    try:
        result = step_task("validate", dag.validate)(teacher_uri=teacher_uri, store=store)
    except dag.StepError as err:
        markdown(err.result, "validation-report", f"INVALID teacher {teacher_uri}")
        raise
    markdown(result, "validation-report", f"teacher {teacher_uri}")
    return lean(result)


@step_flow("encode-prompts", 12 * HOUR)
def encode_prompts_flow(teacher_uri: str, store: str, prompts: str, num_prompts: int | None) -> dict[str, Any]:
    """Run the teacher's T5 once over the prompt set; embeddings go to the store."""
    return step_task("encode-prompts", dag.encode_prompts)(
        teacher_uri=teacher_uri, store=store, prompts=prompts, num_prompts=num_prompts
    )


@step_flow("teacher-data", 48 * HOUR)
def teacher_data_flow(
    teacher_uri: str,
    embeddings_uri: str,
    store: str,
    preset: str,
    sample_steps: int,
    seed: int,
    samples_per_prompt: int = 1,
) -> dict[str, Any]:
    """Sample clean latents x0 with the teacher (both experts, CFG), samples_per_prompt per prompt."""
    return step_task("teacher-data", dag.teacher_data)(
        teacher_uri=teacher_uri,
        embeddings_uri=embeddings_uri,
        store=store,
        preset=preset,
        sample_steps=sample_steps,
        seed=seed,
        samples_per_prompt=samples_per_prompt,
    )


@step_flow("project", 6 * HOUR)
def project_flow(
    teacher_uri: str,
    data_uri: str,
    embeddings_uri: str,
    store: str,
    preset: str,
    method: str,
    expert: str,
    seed: int,
) -> dict[str, Any]:
    """Initialise the student from the teacher by coherent index selection; report every tensor's source."""
    result = step_task("project", dag.project)(
        teacher_uri=teacher_uri,
        data_uri=data_uri,
        embeddings_uri=embeddings_uri,
        store=store,
        preset=preset,
        method=method,
        expert=expert,
        seed=seed,
    )
    markdown(result, "projection-report", f"{preset} student from {teacher_uri}")
    return lean(result)


TRAIN_CACHE = (INPUTS - "on_progress") + TASK_SOURCE + WanliteCode()
"""The progress callback is not an input of the result (and cannot be hashed)."""


@step_flow("train", 7 * 24 * HOUR)
def train_flow(
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
    guided: bool,
    seed: int,
    nproc: int | None,
    sample_steps: int = 40,
) -> dict[str, Any]:
    """Distil the student (torchrun over every local GPU, FSDP2); progress is a live artifact."""
    artifact = create_progress_artifact(0.0, key="train-progress", description=f"{preset}: {steps} steps")
    context = contextvars.copy_context()

    def on_progress(step: int, total: int) -> None:
        context.run(update_progress_artifact, artifact, 100.0 * step / total)

    return step_task("train", dag.train, cache_policy=TRAIN_CACHE)(
        teacher_uri=teacher_uri,
        data_uri=data_uri,
        embeddings_uri=embeddings_uri,
        init_uri=init_uri,
        store=store,
        tracking_uri=tracking_uri,
        preset=preset,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        checkpoint_every=checkpoint_every,
        ema_decay=ema_decay,
        guided=guided,
        seed=seed,
        nproc=nproc,
        on_progress=on_progress,
        sample_steps=sample_steps,
    )


@step_flow("evaluate", 12 * HOUR)
def evaluate_flow(
    student_uri: str,
    teacher_uri: str,
    store: str,
    prompts: str,
    num_prompts: int | None,
    sample_steps: int,
    guided: bool,
    baseline_uri: str | None = None,
) -> dict[str, Any]:
    """Student vs teacher on held-out prompts: metrics table, image grid link, Markdown report."""
    try:
        result = step_task("evaluate", dag.evaluate)(
            student_uri=student_uri,
            teacher_uri=teacher_uri,
            store=store,
            prompts=prompts,
            num_prompts=num_prompts,
            sample_steps=sample_steps,
            guided=guided,
            baseline_uri=baseline_uri,
        )
    except dag.StepError as err:
        markdown(err.result, "evaluation-report", f"FAILED gate: {student_uri}")
        raise
    rows = [{"metric": k, "value": v} for k, v in {"score": result["score"], **result["metrics"]}.items()]
    create_table_artifact(rows, key="eval-metrics", description=f"{student_uri} vs {teacher_uri}")
    if result.get("grid"):
        grid = f"{result['uri']}/{result['grid']}"
        create_link_artifact(grid, link_text="teacher | student image grid", key="eval-grid")
    markdown(result, "evaluation-report", f"{student_uri}")
    return lean(result)


@step_flow("round-trip", HOUR)
def round_trip_flow(student_uri: str, teacher_uri: str, store: str) -> dict[str, Any]:
    """Reload the saved student in a fresh process with stock diffusers; outputs must match."""
    return step_task("round-trip", dag.round_trip)(student_uri=student_uri, teacher_uri=teacher_uri, store=store)


@step_flow("export", HOUR)
def export_flow(student_uri: str, store: str, teacher_sha256: str | None, dtype: str) -> dict[str, Any]:
    """Write the ComfyUI single file (complete native key set) to the store."""
    return step_task("export", dag.export)(
        student_uri=student_uri, store=store, teacher_sha256=teacher_sha256, dtype=dtype
    )


@step_flow("register", HOUR)
def register_flow(
    student_uri: str,
    export_uri: str,
    roundtrip_uri: str,
    eval_uri: str,
    tracking_uri: str,
    preset: str,
    teacher_sha256: str | None,
    data_hash: str | None,
    training_run_id: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Gate on every report, then create the MLflow model version and its aliases."""
    result = step_task("register", dag.register)(
        student_uri=student_uri,
        export_uri=export_uri,
        roundtrip_uri=roundtrip_uri,
        eval_uri=eval_uri,
        tracking_uri=tracking_uri,
        preset=preset,
        teacher_sha256=teacher_sha256,
        data_hash=data_hash,
        training_run_id=training_run_id,
        name=name,
    )
    link = f"- MLflow: [{result['name']} version {result['version']}]({result['version_url']})\n"
    create_markdown_artifact(
        f"# Registered `{result['name']}` version {result['version']}\n\n"
        f"- aliases: {', '.join(result['aliases'])}\n- URI: `{result['uri']}`\n"
        f"{link if result.get('version_url') else ''}"
        f"- download: `wanlite download models:/{result['name']}@{dag.best_alias(result)} --comfyui PATH`\n",
        key="registered-model",
    )
    return result


@step_flow("distill-steps", 7 * 24 * HOUR)
def distill_steps_flow(
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
    seed: int,
    nproc: int | None,
) -> dict[str, Any]:
    """Turn the distilled student into a K-step, CFG-free one (DMD2, FSDP2); progress is a live artifact."""
    artifact = create_progress_artifact(0.0, key="distill-steps-progress", description=f"{preset}: {few_steps} steps")
    context = contextvars.copy_context()

    def on_progress(step: int, total: int) -> None:
        context.run(update_progress_artifact, artifact, 100.0 * step / total)

    return step_task("distill-steps", dag.distill_steps, cache_policy=TRAIN_CACHE)(
        teacher_uri=teacher_uri,
        student_uri=student_uri,
        embeddings_uri=embeddings_uri,
        store=store,
        tracking_uri=tracking_uri,
        preset=preset,
        few_steps=few_steps,
        steps=steps,
        critic_updates=critic_updates,
        batch_size=batch_size,
        lr=lr,
        checkpoint_every=checkpoint_every,
        seed=seed,
        nproc=nproc,
        on_progress=on_progress,
    )


# The few-step student is shipped by the same steps, as flows of their own (own deployments, own runs).


@step_flow("evaluate-few-step", 12 * HOUR)
def evaluate_few_step_flow(
    student_uri: str,
    teacher_uri: str,
    store: str,
    prompts: str,
    num_prompts: int | None,
    sample_steps: int,
    guided: bool,
    baseline_uri: str | None = None,
) -> dict[str, Any]:
    """The few-step student vs the guided teacher (it samples with its recorded K-step schedule)."""
    return evaluate_flow.fn(student_uri, teacher_uri, store, prompts, num_prompts, sample_steps, guided,
                            baseline_uri=baseline_uri)  # fmt: skip


@step_flow("round-trip-few-step", HOUR)
def round_trip_few_step_flow(student_uri: str, teacher_uri: str, store: str) -> dict[str, Any]:
    """Reload the few-step student in a fresh process with stock diffusers; outputs must match."""
    return round_trip_flow.fn(student_uri, teacher_uri, store)


@step_flow("export-few-step", HOUR)
def export_few_step_flow(student_uri: str, store: str, teacher_sha256: str | None, dtype: str) -> dict[str, Any]:
    """Write the few-step student's ComfyUI file (`...-<K>step.safetensors`, its schedule in the header)."""
    return export_flow.fn(student_uri, store, teacher_sha256, dtype)


@step_flow("register-few-step", HOUR)
def register_few_step_flow(
    student_uri: str,
    export_uri: str,
    roundtrip_uri: str,
    eval_uri: str,
    tracking_uri: str,
    preset: str,
    teacher_sha256: str | None,
    data_hash: str | None,
    training_run_id: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Register the few-step student as its own model (`wanlite-<preset>-<K>step`)."""
    return register_flow.fn(
        student_uri, export_uri, roundtrip_uri, eval_uri, tracking_uri, preset, teacher_sha256, data_hash,
        training_run_id=training_run_id, name=name,
    )  # fmt: skip


STEP_FLOWS = {
    "fetch": fetch_flow,
    "validate": validate_flow,
    "encode-prompts": encode_prompts_flow,
    "teacher-data": teacher_data_flow,
    "project": project_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
    "round-trip": round_trip_flow,
    "export": export_flow,
    "register": register_flow,
    "distill-steps": distill_steps_flow,
    "evaluate-few-step": evaluate_few_step_flow,
    "round-trip-few-step": round_trip_few_step_flow,
    "export-few-step": export_few_step_flow,
    "register-few-step": register_few_step_flow,
}
"""Flow of each DAG step (keys: `wanlite.dag.STEPS`, which are also the flow names)."""
