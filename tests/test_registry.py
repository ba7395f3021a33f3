"""register: a real `mlflow server` (SQLite, proxied artifacts), gates, tags, candidate/champion aliases."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from wanlite import cli
from wanlite.registry import CANDIDATE, CHAMPION, RegistryError, check_shipment, register
from tests.fixtures.ship import Shipped


def _shipment(shipped: Shipped, tmp_path: Path, **eval_changes: object):
    """The shipped reports, with the evaluation report copied and edited (as another run would write it)."""
    report = json.loads(shipped.eval_report.read_text())
    report.update(eval_changes)
    eval_dir = tmp_path / f"eval-{uuid.uuid4().hex[:6]}"
    eval_dir.mkdir()
    (eval_dir / "evaluation.json").write_text(json.dumps(report))
    (eval_dir / report["grid"]).write_bytes((shipped.eval_dir / report["grid"]).read_bytes())
    return check_shipment(
        shipped.student,
        shipped.export_file,
        export_report=shipped.export_report,
        roundtrip_report=shipped.roundtrip_report,
        eval_report=eval_dir / "evaluation.json",
    )


def test_registered_version_has_run_artifacts_tags_and_aliases(registered: dict, shipped: Shipped) -> None:
    client = MlflowClient(tracking_uri=registered["tracking_uri"])
    name, version = registered["name"], registered["version"]
    assert registered["aliases"] == [CANDIDATE, CHAMPION] and registered["previous_champion"] is None
    assert client.get_model_version_by_alias(name, CHAMPION).version == version
    assert client.get_model_version_by_alias(name, CANDIDATE).version == version

    mv = client.get_model_version(name, version)
    export = json.loads(shipped.export_report.read_text())
    evaluation = json.loads(shipped.eval_report.read_text())
    assert mv.run_id == registered["run_id"] and mv.source.endswith("/artifacts/model")
    assert mv.tags["teacher_sha256"] == "7e" * 32, "taken from the export header"
    assert mv.tags["data_hash"] == "da" * 32
    assert mv.tags["code_version"].startswith("0.1.0")
    assert mv.tags["comfyui_sha256"] == export["sha256"] and mv.tags["comfyui_file"] == "wanlite-tiny.safetensors"
    assert float(mv.tags["eval_score"]) == evaluation["score"]
    assert float(mv.tags["eval.frechet_latent"]) == evaluation["metrics"]["frechet_latent"]

    run = client.get_run(registered["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["preset"] == name.removeprefix("wanlite-") and run.data.params["arch.dim"] == "128"
    assert run.data.metrics["eval_score"] == evaluation["score"]
    listed = {f.path for f in client.list_artifacts(run.info.run_id, "model/comfyui")}
    assert listed == {"model/comfyui/wanlite-tiny.safetensors", "model/comfyui/wanlite-tiny.workflow.json"}
    assert {f.path for f in client.list_artifacts(run.info.run_id, "reports")} >= {
        "reports/export.json", "reports/roundtrip.json", "reports/evaluate",
    }  # fmt: skip
    assert [f.path for f in client.list_artifacts(run.info.run_id, "samples")] == [
        "samples/grid.png", "samples/teacher_vs_student.png",
    ]  # fmt: skip
    assert "model/diffusers/config.json" in {f.path for f in client.list_artifacts(run.info.run_id, "model/diffusers")}


@pytest.mark.slow
def test_champion_moves_only_when_the_score_improves(shipped: Shipped, mlflow_server: str, tmp_path: Path) -> None:
    preset = f"tiny-{uuid.uuid4().hex[:8]}"
    base = json.loads(shipped.eval_report.read_text())["score"]
    first = register(_shipment(shipped, tmp_path, score=base), tracking_uri=mlflow_server, preset=preset)
    worse = register(_shipment(shipped, tmp_path, score=base + 1), tracking_uri=mlflow_server, preset=preset)
    assert (worse["aliases"], worse["previous_champion"]["version"]) == ([CANDIDATE], first["version"])
    better = register(_shipment(shipped, tmp_path, score=base / 2), tracking_uri=mlflow_server, preset=preset)
    assert better["champion"] and better["previous_champion"] == {"version": first["version"], "score": base}
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_model_version_by_alias(f"wanlite-{preset}", CHAMPION).version == better["version"]
    assert client.get_model_version_by_alias(f"wanlite-{preset}", CANDIDATE).version == better["version"]


CHANGED_SETTINGS = ({"teacher_fingerprint": "0" * 64}, {"prompts": ["another prompt"]}, {"seeds": [7]},
                    {"sigmas": [0.5]}, {"guided": None}, {"steps": 40}, {"size": 128}, {"precision": "bfloat16"})  # fmt: skip


@pytest.mark.slow
def test_a_better_score_from_other_settings_is_registered_but_not_compared(
    shipped: Shipped, mlflow_server: str, tmp_path: Path
) -> None:
    preset = f"tiny-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(tracking_uri=mlflow_server)
    base = json.loads(shipped.eval_report.read_text())["score"]
    first = register(_shipment(shipped, tmp_path, score=base), tracking_uri=mlflow_server, preset=preset)
    for change in CHANGED_SETTINGS:
        if "guided" in change:  # the other guided mode than the shipped student's
            change = {"guided": not json.loads(shipped.eval_report.read_text())["guided"]}
        other = register(_shipment(shipped, tmp_path, score=base / 10, **change), tracking_uri=mlflow_server,
                         preset=preset)  # fmt: skip
        (setting,) = change
        assert other["aliases"] == [CANDIDATE] and not other["champion"]
        assert other["not_compared"] == (
            f"not compared with champion version {first['version']}: evaluated under different settings: {setting}"
        )
        assert client.get_model_version(f"wanlite-{preset}", other["version"]).tags["not_compared"] == (
            other["not_compared"]
        )
    assert client.get_model_version_by_alias(f"wanlite-{preset}", CHAMPION).version == first["version"]


def test_nothing_is_registered_from_a_failed_or_incomplete_run(
    shipped: Shipped, mlflow_server: str, tmp_path: Path
) -> None:
    with pytest.raises(RegistryError, match=r"evaluate report .*evaluation\.json: passed is False; refusing"):
        _shipment(shipped, tmp_path, passed=False)
    with pytest.raises(RegistryError, match="roundtrip report: missing; refusing to register"):
        check_shipment(shipped.student, shipped.export_file, export_report=shipped.export_report,
                       roundtrip_report=None, eval_report=shipped.eval_report)  # fmt: skip
    with pytest.raises(RegistryError, match="export report .*: no such file"):
        check_shipment(shipped.student, shipped.export_file, export_report=tmp_path / "absent.json",
                       roundtrip_report=shipped.roundtrip_report, eval_report=shipped.eval_report)  # fmt: skip
    other = tmp_path / "other.safetensors"
    other.write_bytes(shipped.export_file.read_bytes()[:-1] + b"\x00")
    with pytest.raises(RegistryError, match="sha256 .* does not match .*other.safetensors"):
        check_shipment(shipped.student, other, export_report=shipped.export_report,
                       roundtrip_report=shipped.roundtrip_report, eval_report=shipped.eval_report)  # fmt: skip
    with pytest.raises(RegistryError, match="expected kind 'roundtrip', found 'export'"):
        check_shipment(shipped.student, shipped.export_file, export_report=shipped.export_report,
                       roundtrip_report=shipped.export_report, eval_report=shipped.eval_report)  # fmt: skip

    # Through the CLI, against the server: refused before MLflow is contacted, so no run and no model.
    experiment = f"refused-{uuid.uuid4().hex[:6]}"
    failed_eval = json.loads(shipped.eval_report.read_text()) | {"passed": False}
    (tmp_path / "failed.json").write_text(json.dumps(failed_eval))
    argv = ["register", "--student", str(shipped.student), "--export", str(shipped.export_file),
            "--export-report", str(shipped.export_report), "--roundtrip-report", str(shipped.roundtrip_report),
            "--eval-report", str(tmp_path / "failed.json"), "--tracking-uri", mlflow_server,
            "--experiment", experiment, "--preset", "refused"]  # fmt: skip
    assert cli.main(argv) == 2
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_experiment_by_name(experiment) is None
    assert client.search_registered_models(filter_string="name = 'wanlite-refused'") == []


def test_cli_register_writes_a_report(shipped: Shipped, mlflow_server: str, tmp_path: Path) -> None:
    out = tmp_path / "register.json"
    argv = ["register", "--student", str(shipped.student), "--export", str(shipped.export_file),
            "--export-report", str(shipped.export_report), "--roundtrip-report", str(shipped.roundtrip_report),
            "--eval-report", str(shipped.eval_report), "--tracking-uri", mlflow_server,
            "--preset", f"cli-{uuid.uuid4().hex[:6]}", "--data-hash", "ff", "--param", "run=unit",
            "--report", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    run = MlflowClient(tracking_uri=mlflow_server).get_run(report["run_id"])
    assert run.data.params["run"] == "unit" and report["tags"]["data_hash"] == "ff"


@pytest.mark.slow
def test_registry_with_artifacts_in_s3(
    shipped: Shipped, mlflow_s3_server: str, moto_server: str, comfyui_dir: Path
) -> None:
    """Same registration with the server's artifact store in S3 (moto): clients only talk to MLflow."""
    import boto3

    from wanlite.download import download

    shipment = check_shipment(shipped.student, shipped.export_file, export_report=shipped.export_report,
                              roundtrip_report=shipped.roundtrip_report, eval_report=shipped.eval_report)  # fmt: skip
    report = register(shipment, tracking_uri=mlflow_s3_server, preset="tiny")
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts")["Contents"]]
    assert any(k.endswith(f"{report['run_id']}/artifacts/model/comfyui/wanlite-tiny.safetensors") for k in keys)
    placed = download("models:/wanlite-tiny@champion", comfyui_dir, tracking_uri=mlflow_s3_server)
    assert placed["sha256"] == json.loads(shipped.export_report.read_text())["sha256"]
    assert Path(placed["path"]).stat().st_size == shipped.export_file.stat().st_size


def test_reports_about_another_student_are_refused(shipped: Shipped, tmp_path: Path) -> None:
    from tests.fixtures.ship import make_student

    other = make_student(tmp_path / "other", seed=1)
    with pytest.raises(RegistryError, match=r"export report .*: it is about student '[0-9a-f]{64}', not the student"):
        check_shipment(other, shipped.export_file, export_report=shipped.export_report,
                       roundtrip_report=shipped.roundtrip_report, eval_report=shipped.eval_report)  # fmt: skip


def test_eval_report_may_be_given_as_its_folder(shipped: Shipped) -> None:
    shipment = check_shipment(shipped.student, shipped.export_file, export_report=shipped.export_report,
                              roundtrip_report=shipped.roundtrip_report, eval_report=shipped.eval_dir)  # fmt: skip
    assert shipment.grid == shipped.eval_dir / "grid.png"


# --- what users see: card, sampling, lineage, where artifacts go --------------------------------


def test_version_carries_card_sampling_and_workflow(registered: dict, shipped: Shipped, tmp_path: Path) -> None:
    from mlflow.artifacts import download_artifacts

    from wanlite.sampling import from_tags, load_sampling

    client = MlflowClient(tracking_uri=registered["tracking_uri"])
    mv = client.get_model_version(registered["name"], registered["version"])
    assert from_tags(mv.tags) == load_sampling(shipped.student)
    assert mv.tags["wanlite_sampling.guidance"] == "1.0" and mv.tags["comfyui_workflow"] == "wanlite-tiny.workflow.json"
    card = Path(download_artifacts(f"{mv.source}/README.md", dst_path=str(tmp_path),
                                   tracking_uri=registered["tracking_uri"])).read_text()  # fmt: skip
    assert mv.description.endswith(card), "the stored README is the version's description"
    for needed in ("parameters", "7e" * 32, "do **not** add CFG", "ModelSamplingSD3", "velocity_rel_mse",
                   "Apache License 2.0", "WanTransformer3DModel.from_pretrained"):  # fmt: skip
        assert needed in card, needed
    assert registered["version_url"].startswith(registered["tracking_uri"])
    assert registered["version_url"].endswith(f"#/models/{registered['name']}/versions/{registered['version']}")
    image = client.list_artifacts(registered["run_id"], "samples")
    assert any(f.path == "samples/teacher_vs_student.png" and f.file_size > 0 for f in image)


def test_version_links_to_its_training_run(shipped: Shipped, mlflow_server: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.create_experiment(f"train-{uuid.uuid4().hex[:6]}")
    training = client.create_run(experiment, run_name="distill")
    client.log_param(training.info.run_id, "lr", "0.001")
    client.set_terminated(training.info.run_id)
    report = register(_shipment(shipped, tmp_path), tracking_uri=mlflow_server,
                      preset=f"tiny-{uuid.uuid4().hex[:8]}", training_run_id=training.info.run_id)  # fmt: skip
    mv = client.get_model_version(report["name"], report["version"])
    url = f"{mlflow_server}/#/experiments/{experiment}/runs/{training.info.run_id}"
    assert mv.tags["training_run_id"] == training.info.run_id and mv.tags["training_run_url"] == url
    assert f"[{training.info.run_id}]({url})" in mv.description and "| lr | 0.001 |" in mv.description
    trained = client.get_run(training.info.run_id)
    assert trained.data.tags["wanlite.registered_version"] == report["uri"]
    evaluation = json.loads(shipped.eval_report.read_text())
    assert trained.data.metrics["eval.eval_score"] == evaluation["score"], "evaluation as real metrics on the run"
    assert [f.path for f in client.list_artifacts(training.info.run_id, "evaluation")] == [
        "evaluation/teacher_vs_student.png"
    ]


def test_registering_from_an_empty_directory_writes_nothing_there(
    shipped: Shipped, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain SQLite tracking URI and a new experiment: MLflow's default would put artifacts in ./mlruns."""
    cwd, db = tmp_path / "cwd", tmp_path / "tracking" / "mlflow.db"
    cwd.mkdir()
    db.parent.mkdir()
    shipment = _shipment(shipped, tmp_path)
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{db}"
    report = register(shipment, tracking_uri=uri, preset="tiny", experiment=f"fresh-{uuid.uuid4().hex[:6]}")
    assert list(cwd.iterdir()) == [], "registration wrote into the working directory"
    client = MlflowClient(tracking_uri=uri)
    source = client.get_model_version(report["name"], report["version"]).source
    assert source.startswith((db.parent / "mlartifacts").as_uri())
    assert report["version_url"] is None, "no web server to link to"
