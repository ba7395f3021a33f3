"""Register a shipped student in MLflow: one run, one model version, aliases by evaluation.

The registry is where users pick a model (`models:/wanlite-tiny@champion`), so
nothing gets there from a failed run: every gate (evaluation passed, export and
round-trip reports present, passing, and about exactly these files) is checked
before MLflow is contacted. The version points at a plain artifact folder
(`model/`: the diffusers folder and the ComfyUI file), created with
`MlflowClient.create_model_version(source=<run artifact uri>/model)` because
`mlflow.register_model` refuses plain folders in MLflow 3.17. It gets the
`candidate` alias, and `champion` only when its evaluation score beats the
current champion's (or there is none) AND both were evaluated under identical
settings (teacher fingerprint, prompts, seeds, sigmas, guided mode, steps,
size, the teacher's precision): scores from different grids are not comparable, so such a version is
registered as a candidate with the reason it was not compared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanlite import __version__
from wanlite.config import CANDIDATE, CHAMPION
from wanlite.evaluate import REPORT_JSON
from wanlite.export import EXPORT_REPORT, dir_sha256, file_sha256, preset_for, read_export, student_arch
from wanlite.model_card import CARD_FILE, mlflow_run_url, mlflow_version_url, model_card
from wanlite.mlflow_uri import ensure_experiment, prepare_tracking
from wanlite.pipeline import local_path
from wanlite.sampling import Sampling, from_header, load_sampling, to_tags
from wanlite.workflow import workflow_path

log = logging.getLogger(__name__)

MODEL_DIR = "model"
"""Run artifact folder the model version points at: `diffusers/` and `comfyui/<file>`."""

SCORE_TAG = "eval_score"
"""Model-version tag holding the evaluation score; lower is better."""

EVAL_SETTINGS_TAG = "eval_settings"
"""Model-version tag: JSON of {setting: sha256 prefix of its value}, what makes two scores comparable."""

COMPARABLE_SETTINGS = ("teacher_fingerprint", "prompts", "seeds", "sigmas", "guided", "steps", "size", "precision")

COMFYUI_FILE_TAG, COMFYUI_SHA_TAG = "comfyui_file", "comfyui_sha256"
COMFYUI_WORKFLOW_TAG = "comfyui_workflow"
"""Model-version tag naming the ComfyUI workflow file beside the export in `model/comfyui/`."""
TRAINING_RUN_TAG, TRAINING_RUN_URL_TAG = "training_run_id", "training_run_url"
REGISTERED_VERSION_TAG = "wanlite.registered_version"
"""Tag set on the training run: the `models:/NAME/VERSION` it produced."""


class RegistryError(ValueError):
    """Registration refused or impossible; the message names the report, field or model."""


@dataclass(frozen=True)
class Shipment:
    """Everything a registration needs, checked to belong together."""

    student_dir: Path
    export_file: Path
    export_report: dict[str, Any]
    roundtrip_report: dict[str, Any]
    eval_report: dict[str, Any]
    grid: Path | None
    eval_dir: Path


def model_name(preset: str) -> str:
    return f"wanlite-{preset}"


def code_version() -> str:
    """wanlite's version, plus the git commit when running from a checkout (`0.1.0+g1a2b3c4`)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+g{commit}" if commit else __version__


# --- the gate --------------------------------------------------------------------------


def read_report(path: str | Path | None, kind: str) -> dict[str, Any]:
    """Load a step report; refuse a missing, unreadable, wrong-kind or failed one, naming it."""
    if path is None:
        raise RegistryError(f"{kind} report: missing; refusing to register a model that has not passed {kind}")
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{kind} report {path}: no such file; refusing to register") from None
    except json.JSONDecodeError as err:
        raise RegistryError(f"{kind} report {path}: not valid JSON ({err})") from None
    if not isinstance(report, dict) or report.get("kind") != kind:
        found = report.get("kind") if isinstance(report, dict) else type(report).__name__
        raise RegistryError(f"{kind} report {path}: expected kind {kind!r}, found {found!r}")
    if report.get("passed") is not True:
        raise RegistryError(f"{kind} report {path}: passed is {report.get('passed')!r}; refusing to register")
    return report


def check_shipment(
    student: str | Path,
    export: str | Path,
    *,
    export_report: str | Path | None = None,
    roundtrip_report: str | Path | None,
    eval_report: str | Path | None,
) -> Shipment:
    """Verify the gates and that every report is about exactly these files (by sha256).

    `export` is the ComfyUI file, or a folder/store URI holding it with its
    `export_report.json` (what `wanlite export --out <URI>` writes);
    `eval_report` is the JSON file, or the evaluation's output folder/store URI.
    """
    student_dir = local_path(student)
    export_file, export_report = _export_paths(export, export_report)
    eval_report = _eval_report_path(eval_report)
    exp = read_report(export_report, "export")
    rt = read_report(roundtrip_report, "roundtrip")
    ev = read_report(eval_report, "evaluate")
    actual = file_sha256(export_file)
    if exp.get("sha256") != actual:
        raise RegistryError(
            f"export report {export_report}: sha256 {exp.get('sha256')!r} does not match {export_file} ({actual})"
        )
    read_export(export_file)
    student_sha = dir_sha256(student_dir)
    exported_from = exp.get("metadata", {}).get("source_sha256")
    for name, found, path in (
        ("export", exported_from, export_report),
        ("roundtrip", rt.get("student_sha256"), roundtrip_report),
        ("evaluate", ev.get("student_sha256"), eval_report),
    ):
        if found != student_sha:
            raise RegistryError(
                f"{name} report {path}: it is about student {found!r}, not the student being registered "
                f"({student_dir}: {student_sha})"
            )
    eval_dir = Path(eval_report).parent
    grid = eval_dir / ev["grid"] if ev.get("grid") else None
    if grid is not None and not grid.is_file():
        raise RegistryError(f"evaluate report {eval_report}: grid {grid} does not exist")
    return Shipment(student_dir, export_file, exp, rt, ev, grid, eval_dir)


def _eval_report_path(report: str | Path | None) -> Path | None:
    if report is None:
        return None
    if "://" in str(report) or Path(report).is_dir():
        return local_path(report) / REPORT_JSON
    return Path(report)


def _export_paths(export: str | Path, report: str | Path | None) -> tuple[Path, Path | None]:
    path = local_path(export)
    if path.is_file():
        return path, report
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise RegistryError(f"{export}: expected one .safetensors export in the folder, found {len(files)}")
    return files[0], report or path / EXPORT_REPORT


# --- MLflow ------------------------------------------------------------------------------


def register(
    shipment: Shipment,
    *,
    tracking_uri: str | None = None,
    preset: str | None = None,
    teacher_sha256: str | None = None,
    data_hash: str | None = None,
    experiment: str = "wanlite",
    params: Mapping[str, str] | None = None,
    training_run_id: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Log the run, create the model version, set aliases; return a registration report.

    `training_run_id`: the MLflow run (on the same tracking server) that trained
    the student; the version links to it and its evaluation is logged there.
    `name`: the registered model (default `model_name(preset)`); a few-step
    student registers under its own (`wanlite-<preset>-<K>step`), so its
    champion is chosen among few-step versions only.
    """
    import mlflow
    from mlflow import MlflowClient

    prepare_tracking(tracking_uri)
    arch = student_arch(shipment.student_dir)
    preset = preset or _preset_name(arch, shipment.student_dir)
    teacher_sha256 = teacher_sha256 or shipment.export_report.get("metadata", {}).get("teacher_sha256")
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=tracking_uri)
    existing = registered_version(client, name or model_name(preset), shipment)
    if existing is not None:  # the same shipment registered again: no second run, no second version
        log.info("%s is already registered as %s", shipment.export_file.name, existing["uri"])
        return existing
    run = client.create_run(
        ensure_experiment(client, experiment, experiment_artifact_location(tracking_uri)), run_name=f"register-{preset}"
    )
    run_id = run.info.run_id
    training = training_run_info(client, training_run_id, tracking_uri)
    card = model_card_for(shipment, arch, preset, model_name(preset), teacher_sha256, data_hash, training)
    try:
        _log_run(client, run_id, shipment, arch_params(arch, preset, teacher_sha256, data_hash, params))
        log_usability(client, run_id, shipment, card)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    report = _create_version(client, run, shipment, name or model_name(preset), teacher_sha256, data_hash)
    return describe_version(client, report, shipment, card, training, tracking_uri)


def registered_version(client: Any, name: str, ship: Shipment) -> dict[str, Any] | None:
    """The version already registered for this shipment (same ComfyUI file, student, score and evaluation
    settings), or None. Returned in `_create_version`'s shape, so callers need not tell the two apart."""
    from mlflow.exceptions import MlflowException

    sha = ship.export_report["sha256"]
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.{COMFYUI_SHA_TAG} = '{sha}'")
    except MlflowException:  # no such model yet
        return None
    same = [
        v for v in found
        if v.tags.get("student_sha256") == ship.roundtrip_report["student_sha256"]
        and v.tags.get(SCORE_TAG) == repr(float(ship.eval_report["score"]))
        and v.tags.get(EVAL_SETTINGS_TAG) == json.dumps(eval_settings(ship.eval_report), sort_keys=True)
    ]  # fmt: skip
    if not same:
        return None
    version = min(same, key=lambda v: int(v.version))
    aliases = list(client.get_model_version(name, version.version).aliases)
    return {"kind": "register", "name": name, "version": version.version, "uri": f"models:/{name}/{version.version}",
            "run_id": version.run_id, "aliases": aliases, "champion": CHAMPION in aliases,
            "not_compared": version.tags.get("not_compared"), "previous_champion": None,
            "existing": True}  # fmt: skip


def arch_params(
    arch: Any, preset: str, teacher_sha256: str | None, data_hash: str | None, extra: Mapping[str, str] | None
) -> dict[str, str]:
    """Run params: preset and architecture first, then provenance, then the caller's."""
    params = {"preset": preset, **{f"arch.{k}": str(v) for k, v in arch.native_config().items() if k[0] != "_"}}
    params.update({"teacher_sha256": teacher_sha256 or "unknown", "data_hash": data_hash or "unknown"})
    params.update({"code_version": code_version(), **{k: str(v) for k, v in (extra or {}).items()}})
    return params


def _log_run(client: Any, run_id: str, ship: Shipment, params: dict[str, str]) -> None:
    from mlflow.entities import Metric, Param

    now_ms = int(time.time() * 1000)
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in params.items()],
        metrics=[Metric(k, v, now_ms, 0) for k, v in eval_metrics(ship.eval_report).items()],
    )
    for name, report in (("export", ship.export_report), ("roundtrip", ship.roundtrip_report)):
        client.log_dict(run_id, report, f"reports/{name}.json")
    client.log_artifacts(run_id, str(ship.eval_dir), "reports/evaluate")
    if ship.grid is not None:
        client.log_artifact(run_id, str(ship.grid), "samples")
    client.log_artifacts(run_id, str(ship.student_dir), f"{MODEL_DIR}/diffusers")
    client.log_artifact(run_id, str(ship.export_file), f"{MODEL_DIR}/comfyui")


def eval_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The evaluation's finite numeric metrics, plus its score."""
    metrics = {k: float(v) for k, v in report.get("metrics", {}).items() if _is_number(v)}
    metrics[SCORE_TAG] = float(report["score"])
    return metrics


def _create_version(
    client: Any, run: Any, ship: Shipment, name: str, teacher_sha256: str | None, data_hash: str | None
) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="wanlite: Wan 2.2 distilled into a small T2I model")
    score = float(ship.eval_report["score"])
    tags = {
        "teacher_sha256": teacher_sha256 or "unknown",
        "data_hash": data_hash or "unknown",
        "code_version": code_version(),
        "student_sha256": ship.roundtrip_report["student_sha256"],
        COMFYUI_FILE_TAG: ship.export_file.name,
        COMFYUI_SHA_TAG: ship.export_report["sha256"],
        "export_dtype": ship.export_report["dtype"],
        SCORE_TAG: repr(score),
        EVAL_SETTINGS_TAG: json.dumps(eval_settings(ship.eval_report), sort_keys=True),
        **{f"eval.{k}": repr(v) for k, v in eval_metrics(ship.eval_report).items() if k != SCORE_TAG},
    }
    source = f"{run.info.artifact_uri}/{MODEL_DIR}"
    version = client.create_model_version(name, source=source, run_id=run.info.run_id, tags=tags)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    previous = _champion(client, name)
    not_compared = None if previous is None else incomparable(eval_settings(ship.eval_report), previous[2])
    promoted = previous is None or (not_compared is None and score < previous[1])
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    elif not_compared is not None:
        not_compared = f"not compared with champion version {previous[0]}: {not_compared}"
        client.set_model_version_tag(name, version.version, "not_compared", not_compared)
        log.warning("%s version %s: %s", name, version.version, not_compared)
    log.info("registered %s version %s (score %.4g, champion: %s)", name, version.version, score, promoted)
    return {
        "kind": "register",
        "name": name,
        "version": version.version,
        "uri": f"models:/{name}/{version.version}",
        "run_id": run.info.run_id,
        "source": source,
        "score": score,
        "aliases": [CANDIDATE, CHAMPION] if promoted else [CANDIDATE],
        "champion": promoted,
        "previous_champion": None if previous is None else {"version": previous[0], "score": previous[1]},
        "not_compared": not_compared,
        "tags": tags,
    }


def eval_settings(report: Mapping[str, Any]) -> dict[str, str | None]:
    """{setting: sha256 prefix of its JSON value} for the settings that make scores comparable (None: absent)."""
    return {
        key: _digest(report[key]) if key in report else None for key in COMPARABLE_SETTINGS
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def incomparable(mine: Mapping[str, str | None], theirs: Mapping[str, str | None] | None) -> str | None:
    """Why two evaluations' scores cannot be compared, or None when every setting is recorded and equal."""
    if theirs is None:
        return f"its evaluation settings were not recorded (tag {EVAL_SETTINGS_TAG})"
    differ = [k for k in COMPARABLE_SETTINGS if mine.get(k) is None or mine.get(k) != theirs.get(k)]
    return None if not differ else "evaluated under different settings: " + ", ".join(differ)


def _champion(client: Any, name: str) -> tuple[str, float, dict[str, str | None] | None] | None:
    """(version, score, evaluation settings) of the current champion, or None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    recorded = current.tags.get(EVAL_SETTINGS_TAG)
    return current.version, float(current.tags.get(SCORE_TAG, "inf")), json.loads(recorded) if recorded else None


def _preset_name(arch: Any, student_dir: Path) -> str:
    preset = preset_for(arch)
    if preset is None:
        raise RegistryError(f"{student_dir}: architecture {arch} matches no preset; pass --preset to name the model")
    return preset.name


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- what users see: sampling, workflow, model card, lineage ----------------------------------


def experiment_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go: never MLflow's default `./mlruns` in the working directory.

    A SQLite store keeps them in `mlartifacts/` beside its database; a tracking
    server (None) decides, and proxies, its own artifact store.
    """
    from wanlite.distill.tracking import local_artifact_location

    return local_artifact_location(tracking_uri)


def shipment_sampling(ship: Shipment) -> Sampling | None:
    """The shipped student's sampling record (its folder; else the export header)."""
    return load_sampling(ship.student_dir) or from_header(ship.export_report.get("metadata"), str(ship.export_file))


def training_run_info(client: Any, run_id: str | None, tracking_uri: str) -> dict[str, Any] | None:
    """{run_id, url, experiment_id, params} of the training run, or None when unknown or not on this server."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        log.warning("training run %s is not on this tracking server; the version will not link to it", run_id)
        return None
    return {
        "run_id": run_id,
        "experiment_id": run.info.experiment_id,
        "url": mlflow_run_url(tracking_uri, run.info.experiment_id, run_id),
        "params": dict(run.data.params),
    }


def model_card_for(
    ship: Shipment, arch: Any, preset: str, name: str, teacher_sha256: str | None, data_hash: str | None,
    training: Mapping[str, Any] | None,
) -> str:  # fmt: skip
    grid = f"samples/{ship.grid.name}" if ship.grid is not None else None
    return model_card(
        name=name, arch=arch, preset=preset, sampling=shipment_sampling(ship), eval_report=ship.eval_report,
        export_report=ship.export_report, teacher_sha256=teacher_sha256, data_hash=data_hash, training=training,
        grid=grid,
    )  # fmt: skip


def log_usability(client: Any, run_id: str, ship: Shipment, card: str) -> None:
    """The card and the ComfyUI workflow inside the version's folder; the grid as an image."""
    client.log_text(run_id, card, f"{MODEL_DIR}/{CARD_FILE}")
    workflow = workflow_path(ship.export_file)
    if workflow.is_file():
        client.log_artifact(run_id, str(workflow), f"{MODEL_DIR}/comfyui")
    if ship.grid is not None:
        client.log_image(run_id, viewable_grid(ship.grid), artifact_file="samples/teacher_vs_student.png")


def describe_version(
    client: Any, report: dict[str, Any], ship: Shipment, card: str, training: Mapping[str, Any] | None,
    tracking_uri: str,
) -> dict[str, Any]:  # fmt: skip
    """Card as the version's description; sampling, workflow and training-run tags; evaluation on the training run."""
    name, version = report["name"], report["version"]
    header = f"Version {version} of `{name}`; registered by run `{report['run_id']}`.\n\n"
    client.update_model_version(name, version, description=header + card)
    tags = {}
    sampling = shipment_sampling(ship)
    if sampling is not None:
        tags.update(to_tags(sampling))
    workflow = workflow_path(ship.export_file)
    if workflow.is_file():
        tags[COMFYUI_WORKFLOW_TAG] = workflow.name
    if training:
        tags[TRAINING_RUN_TAG] = training["run_id"]
        if training.get("url"):
            tags[TRAINING_RUN_URL_TAG] = training["url"]
        _annotate_training_run(client, training["run_id"], report, ship)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    url = mlflow_version_url(tracking_uri, name, version)
    return {**report, "tags": {**report["tags"], **tags}, "version_url": url, "training_run_id":
            training["run_id"] if training else None}  # fmt: skip


def _annotate_training_run(client: Any, run_id: str, report: Mapping[str, Any], ship: Shipment) -> None:
    """The training run's page names the version, holds the evaluation as metrics and the grid as an image."""
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    client.set_tag(run_id, REGISTERED_VERSION_TAG, report["uri"])
    metrics = [Metric(f"eval.{k}", v, now_ms, 0) for k, v in eval_metrics(ship.eval_report).items()]
    client.log_batch(run_id, metrics=metrics)
    if ship.grid is not None:
        client.log_image(run_id, viewable_grid(ship.grid), artifact_file="evaluation/teacher_vs_student.png")


def viewable_grid(path: Path) -> Any:
    """The evaluation grid as an RGB image a person can judge (enlarged when small)."""
    from PIL import Image

    from wanlite.distill.tracking import viewable

    with Image.open(path) as img:
        return viewable(img.convert("RGB"))
