"""generate: one image through WanPipeline from a student folder, a ComfyUI file or a registered model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wanlite import cli
from wanlite.config import ConfigError
from wanlite.export import export_student
from wanlite.generate import generate

PROMPT = "a lighthouse on a cliff at dawn"


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.size == (64, 64) and img.mode == "RGB"
        return np.asarray(img, dtype=np.int16)


@pytest.mark.slow
def test_folder_and_fp32_export_generate_the_same_image(ship_student: Path, tiny_teacher: Path, tmp_path: Path) -> None:
    from_dir = generate(ship_student, tiny_teacher, PROMPT, tmp_path / "dir.png", steps=2, seed=5)
    assert from_dir["size"] == 64 and from_dir["seed"] == 5
    export_student(ship_student, tmp_path / "s.safetensors", dtype="fp32")
    argv = ["generate", "--model", str(tmp_path / "s.safetensors"), "--teacher", str(tiny_teacher),
            "--prompt", PROMPT, "--out", str(tmp_path / "file.png"), "--steps", "2", "--seed", "5"]  # fmt: skip
    assert cli.main(argv) == 0
    a, b = _pixels(tmp_path / "dir.png"), _pixels(tmp_path / "file.png")
    assert np.abs(a - b).max() <= 1, "same weights, same seed: same image up to fp32 rounding"
    assert a.std() > 0, "a real decoded image, not a constant"
    assert not list(tmp_path.glob(".*.partial"))


@pytest.mark.slow
def test_generate_from_a_registered_model(registered: dict, tiny_teacher: Path, tmp_path: Path) -> None:
    report = generate(
        f"models:/{registered['name']}@champion", tiny_teacher, PROMPT, tmp_path / "reg.png",
        steps=1, tracking_uri=registered["tracking_uri"],
    )  # fmt: skip
    assert report["model"] == f"models:/{registered['name']}@champion (version {registered['version']})"
    assert _pixels(tmp_path / "reg.png").std() > 0


def test_bad_generate_inputs_are_refused(ship_student: Path, tiny_teacher: Path, tmp_path: Path, capsys) -> None:
    for prompt in ("", "   "):
        with pytest.raises(ConfigError, match="prompt: expected a non-empty prompt"):
            generate(ship_student, tiny_teacher, prompt, tmp_path / "x.png")
    with pytest.raises(ConfigError, match=r"--out: expected a \.png file"):
        generate(ship_student, tiny_teacher, PROMPT, tmp_path / "x.jpg")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    argv = ["generate", "--model", str(corrupt), "--teacher", str(tiny_teacher), "--prompt", PROMPT,
            "--out", str(tmp_path / "x.png")]  # fmt: skip
    assert cli.main(argv) == 2
    assert "corrupt.safetensors: not a complete safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
