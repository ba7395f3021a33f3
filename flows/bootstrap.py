"""One-shot setup of a Prefect server for wanlite: work pools, shared result storage, deployments.

    python -m flows.bootstrap [--deploy]

Run once per server (infra/compose.yaml runs it as the `bootstrap` service);
re-running updates in place. It creates
- the CPU pool (`$WANLITE_CPU_POOL`, a process pool: the orchestrator and CPU steps);
- the GPU pool (`$WANLITE_GPU_POOL`) from the checked-in base job template for
  `$WANLITE_GPU_POOL_TYPE` (`docker`: infra/prefect/docker-gpu-pool.json, whose
  env defaults are filled from this process's environment so step containers
  reach the store, MLflow and the API; `kubernetes`: infra/k8s/gpu-work-pool.json,
  whose env comes from a Kubernetes Secret instead);
- the `remote-file-system/wanlite-results` block at `$WANLITE_RESULTS_URI`, the
  result storage every container shares (task caching only works across
  containers when they read the same cache records);
- with `--deploy`: every deployment in prefect.yaml (`prefect --no-prompt deploy --all`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.exceptions import ObjectAlreadyExists
from prefect.filesystems import RemoteFileSystem

log = logging.getLogger("wanlite.bootstrap")

ROOT = Path(__file__).resolve().parent.parent
GPU_TEMPLATES = {
    "docker": ROOT / "infra" / "prefect" / "docker-gpu-pool.json",
    "kubernetes": ROOT / "infra" / "k8s" / "gpu-work-pool.json",
}
RESULTS_BLOCK = "wanlite-results"
STEP_ENV = (
    "WANLITE_STORE",
    "WANLITE_S3_ENDPOINT_URL",
    "WANLITE_S3_CHECKSUMS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT",
    "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK",
)
"""What a step container needs that a Docker pool does not pass by itself."""


def required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"bootstrap: environment variable {name} is not set (see infra/README.md)")
    return value


def gpu_template(pool_type: str, env: dict[str, str]) -> dict[str, Any]:
    """The GPU pool's base job template; Docker's `env` default carries the step environment."""
    try:
        path = GPU_TEMPLATES[pool_type]
    except KeyError:
        raise SystemExit(
            f"bootstrap: WANLITE_GPU_POOL_TYPE: expected one of {', '.join(GPU_TEMPLATES)}, found {pool_type!r}"
        ) from None
    template = json.loads(path.read_text())
    if pool_type == "docker":
        props = template["variables"]["properties"]
        props["env"]["default"] = {k: env[k] for k in STEP_ENV if env.get(k)}
        network = env.get("WANLITE_DOCKER_NETWORK")
        if network:
            props["networks"]["default"] = [network]
    return template


def ensure_pool(client: Any, name: str, pool_type: str, template: dict[str, Any] | None) -> str:
    """Create the pool, or update its template if it exists; returns what happened."""
    try:
        client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template or {}))
        return "created"
    except ObjectAlreadyExists:
        if template:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
        return "exists"


def ensure_results_block(uri: str, endpoint: str | None) -> None:
    """Save the shared result storage; credentials stay in the environment, never in the block."""
    settings: dict[str, Any] = {}
    if endpoint:
        settings["client_kwargs"] = {"endpoint_url": endpoint}
    RemoteFileSystem(basepath=uri, settings=settings).save(RESULTS_BLOCK, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.bootstrap", description=__doc__.split("\n")[0])
    parser.add_argument("--deploy", action="store_true", help="also run `prefect --no-prompt deploy --all`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    env = dict(os.environ)
    cpu_pool = required_env("WANLITE_CPU_POOL")
    gpu_pool = required_env("WANLITE_GPU_POOL")
    gpu_type = env.get("WANLITE_GPU_POOL_TYPE", "docker")
    with get_client(sync_client=True) as client:
        log.info("pool %s (process): %s", cpu_pool, ensure_pool(client, cpu_pool, "process", None))
        if gpu_pool != cpu_pool:
            result = ensure_pool(client, gpu_pool, gpu_type, gpu_template(gpu_type, env))
            log.info("pool %s (%s): %s", gpu_pool, gpu_type, result)
    results_uri = env.get("WANLITE_RESULTS_URI")
    if results_uri:
        ensure_results_block(results_uri, env.get("WANLITE_S3_ENDPOINT_URL"))
        log.info("result storage remote-file-system/%s -> %s", RESULTS_BLOCK, results_uri)
    if args.deploy:
        cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
        return subprocess.run(cmd, cwd=ROOT, check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
