"""`@flow(name="distill")`: the orchestrator of the wanlite DAG.

    prefect deployment run distill/lite-1024
    prefect deployment run distill/lite-1024 --param preset=tiny --param teacher=synthetic:tiny

It runs on the cheap CPU pool and calls each step through its own deployment
(`<step>/<step_deployment>`, own image and pool) with `run_deployment`; with
`step_deployment=None` the step flows run in-process as subflows instead. Each
call is a task with the cross-run cache policy, so a re-run with the same
inputs is answered from the cache without starting the child at all. The
orchestrator checks every child's final state (run_deployment does not raise)
and stops at the first failure: nothing downstream runs, nothing is registered.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.runtime import flow_run, task_run

from flows.common import (
    RESULT_SERIALIZER,
    STEP_CACHE,
    STEP_TASK_OPTIONS,
    StepFailed,
    markdown_table,
)
from flows.steps import STEP_FLOWS
from wanlite import dag
from wanlite.mlflow_uri import redact_uri

POLL_S = 2.0


@task(name="run-step", task_run_name="{step}", **STEP_TASK_OPTIONS)
def run_step(step: str, params: dict[str, Any], step_deployment: str | None) -> dict[str, Any]:
    """Run one step and return its manifest; raise StepFailed unless the child Completed.

    The idempotency key names the orchestrator run, its attempt and this
    task's attempt: submitting the same attempt twice attaches to the child
    already started instead of duplicating it, while a retry (of this task
    after a crashed child, or of the whole run from the UI) starts a fresh
    child. Steps that already completed are served from the cache on a retry.
    """
    if step_deployment is None:
        return STEP_FLOWS[step](**params)
    child = run_deployment(
        f"{step}/{step_deployment}",
        parameters=params,
        idempotency_key=f"{flow_run.id}-{flow_run.run_count}-{step}-{task_run.run_count}",
        poll_interval=POLL_S,
        as_subflow=True,
    )
    state = child.state
    if state is None or not state.is_completed():
        name, message = (state.name, state.message or "") if state else ("without a state", "")
        crashed = state is not None and state.is_crashed()  # infrastructure died: worth another attempt
        raise StepFailed(step, name, f"flow run {child.name} ({child.id}) {message}", transient=crashed)
    return state.result()


@flow(name="distill", persist_result=True, result_serializer=RESULT_SERIALIZER, log_prints=True)
def distill(
    preset: str = "lite-1024",
    teacher: str = "Wan-AI/Wan2.2-T2V-A14B",
    store: str | None = None,
    tracking_uri: str | None = None,
    step_deployment: str | None = "lite-1024",
    refresh_cache: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Distil `teacher` into the `preset` student and register it; returns every step's manifest.

    preset: `tiny` or `lite-1024`. teacher: local path, `s3://…`, hub id, or
    `synthetic:tiny`. store / tracking_uri: default to the worker's
    WANLITE_STORE / MLFLOW_TRACKING_URI, resolved once here so every step uses
    the same. step_deployment: deployment name of the step flows, or null to
    run them in-process. refresh_cache: recompute every step. overrides:
    any other `wanlite.dag.RunSpec` field (steps, batch_size, num_prompts, ...).
    """
    logger = get_run_logger()
    params = {"preset": preset, "teacher": teacher, "store": store, "tracking_uri": tracking_uri, **(overrides or {})}
    spec = dag.RunSpec.from_params(params).resolved()
    via = step_deployment or "subflows"
    logger.info("store %s, MLflow %s, steps via %s", spec.store, redact_uri(spec.tracking_uri), via)
    outputs: dict[str, dict[str, Any]] = {}
    for step in dag.STEPS:
        # fetch's input (a path or hub id) is not content-addressed, so it always
        # runs; it is itself idempotent (it finds an identical teacher in the store).
        policy = NO_CACHE if step == "fetch" else STEP_CACHE
        caller = run_step.with_options(cache_policy=policy, refresh_cache=refresh_cache or None)
        outputs[step] = caller(step, dag.wire(step, spec, outputs), step_deployment)
    create_markdown_artifact(summary_markdown(spec, outputs), key="distill-summary", description=f"{preset} run")
    return outputs


def summary_markdown(spec: dag.RunSpec, outputs: dict[str, dict[str, Any]]) -> str:
    """What a user wants after a run: where the model is, how to get it, and what each step produced."""
    model, exported = outputs["register"], outputs["export"]
    rows = [{"step": step, "output": out.get("uri") or out.get("teacher_uri") or ""} for step, out in outputs.items()]
    return "\n".join(
        [
            f"# wanlite {spec.preset}: `{model['name']}` version {model['version']}",
            "",
            f"- aliases: {', '.join(model['aliases'])}",
            f"- ComfyUI file: `{exported['uri']}/{exported['file']}` (sha256 `{exported['sha256'][:16]}…`)",
            f"- download: `wanlite download models:/{model['name']}@{dag.best_alias(model)} --comfyui PATH`",
            f"- MLflow: [{model['name']} version {model['version']}]({model['version_url']})"
            if model.get("version_url")
            else f"- MLflow (no web server): `mlflow ui --backend-store-uri {redact_uri(spec.tracking_uri)}`",
            "",
            markdown_table(rows),
        ]
    )
