"""Start a training run: in-process for one rank, or `torchrun --standalone` for several on this node.

Multi-node jobs run torchrun themselves (rendezvous flags belong to the
cluster, see infra/) with `-m wanlite.distill.train`; `distill()` called
inside such a process (WORLD_SIZE set) simply trains in-process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from wanlite.config import ConfigError
from wanlite.distill.options import TrainConfig, config_to_argv, default_run_name, fingerprint, validate

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The torchrun job failed; the message says where its error is and how to continue."""


TRAIN_MODULE = "wanlite.distill.train"


def torchrun_command(
    cfg: Any, nproc: int, *, nnodes: int = 1, rendezvous: str | None = None, module: str = TRAIN_MODULE
) -> list[str]:
    """`torchrun ... --nproc-per-node N -m <module> <flags>` with this interpreter.

    `cfg` is the module's config dataclass (`TrainConfig`, or `StepsConfig`
    for `wanlite.distill.steps`), written back as its command-line flags.

    One node: `--standalone`. Several: run this command once per node with the
    same `rendezvous` (`host:port` of the c10d rendezvous store, which the
    first node to arrive hosts) and `nnodes`.
    """
    if rendezvous is None:
        where = ["--standalone"]
    else:
        where = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous}",
                 f"--rdzv-id={cfg.run_name or module.rsplit('.', 1)[-1]}"]  # fmt: skip
    return [
        sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
        "-m", module, *config_to_argv(cfg),
    ]  # fmt: skip


def child_env() -> dict[str, str]:
    """This environment, with the directory holding `wanlite` first on PYTHONPATH.

    The ranks must import the same code as the launcher, also when it runs from
    a checkout that is not installed (tests, a development tree).
    """
    import wanlite

    root = str(Path(wanlite.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def in_process(nproc: int, batch_size: int) -> bool:
    """Whether to train in this process (one rank, or already a torchrun rank); else the launch is checked.

    Refuses a non-positive `nproc` and a global batch it does not divide, before anything starts.
    """
    if nproc < 1:
        raise ConfigError(f"nproc: expected a positive integer, found {nproc}")
    if nproc == 1 or "WORLD_SIZE" in os.environ:
        return True
    if batch_size % nproc:
        raise ConfigError(
            f"batch_size: the global batch {batch_size} is not divisible by --nproc {nproc}; "
            f"choose a multiple of {nproc}"
        )
    return False


def distill(cfg: TrainConfig, *, nproc: int = 1) -> dict[str, Any]:
    """Train (or resume) a student; returns the result manifest (URIs, sha256, final metrics)."""
    validate(cfg)
    if in_process(nproc, cfg.batch_size):
        from wanlite.distill.train import train

        return train(cfg)
    if cfg.run_name is None:  # the ranks derive the same name; we need it to find their result
        from wanlite.distill.data import artifact_digest

        fp = fingerprint(cfg, nproc, artifact_digest(cfg.data), artifact_digest(cfg.embeddings))
        cfg = dataclasses.replace(cfg, run_name=default_run_name(cfg, fp))
    return run_torchrun(cfg, nproc, TRAIN_MODULE, "distill")


def run_torchrun(cfg: Any, nproc: int, module: str, what: str) -> dict[str, Any]:
    """Run `module` on `nproc` local ranks under torchrun and return the run's final manifest.

    The MLflow URI goes to the ranks through the environment, never the
    command line: a command line is readable by every user of the machine (ps).
    """
    from wanlite.distill.train import final_result
    from wanlite.storage import Store

    env = child_env()
    if cfg.mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = cfg.mlflow_uri
        cfg = dataclasses.replace(cfg, mlflow_uri=None)
    command = torchrun_command(cfg, nproc, module=module)
    log.info("launching %s", " ".join(command[:7]))
    status = subprocess.run(command, check=False, env=env).returncode
    if status != 0:
        raise LaunchError(
            f"{what}: torchrun with {nproc} processes exited with status {status}: the failing rank's error is in "
            f"the log above; a run that wrote a checkpoint continues from it when launched again with --resume"
        )
    result = final_result(Store.from_env(cfg.out), f"runs/{cfg.run_name}")
    if result is None:
        raise RuntimeError(f"{what}: torchrun succeeded but runs/{cfg.run_name}/final has no manifest in {cfg.out}")
    return result
