"""round-trip: save -> fresh process with stock from_pretrained -> identical outputs, teacher hidden."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wanlite import cli
from wanlite.config import ConfigError
from wanlite.roundtrip import _visible, roundtrip
from tests.fixtures.ship import Shipped


@pytest.mark.slow
def test_fp32_roundtrip_is_bit_identical_with_the_teacher_hidden(shipped: Shipped, tiny_teacher: Path) -> None:
    report = json.loads(shipped.roundtrip_report.read_text())
    assert report["teacher"] == str(tiny_teacher.resolve())
    assert report["passed"] and report["exact"] and report["max_abs_diff"] == 0.0
    assert report["max_abs_reference"] > 0.1
    assert report["loaded_class"] == "WanTransformer3DModel", "stock diffusers class, no custom loader"
    assert report["teacher_isolation"] in {"mount-namespace", "permissions"}
    assert report["teacher_visible_in_child"] is False and report["teacher_files_opened"] == []
    assert report["load_s"] > 0 and report["raw_read_s"] > 0 and report["saved_bytes"] > 0
    assert (tiny_teacher / "high_noise_model" / "config.json").is_file(), "the teacher is untouched afterwards"


@pytest.mark.slow
def test_bf16_roundtrip_cli_writes_a_passing_report(ship_student: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "roundtrip.json"
    assert cli.main(["roundtrip", str(ship_student), "--dtype", "bf16", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["dtype"] == "bf16"
    assert report["max_abs_diff"] <= report["rel_tolerance"] * report["max_abs_reference"]
    assert report["teacher_isolation"] == "not requested"


def test_bad_inputs_are_refused(ship_student: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dtype: expected one of"):
        roundtrip(ship_student, dtype="int4")
    with pytest.raises(FileNotFoundError, match="no such file"):
        roundtrip(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="--teacher: expected a local teacher directory"):
        roundtrip(ship_student, teacher=tmp_path / "nope")


def test_visibility_probe_sees_a_visible_teacher(tiny_teacher: Path, tmp_path: Path) -> None:
    """The child's proof only means something if the probe does see a teacher that is there."""
    assert _visible(tiny_teacher) is True
    assert _visible(tmp_path) is False
