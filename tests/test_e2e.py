"""End to end, as a user runs it: real Prefect server + process worker, MLflow server, S3 on loopback.

`prefect --no-prompt deploy --all` deploys prefect.yaml with every pool pointed
at one process pool; `prefect deployment run distill/lite-1024 --param ...`
triggers the orchestrator with the tiny preset; every step runs as its own flow
run through its own deployment; the model lands in the MLflow registry and
`wanlite download` puts a file in a ComfyUI folder that reloads to the
student's outputs. Then: the same run again is served from the cache, and a
corrupt teacher fails at validate with nothing registered.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.servers import PrefectServer

# A dozen flow runs, each a fresh Python process importing torch and diffusers:
# minutes on 2 idle cores, far more when the cores are shared.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parent.parent
POOL = "e2e-local"
BUCKET = "wanlite-e2e"
MODEL = "wanlite-tiny"
STEP_FLOWS = (
    "fetch", "validate", "encode-prompts", "teacher-data", "project",
    "train", "evaluate", "round-trip", "export", "register",
    "distill-steps", "evaluate-few-step", "round-trip-few-step", "export-few-step", "register-few-step",
)  # fmt: skip


@pytest.fixture(scope="module")
def deployed(
    prefect_server: PrefectServer, moto_server: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """prefect.yaml deployed onto one process pool, with a worker whose runs see the S3 store and MLflow."""
    import boto3

    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    deploy_env = {
        "WANLITE_CODE_DIR": str(ROOT),
        "WANLITE_CPU_POOL": POOL,
        "WANLITE_GPU_POOL": POOL,
        "WANLITE_CPU_IMAGE": "wanlite-cpu:e2e",
        "WANLITE_TRAIN_IMAGE": "wanlite-train-gpu:e2e",
    }
    created = prefect_server.cli("work-pool", "create", POOL, "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    result = prefect_server.cli("--no-prompt", "deploy", "--all", env=deploy_env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    worker_env = {
        "WANLITE_S3_ENDPOINT_URL": moto_server,
        "WANLITE_CACHE": str(tmp_path_factory.mktemp("wanlite-cache")),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "HF_HUB_OFFLINE": "1",
    }
    with prefect_server.worker(POOL, env=worker_env):
        yield {"store": f"s3://{BUCKET}/store", "tracking_uri": mlflow_server, "env": worker_env}


def trigger(
    prefect_server: PrefectServer, params: dict[str, str], timeout: float = 1500
) -> subprocess.CompletedProcess:
    """`prefect deployment run distill/lite-1024 --param k=v ... --watch`, exactly as a user types it."""
    args = ["deployment", "run", "distill/lite-1024", "--watch", "--watch-interval", "2"]
    for key, value in params.items():
        args += ["--param", f"{key}={value}"]
    return prefect_server.cli(*args, timeout=timeout)


def flow_run_id(output: str) -> str:
    found = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert found, f"no flow run UUID in the CLI output:\n{output}"
    return found.group(1)


def runs_of(prefect_server: PrefectServer, parent_id: str) -> dict[str, Any]:
    """The orchestrator run, its tasks and its child flow runs (by flow name), read from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter
    from prefect.client.schemas.filters import TaskRunFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}), get_client(sync_client=True) as client:
        parent = client.read_flow_run(parent_id)
        of_parent = TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[parent.id]))
        tasks = client.read_task_runs(task_run_filter=of_parent)
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))
        )
        flows = {f.id: f.name for f in client.read_flows()}
    return {
        "parent": parent,
        "tasks": {t.name: t for t in tasks},
        "children": {flows[c.flow_id]: c for c in children},
    }


def test_distill_deployment_end_to_end(
    prefect_server: PrefectServer, deployed: dict[str, Any], tiny_teacher: Path, tmp_path: Path
) -> None:
    params = {"preset": "tiny", "teacher": str(tiny_teacher), "store": deployed["store"],
              "tracking_uri": deployed["tracking_uri"]}  # fmt: skip
    first = trigger(prefect_server, params)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    run = runs_of(prefect_server, flow_run_id(first.stdout))
    assert run["parent"].state.is_completed()
    assert set(run["children"]) == set(STEP_FLOWS), f"step flow runs: {sorted(run['children'])}"
    assert all(child.state.is_completed() for child in run["children"].values())

    # The model is registered with its alias, and what users download reloads to the student.
    from mlflow import MlflowClient

    version = MlflowClient(deployed["tracking_uri"]).get_model_version_by_alias(MODEL, "champion")
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "models").mkdir(parents=True)
    (comfyui / "main.py").write_text("")
    download = subprocess.run(
        [sys.executable, "-m", "wanlite.cli", "download", f"models:/{MODEL}@champion", "--comfyui", str(comfyui),
         "--tracking-uri", deployed["tracking_uri"]],
        capture_output=True, text=True, env={**prefect_server.env, **deployed["env"]}, check=False,
    )  # fmt: skip
    assert download.returncode == 0, download.stderr[-3000:]
    placed = Path(json.loads(download.stdout)["path"])
    assert placed.parent == comfyui / "models" / "diffusion_models"
    assert_reloads_to_student(placed, run["tasks"], version.tags["student_sha256"])
    few_step = MlflowClient(deployed["tracking_uri"]).get_model_version_by_alias(f"{MODEL}-4step", "champion")
    assert few_step.tags["comfyui_file"] == f"{MODEL}-4step.safetensors"

    # Same inputs again: every step after fetch comes from the cache, no child runs for them.
    second = trigger(prefect_server, params)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
    rerun = runs_of(prefect_server, flow_run_id(second.stdout))
    cached = {name for name, t in rerun["tasks"].items() if t.state.name == "Cached"}
    assert cached == set(STEP_FLOWS) - {"fetch"}, {n: t.state.name for n, t in rerun["tasks"].items()}
    assert set(rerun["children"]) == {"fetch"}
    versions = MlflowClient(deployed["tracking_uri"]).search_model_versions(f"name = '{MODEL}'")
    assert [v.version for v in versions] == [version.version]


def assert_reloads_to_student(export_file: Path, tasks: dict[str, Any], student_sha256: str) -> None:
    """The downloaded ComfyUI file, loaded by stock diffusers, computes exactly the trained student.

    The file holds the student's weights rounded to bf16; the student with its
    weights rounded the same way must give bit-identical fp32 outputs.
    """
    from wanlite.export import dir_sha256, load_export, load_student, read_export
    from wanlite.roundtrip import model_outputs, probe_inputs

    assert read_export(export_file).dtype == "bf16"
    student_uri = tasks["train"].state.result()["student_uri"]
    student, arch, student_dir = load_student(student_uri)
    assert dir_sha256(student_dir) == student_sha256
    with torch.no_grad():
        for param in student.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    reloaded = load_export(export_file, dtype=torch.float32)
    inputs = probe_inputs(arch)
    assert torch.equal(model_outputs(reloaded, inputs), model_outputs(student, inputs))


def test_corrupt_teacher_fails_at_validate_and_registers_nothing(
    prefect_server: PrefectServer, deployed: dict[str, Any], tiny_teacher: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    corrupt = tmp_path / "corrupt-teacher"
    shutil.copytree(tiny_teacher, corrupt)
    config = corrupt / "high_noise_model" / "config.json"
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "num_layers": cfg["num_layers"] + 1}))
    before = {v.version for v in MlflowClient(deployed["tracking_uri"]).search_model_versions(f"name = '{MODEL}'")}

    result = trigger(prefect_server, {"preset": "tiny", "teacher": str(corrupt), "store": deployed["store"],
                                      "tracking_uri": deployed["tracking_uri"]})  # fmt: skip
    assert result.returncode != 0
    run = runs_of(prefect_server, flow_run_id(result.stdout))
    assert run["parent"].state.is_failed()
    assert set(run["children"]) == {"fetch", "validate"}
    assert run["children"]["validate"].state.is_failed()
    after = {v.version for v in MlflowClient(deployed["tracking_uri"]).search_model_versions(f"name = '{MODEL}'")}
    assert after == before


def test_weekly_schedule_creates_runs(prefect_server: PrefectServer, deployed: dict[str, Any]) -> None:
    """The server's scheduler turns distill/lite-1024's cron into Scheduled runs: Sundays 03:00 UTC."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
    from prefect.client.schemas.filters import FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    scheduled = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
    lite = DeploymentFilter(name=DeploymentFilterName(any_=["lite-1024"]))
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}), get_client(sync_client=True) as client:
        for _ in range(60):  # the scheduler service wakes up every few seconds
            runs = client.read_flow_runs(flow_run_filter=scheduled, deployment_filter=lite)
            if runs:
                break
            time.sleep(1)
    assert runs, "the scheduler created no run for distill/lite-1024 (see the server log)"
    for run in runs:
        start = run.expected_start_time
        assert (start.weekday(), start.hour, start.minute) == (6, 3, 0), start
