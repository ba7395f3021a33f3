"""Reliability and security: no secret stored, nothing non-finite published, junk refused with one clear line.

Each test feeds the case its guard exists for (a NaN-producing learning rate, a
password in the tracking URI, a registry tag that climbs out of ComfyUI's
models folder, an unreachable server) and checks the refusal and what was NOT
written.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

from tests.fixtures.distill import run_config
from wanlite.cli import main as cli
from wanlite.distill.checkpointing import latest_checkpoint
from wanlite.distill.launch import distill
from wanlite.distill.options import TrainConfig, validate
from wanlite.distill.train import NonFiniteError
from wanlite.config import ConfigError
from wanlite.mlflow_uri import redact_text, redact_uri
from wanlite.storage import Store

SECRET = "hunter2-S3CRET"


def with_password(url: str) -> str:
    return url.replace("http://", f"http://wanlite:{SECRET}@")


def _store_text(store: Store) -> str:
    """Every JSON/text object of a store, concatenated: where a leaked secret would be found."""
    return "".join(store.get_bytes(k).decode(errors="replace") for k in store.list() if k.endswith((".json", ".txt")))


def _run_named(tracking: str, experiment: str, run_name: str) -> Any:
    client = MlflowClient(tracking)
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id], f"attributes.run_name = '{run_name}'"
    )
    assert len(found) == 1, found
    return found[0]


def test_redaction() -> None:
    assert redact_uri(f"http://user:{SECRET}@host:5000/x") == "http://***@host:5000/x"
    assert redact_uri("http://host:5000") == "http://host:5000" and redact_uri(None) is None
    text = f"API request to https://u:{SECRET}@mlflow.example/api/2.0 failed; see s3://k:{SECRET}@b/key"
    assert SECRET not in redact_text(text) and "https://***@mlflow.example/api/2.0" in redact_text(text)


def test_a_nan_learning_rate_stops_the_run_failed_with_nothing_published(
    tiny_train_base: Any, tmp_path: Path, mlflow_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cfg = run_config(tiny_train_base, tmp_path, run_name="explodes", lr=1e9, warmup_steps=0, steps=6,
                     checkpoint_every=1, ema_decay=0.0, mlflow_uri=with_password(mlflow_server))  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"step (\d+): non-finite (loss|grad_norm) = (nan|inf)") as err:
        distill(cfg)
    bad_step = int(err.value.args[0].split()[1].rstrip(":"))
    store = Store(cfg.out)
    assert store.read_manifest("runs/explodes/final") is None, "nothing published"
    latest = latest_checkpoint(store, "runs/explodes")
    assert latest is None or latest[0] < bad_step, "no checkpoint of the failing step or later"
    for key in store.list("runs/explodes"):
        if key.endswith(".safetensors"):
            from safetensors.torch import load_file

            path = Path(store.root.removeprefix("file://")) / key
            assert all(torch.isfinite(t).all() for t in load_file(path).values()), key
    run = _run_named(mlflow_server, cfg.experiment, "explodes")
    assert run.info.status == "FAILED"
    assert SECRET not in str(run.data.params) and run.data.params["mlflow_uri"].startswith("http://***@")
    assert SECRET not in caplog.text and SECRET not in _store_text(store)


def test_a_password_in_the_tracking_uri_is_never_logged_or_stored(
    tiny_train_base: Any, tmp_path: Path, mlflow_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cfg = run_config(tiny_train_base, tmp_path, run_name="secret", steps=1, checkpoint_every=1,
                     mlflow_uri=with_password(mlflow_server))  # fmt: skip
    result = distill(cfg)
    assert result["mlflow_tracking_uri"] == redact_uri(cfg.mlflow_uri)
    store = Store(cfg.out)
    assert store.read_manifest("runs/secret/final").meta["result"]["mlflow_tracking_uri"].startswith("http://***@")
    assert SECRET not in _store_text(store)
    assert SECRET not in caplog.text and "MLflow run" in caplog.text
    assert SECRET not in str(MlflowClient(mlflow_server).get_run(result["mlflow_run_id"]).data.params)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("shift", -3.0, "shift: expected a value > 0"),
        ("lr", 0.0, "lr: expected a value > 0"),
        ("lr", float("nan"), "lr: expected a finite number"),
        ("guidance_high", float("inf"), "guidance_high: expected a finite number"),
        ("min_lr_ratio", 2.0, r"min_lr_ratio: expected a value in \[0, 1\]"),
        ("weight_decay", -1.0, "weight_decay, grad_clip: expected values >= 0"),
        ("peak_tflops", -5.0, "peak_tflops: expected a value > 0"),
    ],
)
def test_numeric_options_out_of_range_are_refused(field: str, value: float, expected: str) -> None:
    cfg = TrainConfig(teacher="t", data="d", embeddings="e")
    with pytest.raises(ConfigError, match=expected):
        validate(dataclasses.replace(cfg, **{field: value}))


def test_cli_distill_nan_is_one_line_and_exits_2(
    tiny_train_base: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tiny_train_base
    status = cli(["distill", "--teacher", base.teacher, "--data", base.data, "--embeddings", base.embeddings,
                  "--out", (tmp_path / "store").as_uri(), "--steps", "2", "--batch-size", "2", "--lr", "nan",
                  "--mlflow-uri", with_password(base.mlflow_uri)])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and err == "wanlite distill: error: lr: expected a finite number, found nan\n"


# --- registry and download ---------------------------------------------------------------


def _dead_server() -> str:
    """An http URI with a password where nothing listens (a port just freed)."""
    from tests.fixtures.mlflow import free_port

    return f"http://wanlite:{SECRET}@127.0.0.1:{free_port()}"


def test_registering_the_same_shipment_twice_adds_no_version(registered: dict, shipped: Any) -> None:
    from wanlite.registry import check_shipment, register

    shipment = check_shipment(shipped.student, shipped.export_file, export_report=shipped.export_report,
                              roundtrip_report=shipped.roundtrip_report, eval_report=shipped.eval_report)  # fmt: skip
    preset = registered["name"].removeprefix("wanlite-")
    again = register(shipment, tracking_uri=registered["tracking_uri"], preset=preset)
    assert again["existing"] and again["version"] == registered["version"] and again["run_id"] == registered["run_id"]
    client = MlflowClient(registered["tracking_uri"])
    assert len(client.search_model_versions(f"name = '{registered['name']}'")) == 1


def test_download_refuses_a_tag_that_names_a_path(registered: dict, comfyui_dir: Path) -> None:
    from wanlite.download import download
    from wanlite.registry import RegistryError

    client = MlflowClient(registered["tracking_uri"])
    name, source = registered["name"], registered["source"]
    for bad in ("../../custom_nodes/x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors", "x.ckpt"):
        version = client.create_model_version(name, source=source, run_id=registered["run_id"],
                                              tags={**registered["tags"], "comfyui_file": bad})  # fmt: skip
        with pytest.raises(RegistryError, match=r"expected a bare file name ending in \.safetensors"):
            download(f"models:/{name}/{version.version}", comfyui_dir, tracking_uri=registered["tracking_uri"])
    assert not (comfyui_dir / "custom_nodes").exists()
    assert list((comfyui_dir / "models" / "diffusion_models").iterdir()) == []


@pytest.mark.parametrize("command", ["download", "register"])
def test_an_unreachable_server_is_one_line_without_the_password(
    command: str, shipped: Any, comfyui_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = _dead_server()
    if command == "download":
        argv = ["download", "models:/wanlite-tiny@champion", "--comfyui", str(comfyui_dir), "--tracking-uri", dead]
    else:
        argv = ["register", "--student", str(shipped.student), "--export", str(shipped.export_file),
                "--export-report", str(shipped.export_report), "--roundtrip-report", str(shipped.roundtrip_report),
                "--eval-report", str(shipped.eval_report), "--tracking-uri", dead]  # fmt: skip
    assert cli(argv) == 2
    out, err = capsys.readouterr()
    assert SECRET not in out + err and err.count("\n") == 1
    assert err.startswith(f"wanlite {command}: error: MLflow server http://***@127.0.0.1:") and "unreachable" in err


# --- teacher data ----------------------------------------------------------------------------


def _caption_folder(tmp_path: Path, prompt: str) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    pixels = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    from PIL import Image

    Image.fromarray(pixels).save(images / "ok.png")
    (images / "ok.txt").write_text(prompt)
    return images


@pytest.mark.parametrize("fault", ["corrupt", "bomb", "caption"])
def test_teacher_data_names_the_bad_image_or_caption(
    fault: str, tiny_teacher: Path, tiny_embeddings: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from PIL import Image

    from wanlite.distill.data import EmbeddingSet

    images = _caption_folder(tmp_path, EmbeddingSet.load(tiny_embeddings["uri"]).prompts[0])
    if fault == "corrupt":
        data = (images / "ok.png").read_bytes()
        (images / "ok.png").write_bytes(data[:60] + bytes(len(data) - 60))
        expected = "ok.png: expected a readable image, found"
    elif fault == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64x64 image is then a "bomb" (> 2 x 1000 pixels)
        expected = "ok.png: expected a readable image, found DecompressionBombError"
    else:
        (images / "ok.txt").write_bytes(b"caf\xe9 latte")  # Latin-1, not UTF-8
        expected = r"ok.txt: expected UTF-8 text, found byte 0xe9 at offset 3"
    store = tmp_path / "store"
    status = cli(["teacher-data", "--teacher", str(tiny_teacher), "--embeddings", tiny_embeddings["uri"],
                  "--out", store.as_uri(), "--image-size", "32", "--images", str(images),
                  "--no-teacher-samples"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert expected.split(" found")[0] in err and "Traceback" not in err
    assert not (store / "data").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--image-size", "0"], "image_size: expected a positive multiple of 16"),
        (["--shift", "-3"], "shift: expected a finite value > 0, found -3.0"),
        (["--guidance-high", "nan"], "guidance_high: expected a finite value > 0, found nan"),
    ],
)
def test_teacher_data_numeric_options(
    flags: list[str], expected: str, tiny_teacher: Path, tiny_embeddings: dict, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    status = cli(["teacher-data", "--teacher", str(tiny_teacher), "--embeddings", tiny_embeddings["uri"],
                  "--out", (tmp_path / "store").as_uri(), "--steps", "1", *flags])  # fmt: skip
    assert status == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def nan_teacher(tiny_teacher: Path, tmp_path: Path) -> Path:
    """A copy of the tiny teacher whose experts' output projections hold NaN (a damaged or diverged teacher)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    root = Path(shutil.copytree(tiny_teacher, tmp_path / "nan-teacher"))
    for expert in ("high_noise_model", "low_noise_model"):
        index = json.loads((root / expert / "diffusion_pytorch_model.safetensors.index.json").read_text())
        shard = root / expert / index["weight_map"]["head.head.weight"]
        tensors = load_file(shard)
        tensors["head.head.weight"] = torch.full_like(tensors["head.head.weight"], float("nan"))
        save_file(tensors, shard)
    return root


def test_teacher_data_publishes_no_non_finite_latents(
    tiny_teacher: Path, tiny_embeddings: dict, tmp_path: Path
) -> None:
    from wanlite.distill.teacher_data import teacher_data

    store = Store((tmp_path / "store").as_uri())
    with pytest.raises(ValueError, match=r"teacher-data: teacher samples \[0, 1\] came out non-finite"):
        teacher_data(nan_teacher(tiny_teacher, tmp_path), tiny_embeddings["uri"], store.root, image_size=32,
                     steps=1, shard_size=2, batch_size=2, progress=False)  # fmt: skip
    assert [k for k in store.list() if k.endswith("_MANIFEST.json")] == []


# --- export and evaluate ---------------------------------------------------------------------


@pytest.fixture
def nan_student(tiny_student_init: Path, tmp_path: Path) -> Path:
    """The tiny student with one NaN weight (what a diverged run without the guard published)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(tiny_student_init, tmp_path / "nan-student"))
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["proj_out.weight"][0, 0] = float("nan")
    save_file(tensors, weights)
    return folder


def test_export_refuses_non_finite_weights(nan_student: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert cli(["export", str(nan_student), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "non-finite values (NaN or inf) in 1 tensor(s): head.head.weight; nothing exported" in err
    assert list(out.iterdir()) == []


def test_evaluate_refuses_non_finite_weights(
    nan_student: Path, tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status = cli(["evaluate", "--student", str(nan_student), "--teacher", str(tiny_teacher),
                  "--out", str(tmp_path / "eval"), "--num-prompts", "1", "--steps", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "non-finite weights (NaN or inf) in 1 tensor(s): proj_out.weight" in err
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_size_zero(tiny_student_init: Path, tiny_teacher: Path, tmp_path: Path, capsys) -> None:
    assert cli(["evaluate", "--student", str(tiny_student_init), "--teacher", str(tiny_teacher),
                "--out", str(tmp_path / "eval"), "--size", "0"]) == 2  # fmt: skip
    assert "size: expected a positive multiple of 16 (VAE 8 x patch 2), found 0" in capsys.readouterr().err


# --- concurrency -------------------------------------------------------------------------------

_RACER = """
import sys, time
from pathlib import Path
from wanlite.commands.demo import prepare_mlflow
workdir = Path(sys.argv[1])
(workdir / f"ready-{sys.argv[2]}").touch()
while not (workdir / "go").exists():
    time.sleep(0.01)
prepare_mlflow(f"sqlite:///{workdir / 'mlflow.db'}", workdir / "mlartifacts")
"""


@pytest.mark.slow
def test_demos_starting_together_on_a_fresh_folder_share_one_mlflow_database(tmp_path: Path) -> None:
    """Four processes released at once on an empty folder: each creates (or finds) the schema, none fails."""
    import subprocess
    import sys
    import time

    racers = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(i)], stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    while len(list(tmp_path.glob("ready-*"))) < len(racers) and all(p.poll() is None for p in racers):
        time.sleep(0.05)
    (tmp_path / "go").touch()
    errors = [p.communicate()[1] for p in racers]
    assert [p.returncode for p in racers] == [0] * 4, "\n".join(errors)[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert {e.name for e in client.search_experiments()} >= {"wanlite", "wanlite-distill"}


# --- clear errors instead of tracebacks --------------------------------------------------------


def _rewrite_header(shard: Path, change: Any) -> None:
    """Edit a safetensors file's JSON header in place (same length, padded with spaces)."""
    import json
    import struct

    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    shard.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n :])


@pytest.mark.parametrize("fault", ["int32", "overlap", "huge"])
def test_project_names_the_file_and_tensor_of_a_bad_shard(
    fault: str, tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    root = Path(shutil.copytree(tiny_teacher, tmp_path / "teacher"))
    expert = root / "high_noise_model"
    index = json.loads((expert / "diffusion_pytorch_model.safetensors.index.json").read_text())
    name = "blocks.0.ffn.0.weight"
    shard = expert / index["weight_map"][name]
    if fault == "int32":
        tensors = load_file(shard)
        tensors[name] = tensors[name].to(torch.int32)
        save_file(tensors, shard)
    else:
        def change(header: dict) -> None:
            header.pop("__metadata__", None)  # room for the longer offsets in the same header length
            start, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [0, end - start] if fault == "overlap" else [start + 10**12, end + 10**12]

        _rewrite_header(shard, change)
    status = cli(["project", "--teacher", str(root), "--preset", "tiny", "--calib-samples", "1", "--calib-random",
                  "--out", str(tmp_path / "student")])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert f"{shard}: blocks." in err  # the file and a tensor (safetensors names the first bad offset it meets)
    assert name in err if fault == "int32" else "offset" in err
    assert not (tmp_path / "student").exists()


def test_project_calib_data_that_is_not_safetensors(tiny_teacher: Path, tmp_path: Path, capsys) -> None:
    junk = tmp_path / "calib.safetensors"
    junk.write_bytes(b"PK\x03\x04 a zip, not safetensors")
    status = cli(["project", "--teacher", str(tiny_teacher), "--calib-data", str(junk), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert status == 2 and f"--calib-data {junk}: expected a safetensors file" in err and err.count("\n") == 1


def test_encode_prompts_without_a_tokenizer(tiny_teacher: Path, tmp_path: Path, capsys) -> None:
    import shutil

    root = Path(shutil.copytree(tiny_teacher, tmp_path / "teacher"))
    shutil.rmtree(root / "google" / "umt5-xxl")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    status = cli(["encode-prompts", "--teacher", str(root), "--prompts", str(prompts),
                  "--out", (tmp_path / "store").as_uri()])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "google/umt5-xxl: expected the umt5-xxl tokenizer folder of the teacher" in err


def test_generate_loads_a_student_by_file_uri(tiny_student_init: Path, tmp_path: Path) -> None:
    from wanlite.generate import load_model

    store = Store((tmp_path / "store").as_uri())
    store.put_dir(tiny_student_init, "students/x", progress=False)
    _, arch, source, _ = load_model(store.uri("students/x"))
    assert arch.dim == 128 and source.endswith("students/x")


def test_the_documented_s3_lifecycle_rule_is_accepted(moto_server: str, s3_bucket: str) -> None:
    """infra/s3-lifecycle.json is what README tells users to apply against orphan multipart uploads."""
    import json

    import boto3

    rules = json.loads((Path(__file__).parent.parent / "infra" / "s3-lifecycle.json").read_text())
    client = boto3.client("s3", endpoint_url=moto_server)
    client.put_bucket_lifecycle_configuration(Bucket=s3_bucket, LifecycleConfiguration=rules)
    stored = client.get_bucket_lifecycle_configuration(Bucket=s3_bucket)["Rules"]
    assert stored[0]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 2}
