"""`wanlite demo`: the whole DAG, end to end, on this machine, with nothing else running.

It runs the same step adapters the Prefect flows wrap (`wanlite.dag`), in this
process and in DAG order, so a fresh machine needs no server, no Docker and no
Prefect: the store is a local directory and MLflow a local SQLite file. The
orchestrated path (`wanlite stack up`, then `prefect deployment run
distill/tiny`) runs exactly these adapters, one flow run per step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from wanlite import dag

REGISTRY_EXPERIMENT = "wanlite"
"""Experiment `wanlite.registry.register` logs to by default."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole DAG on the tiny preset, locally (no servers needed)",
        description=(
            "Fetch (or synthesise) a teacher, validate it, encode prompts, sample teacher latents, project, "
            "distil, evaluate, round-trip, export the ComfyUI file and register it in MLflow; then turn the "
            "student into a 4-step, CFG-free one (distill-steps) and ship that too, as its own registered "
            "model wanlite-<preset>-4step; all in this process, with a local store and a local SQLite MLflow under --workdir. Re-running with the same "
            "inputs reuses every finished step from the store. Prints where the ComfyUI file is and how to "
            "open the MLflow UI."
        ),
    )
    parser.add_argument(
        "--teacher",
        default=dag.SYNTHETIC_PREFIX + "tiny",
        help="teacher checkpoint: directory, s3:// URI, hub id, or synthetic:tiny (default: synthesise one)",
    )
    parser.add_argument("--preset", default="tiny", help="student preset (default tiny: minutes on a CPU)")
    parser.add_argument(
        "--workdir", type=Path, default=Path(".wanlite/demo"), help="store, MLflow database and artifacts"
    )
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (default: the preset's)")
    parser.set_defaults(func=run)


def prepare_mlflow(tracking_uri: str, artifacts: Path) -> None:
    """Create the run experiments with artifacts under the workdir.

    A SQLite-only MLflow otherwise puts artifacts in `./mlruns` of whatever
    directory the command happens to run in.
    """
    from mlflow import MlflowClient

    from wanlite.distill.steps_options import DEFAULT_EXPERIMENT as STEPS_EXPERIMENT
    from wanlite.distill.tracking import DEFAULT_EXPERIMENT
    from wanlite.mlflow_uri import ensure_experiment, prepare_tracking

    prepare_tracking(tracking_uri)  # a fresh database's schema, created once even when two demos start together
    client = MlflowClient(tracking_uri=tracking_uri)
    for name in (DEFAULT_EXPERIMENT, STEPS_EXPERIMENT, REGISTRY_EXPERIMENT):
        ensure_experiment(client, name, (artifacts / name).absolute().as_uri())


def run(args: argparse.Namespace) -> int:
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    prepare_mlflow(tracking_uri, workdir / "mlartifacts")
    spec = dag.RunSpec(
        preset=args.preset,
        teacher=args.teacher,
        store=(workdir / "store").as_uri(),
        tracking_uri=tracking_uri,
        steps=args.steps,
    )
    clock = {"t": time.monotonic()}

    def on_step(step: str, result: dict[str, Any]) -> None:
        now = time.monotonic()
        index = dag.STEPS.index(step) + 1
        where = result.get("uri") or result.get("student_uri", "")
        print(f"[{index}/{len(dag.STEPS)}] {step:<15} done in {now - clock['t']:6.1f} s  {where}")
        clock["t"] = now

    print(f"wanlite demo: {args.preset} preset, teacher {args.teacher}, working in {workdir}")
    try:
        outputs = dag.run_dag(spec, on_step=on_step)
    except dag.StepError as err:  # a negative verdict (invalid teacher, failed gate): its report says why
        print(f"wanlite demo: stopped, nothing registered: {err}", file=sys.stderr)
        return 1
    print_summary(outputs, workdir, tracking_uri)
    return 0


def print_summary(outputs: dict[str, dict[str, Any]], workdir: Path, tracking_uri: str) -> None:
    for suffix, what in (("", "the student"), (dag.FEW_STEP_SUFFIX, "the few-step, CFG-free student")):
        exported, model = outputs["export" + suffix], outputs["register" + suffix]
        comfy_file = Path(exported["uri"].removeprefix("file://")) / exported["file"]
        alias = dag.best_alias(model)
        print()
        print(f"{what}:")
        print(f"ComfyUI file:     {comfy_file}")
        print("                  (copy it to ComfyUI/models/diffusion_models/, or use `wanlite download` below)")
        if exported.get("workflow"):
            print(f"ComfyUI workflow: {exported['workflow'].removeprefix('file://')}")
            print(f"                  (its sampling: {exported['sampling']['steps']} steps, shift "
                  f"{exported['sampling']['shift']:g}, cfg {exported['sampling']['guidance']:g})")  # fmt: skip
        print(f"registered model: models:/{model['name']}@{alias} (version {model['version']})")
        print(f"download:         wanlite download models:/{model['name']}@{alias} --comfyui PATH \\")
        print(f"                    --tracking-uri {tracking_uri}")
    print()
    print(f"MLflow UI:        mlflow ui --backend-store-uri {tracking_uri} --port 5000")
    print("                  then open http://127.0.0.1:5000")
    print(f"everything else:  {workdir}")
