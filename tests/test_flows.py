"""The Prefect layer: DAG wiring matches the flows, prefect.yaml matches the flows, retries only on transient errors."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.servers import PrefectServer
from wanlite import dag

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = yaml.safe_load((ROOT / "prefect.yaml").read_text())
GPU_STEPS = {"encode-prompts", "teacher-data", "project", "train", "evaluate", "distill-steps", "evaluate-few-step"}


def fake_outputs() -> dict[str, dict[str, Any]]:
    """Manifests with every field `wire` reads, as the steps return them."""
    return {
        "fetch": {"uri": "s3://b/teachers/abc", "teacher_sha256": "t" * 64},
        "encode-prompts": {"uri": "s3://b/embeddings/e"},
        "teacher-data": {"uri": "s3://b/data/d", "digest": "d" * 64},
        "project": {"uri": "s3://b/students/p/init"},
        "train": {"student_uri": "s3://b/runs/r/final"},
        "evaluate": {"uri": "s3://b/evals/v"},
        "round-trip": {"uri": "s3://b/roundtrips/x"},
        "export": {"uri": "s3://b/exports/y"},
        "distill-steps": {"student_uri": "s3://b/runs/s/final"},
        "evaluate-few-step": {"uri": "s3://b/evals/w"},
        "round-trip-few-step": {"uri": "s3://b/roundtrips/z"},
        "export-few-step": {"uri": "s3://b/exports/q"},
    }


def test_every_step_flow_takes_exactly_what_the_dag_wires_to_it() -> None:
    from flows.steps import STEP_FLOWS

    assert tuple(STEP_FLOWS) == dag.STEPS
    spec = dag.RunSpec(store="s3://b", tracking_uri="http://127.0.0.1:5000")
    for step, step_flow in STEP_FLOWS.items():
        assert step_flow.name == step
        wired = dag.wire(step, spec, fake_outputs())
        assert set(wired) == set(inspect.signature(step_flow.fn).parameters), step
        adapter = set(inspect.signature(dag.ADAPTERS[step]).parameters) - {"on_progress"}
        assert set(wired) == adapter, step


def test_run_spec_rejects_unknown_parameters_by_name() -> None:
    with pytest.raises(ValueError, match="unknown stepz"):
        dag.RunSpec.from_params({"preset": "tiny", "stepz": 3})


def test_prefect_yaml_declares_the_orchestrator_and_one_deployment_per_step() -> None:
    from flows.steps import STEP_FLOWS

    deployments = PREFECT_YAML["deployments"]
    entrypoints = {d["entrypoint"].split(":")[1]: d for d in deployments if d["name"] == "lite-1024"}
    for step, step_flow in STEP_FLOWS.items():
        assert step_flow.fn.__name__ in entrypoints, f"no {step}/lite-1024 deployment"
    lite = entrypoints["distill"]
    assert lite["schedules"][0]["cron"] == "0 3 * * 0"
    assert lite["concurrency_limit"]["limit"] == 1
    assert lite["parameters"]["preset"] == "lite-1024"
    tiny = next(d for d in deployments if d["name"] == "tiny")
    assert tiny["parameters"]["preset"] == "tiny" and tiny["entrypoint"] == "flows/distill.py:distill"
    for step, step_flow in STEP_FLOWS.items():
        pool = entrypoints[step_flow.fn.__name__]["work_pool"]
        if step in GPU_STEPS:
            assert pool["name"] == "{{ $WANLITE_GPU_POOL }}"
            kwargs = pool["job_variables"]["container_create_kwargs"]
            assert kwargs["device_requests"][0]["capabilities"] == [["gpu"]] and kwargs["shm_size"]
            assert pool["job_variables"]["gpu_limit"] >= 1
        else:
            assert pool["name"] == "{{ $WANLITE_CPU_POOL }}"


def test_transient_failures_are_told_apart_from_bad_input() -> None:
    import botocore.exceptions

    from flows.common import StepFailed, is_transient
    from wanlite.storage import StoreError

    try:
        try:
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        except botocore.exceptions.EndpointConnectionError as err:
            raise StoreError("reading s3://b/k: cannot reach it", uri="s3://b/k") from err
    except StoreError as wrapped:
        assert is_transient(wrapped)
    assert is_transient(ConnectionResetError("peer reset"))
    assert not is_transient(ValueError("teacher config.json: dim expected 5120, found 4096"))
    assert not is_transient(dag.StepError("teacher is invalid", {}))
    assert is_transient(StepFailed("train", "Crashed", "pod evicted", transient=True))
    assert not is_transient(StepFailed("validate", "Failed", "invalid teacher", transient=False))


def test_retries_apply_to_transient_failures_only(prefect_server: PrefectServer) -> None:
    """Real task runs on the real server: a flaky network call is retried, bad input fails at once."""
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.steps import step_task

    calls = {"flaky": 0, "bad": 0}

    def flaky() -> dict:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionResetError("connection reset by peer")
        return {"ok": True}

    def bad() -> dict:
        calls["bad"] += 1
        raise ValueError("config.json: dim: expected 128, found 129")

    @flow
    def flaky_flow() -> dict:
        return step_task("flaky", flaky, retry_delay_seconds=0, cache_policy=None, persist_result=False)()

    @flow
    def bad_flow() -> dict:
        return step_task("bad", bad, retry_delay_seconds=0, cache_policy=None, persist_result=False)()

    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        assert flaky_flow() == {"ok": True}
        with pytest.raises(ValueError, match="dim: expected 128"):
            bad_flow()
    assert calls == {"flaky": 3, "bad": 1}


def test_code_fingerprint_is_a_stable_sha256_of_the_package() -> None:
    from flows.common import code_fingerprint

    first = code_fingerprint()
    code_fingerprint.cache_clear()
    assert code_fingerprint() == first and len(first) == 64


def test_demo_stops_at_an_invalid_teacher_and_registers_nothing(tiny_teacher: Path, tmp_path: Path) -> None:
    """`wanlite demo` on a corrupt teacher: fetch, then validate says why, exit 1, empty registry."""
    import json
    import shutil
    import subprocess
    import sys

    from mlflow import MlflowClient

    corrupt = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, corrupt)
    config = corrupt / "low_noise_model" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "ffn_dim": 7}))
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "wanlite.cli", "demo", "--teacher", str(corrupt), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[1/15] fetch" in result.stdout and "[2/15]" not in result.stdout
    assert "nothing registered" in result.stderr and "invalid" in result.stderr
    report = next((workdir / "store" / "reports" / "validate").glob("*/validation.md")).read_text()
    assert "ffn_dim" in report
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert client.search_registered_models() == []
    assert {e.name for e in client.search_experiments()} >= {"wanlite", "wanlite-distill"}
    ours = [e for e in client.search_experiments() if e.name != "Default"]
    assert all(e.artifact_location.startswith(workdir.as_uri()) for e in ours)


def test_run_summary_links_the_model_version_page_on_an_http_server() -> None:
    from flows.distill import summary_markdown

    outputs = {**fake_outputs(), "export": {"uri": "s3://b/exports/y", "file": "m.safetensors", "sha256": "a" * 64}}
    register = {"name": "wanlite-tiny", "version": "3", "aliases": ["candidate", "champion"]}
    url = "http://mlflow:5000/#/models/wanlite-tiny/versions/3"
    spec = dag.RunSpec(tracking_uri="http://mlflow:5000", store="s3://b")
    linked = summary_markdown(spec, {**outputs, "register": {**register, "version_url": url}})
    assert f"[wanlite-tiny version 3]({url})" in linked
    local = summary_markdown(dataclasses.replace(spec, tracking_uri="sqlite:////x/mlflow.db"),
                             {**outputs, "register": {**register, "version_url": None}})  # fmt: skip
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in local and "](" not in local.split("MLflow")[1]
