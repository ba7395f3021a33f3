"""containers/ and infra/ checked as far as tools can without a Docker engine or a cluster.

hadolint lints every Dockerfile; the compose file is validated against the
compose-spec schema (check-jsonschema's vendored copy); the Prefect work-pool
templates are rendered with Prefect's own templating and accepted by a real
Prefect server; every environment variable any of these files reads is
documented in infra/README.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.servers import PrefectServer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCKERFILES = sorted((ROOT / "containers").glob("*.Dockerfile"))
K8S_POOL = ROOT / "infra" / "k8s" / "gpu-work-pool.json"
DOCKER_POOL = ROOT / "infra" / "prefect" / "docker-gpu-pool.json"
README = (ROOT / "infra" / "README.md").read_text()


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path}: not installed; `pip install -e .[dev]` provides it"
    return str(path)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pin_bases_run_unprivileged_and_install_dependencies_before_source(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases, f"{dockerfile.name}: no FROM"
    for base in bases:
        assert "@sha256:" in base or re.search(r":\d+(\.\d+)+[\w.-]*$", base), f"{dockerfile.name}: {base} not pinned"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}, f"{dockerfile.name}: runs as root"
    copies = [line for line in text.splitlines() if line.startswith("COPY")]
    assert "constraints.txt" in copies[0], f"{dockerfile.name}: dependencies must be installed before the source"
    if "COPY wanlite" in text:
        assert text.index("pyproject.toml constraints.txt") < text.index("COPY wanlite")


def test_compose_file_matches_the_compose_spec() -> None:
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "infra" / "compose.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_stack_has_every_service_and_builds_from_our_dockerfiles() -> None:
    compose = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    expected = {"prefect-server", "prefect-db", "mlflow", "mlflow-db", "minio", "worker-cpu", "worker-gpu"}
    assert expected <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (ROOT / "infra" / build["context"] / build["dockerfile"]).is_file(), name
    prefect_env = services["prefect-server"]["environment"]
    assert prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert any(arg.startswith("--backend-store-uri=postgresql://") for arg in services["mlflow"]["command"])


def placeholders(template: Any) -> set[str]:
    from prefect.utilities.templating import find_placeholders

    return {p.name for p in find_placeholders(template)}


@pytest.mark.parametrize("path", [K8S_POOL, DOCKER_POOL], ids=lambda p: p.name)
def test_pool_template_declares_exactly_the_variables_it_uses(path: Path) -> None:
    """An undeclared placeholder is rejected by the server; a declared but unused variable is silently dropped."""
    template = json.loads(path.read_text())
    used = placeholders(template["job_configuration"])
    declared = set(template["variables"]["properties"])
    assert used == declared, f"{path.name}: unused {sorted(declared - used)}, undeclared {sorted(used - declared)}"


def defaults(template: dict[str, Any]) -> dict[str, Any]:
    return {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}


def test_kubernetes_pool_renders_a_gpu_job() -> None:
    from prefect.utilities.templating import apply_values

    template = json.loads(K8S_POOL.read_text())
    job = apply_values(template["job_configuration"], {**defaults(template), "gpu_limit": 8})["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert container["envFrom"] == [{"secretRef": {"name": "wanlite-env"}}]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_docker_pool_passes_gpu_requests_to_docker_py() -> None:
    from prefect.utilities.templating import apply_values

    template = json.loads(DOCKER_POOL.read_text())
    job = apply_values(template["job_configuration"], defaults(template))
    request = job["container_create_kwargs"]["device_requests"][0]
    assert request["driver"] == "nvidia" and request["capabilities"] == [["gpu"]]
    assert job["container_create_kwargs"]["shm_size"]


def test_pool_templates_are_accepted_by_a_real_prefect_server(prefect_server: PrefectServer) -> None:
    for name, kind, path in (("t-k8s-gpu", "kubernetes", K8S_POOL), ("t-docker-gpu", "docker", DOCKER_POOL)):
        result = prefect_server.cli(
            "work-pool", "create", name, "--type", kind, "--base-job-template", str(path), "--overwrite"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        shown = prefect_server.cli("work-pool", "inspect", name)
        assert "container_create_kwargs" in shown.stdout or "gpu_limit" in shown.stdout


def test_trainjob_and_torchrun_launcher_are_well_formed() -> None:
    job = yaml.safe_load((ROOT / "infra" / "k8s" / "trainjob.yaml").read_text())
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    trainer = job["spec"]["trainer"]
    assert trainer["command"] == ["torchrun", "-m", "wanlite.distill.train"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] >= 1
    from wanlite.distill.options import TrainConfig

    flags = {a.split("=")[0].removeprefix("--").removeprefix("no-").replace("-", "_") for a in trainer["args"]}
    assert flags <= set(TrainConfig.__dataclass_fields__), flags - set(TrainConfig.__dataclass_fields__)
    script = ROOT / "infra" / "torchrun-multinode.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode != 0 and "WANLITE_NNODES" in missing.stderr


def referenced_env_vars() -> dict[str, set[str]]:
    """Every environment variable each infra file reads, by file."""
    files = {
        "infra/compose.yaml": r"\$\{(\w+)",
        "prefect.yaml": r"\{\{\s*\$(\w+)\s*\}\}",
        "infra/torchrun-multinode.sh": r"\$\{(\w+)",
        "infra/stack.env.example": r"^(\w+)=",
        "infra/prefect.env": r"^(\w+)=",
        "flows/bootstrap.py": r"\"((?:WANLITE|PREFECT|AWS|MLFLOW)_\w+)\"",
    }
    found = {f: set(re.findall(p, (ROOT / f).read_text(), re.M)) for f, p in files.items()}
    compose = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())
    for service in compose["services"].values():
        env = service.get("environment") or {}
        found["infra/compose.yaml"] |= {k for k in env if not k.startswith("<<")}
    found["infra/compose.yaml"] |= set(compose["x-wanlite-env"])
    trainjob = yaml.safe_load((ROOT / "infra" / "k8s" / "trainjob.yaml").read_text())
    found["infra/k8s/trainjob.yaml"] = {e["name"] for e in trainjob["spec"]["trainer"]["env"]}
    for dockerfile in DOCKERFILES:
        image_env = re.findall(r"^\s+(NVIDIA_\w+|TORCH_\w+)=", dockerfile.read_text(), re.M)
        found[str(dockerfile.relative_to(ROOT))] = set(image_env)
    return found


def test_every_environment_variable_is_documented() -> None:
    documented = set(re.findall(r"^\| `(\w+)` \|", README, re.M))
    missing = {f: sorted(v - documented) for f, v in referenced_env_vars().items() if v - documented}
    assert not missing, f"not in infra/README.md's variable table: {missing}"


def test_bootstrap_creates_pools_and_a_shared_s3_result_store(prefect_server: PrefectServer, moto_server: str) -> None:
    """flows.bootstrap against the real server; then task results and cache records really live in S3."""
    import boto3
    from prefect import flow, task
    from prefect.cache_policies import INPUTS
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )

    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    s3.create_bucket(Bucket="t-results")
    env = {
        "WANLITE_CPU_POOL": "t-boot-cpu",
        "WANLITE_GPU_POOL": "t-boot-gpu",
        "WANLITE_GPU_POOL_TYPE": "kubernetes",
        "WANLITE_RESULTS_URI": "s3://t-results/prefect-results",
        "WANLITE_S3_ENDPOINT_URL": moto_server,
    }
    boot = subprocess.run(
        [sys.executable, "-m", "flows.bootstrap"], cwd=ROOT, env={**prefect_server.env, **env},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert boot.returncode == 0, boot.stdout + boot.stderr
    gpu = prefect_server.cli("work-pool", "inspect", "t-boot-gpu")
    assert "nvidia.com/gpu" in gpu.stdout and "kubernetes" in gpu.stdout
    assert prefect_server.cli("work-pool", "inspect", "t-boot-cpu").returncode == 0

    calls = []

    @task(cache_policy=INPUTS)
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    @flow
    def uses_cache(x: int) -> int:
        return square(x)

    settings = {
        PREFECT_API_URL: prefect_server.api_url,
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: "remote-file-system/wanlite-results",
        PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
    }
    with temporary_settings(settings):
        assert uses_cache(7) == 49 and uses_cache(7) == 49
    assert calls == [7], "the second run must be served from the S3-backed cache"
    stored = s3.list_objects_v2(Bucket="t-results", Prefix="prefect-results/").get("KeyCount", 0)
    assert stored >= 1
