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
