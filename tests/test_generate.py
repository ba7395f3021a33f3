"""generate: one image through WanPipeline from a student folder, a ComfyUI file or a registered model."""

from __future__ import annotations

import shutil
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


class _Spy:
    """Records what `WanPipeline.__call__` was asked for and what the pipeline did, then runs the real call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from diffusers import WanPipeline

        self.calls: list[dict] = []
        real = WanPipeline.__call__

        def call(pipe, *args, **kwargs):
            out = real(pipe, *args, **kwargs)
            self.calls.append({**kwargs, "cfg": pipe.do_classifier_free_guidance,
                               "timesteps": len(pipe.scheduler.timesteps), "shift": pipe.scheduler.config.flow_shift})  # fmt: skip
            return out

        monkeypatch.setattr(WanPipeline, "__call__", call)


def test_guidance_and_steps_come_from_the_model(
    ship_student: Path, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folded-guidance student (the DAG's default) samples at guidance 1 with no negative pass, its own steps."""
    from wanlite.sampling import load_sampling, save_sampling, student_sampling

    recorded = load_sampling(ship_student)
    assert recorded.guidance == 1.0 and recorded.steps == 2
    spy = _Spy(monkeypatch)
    report = generate(ship_student, tiny_teacher, PROMPT, tmp_path / "a.png")
    call = spy.calls[-1]
    assert call["guidance_scale"] == 1.0 and not call["cfg"] and call["negative_prompt"] is None
    assert call["num_inference_steps"] == 2 and call["timesteps"] == 2 and call["shift"] == 12.0
    assert report["sampling_from_model"] and report["sampling_notes"] == []

    # A CFG student records CFG: the same call now runs the negative pass with Wan's negative prompt.
    cfg_student = tmp_path / "cfg"
    shutil.copytree(ship_student, cfg_student)
    save_sampling(cfg_student, student_sampling(guided=False, steps=3, shift=5.0))
    generate(cfg_student, tiny_teacher, PROMPT, tmp_path / "b.png")
    call = spy.calls[-1]
    assert call["guidance_scale"] == 3.0 and call["cfg"] and call["negative_prompt"]
    assert call["num_inference_steps"] == 3 and call["shift"] == 5.0


def test_flags_override_the_model_and_the_report_says_so(
    ship_student: Path, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)
    report = generate(ship_student, tiny_teacher, PROMPT, tmp_path / "a.png", steps=1, guidance=2.5)
    call = spy.calls[-1]
    assert call["num_inference_steps"] == 1 and call["guidance_scale"] == 2.5 and call["cfg"]
    assert not report["sampling_from_model"]
    assert report["sampling_notes"] == ["overridden steps: 2 -> 1", "overridden guidance: 1.0 -> 2.5",
                                        "overridden negative_prompt: False -> True (follows guidance)"]  # fmt: skip


def test_export_header_sampling_drives_generation_from_the_file(
    ship_student: Path, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)
    export_student(ship_student, tmp_path / "s.safetensors", dtype="fp32")
    generate(tmp_path / "s.safetensors", tiny_teacher, PROMPT, tmp_path / "f.png")
    assert spy.calls[-1]["guidance_scale"] == 1.0 and spy.calls[-1]["num_inference_steps"] == 2


def test_a_negative_prompt_on_a_folded_model_is_reported_unused(
    ship_student: Path, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)
    report = generate(ship_student, tiny_teacher, PROMPT, tmp_path / "a.png", negative_prompt="blurry")
    assert spy.calls[-1]["negative_prompt"] is None and not spy.calls[-1]["cfg"]
    assert report["sampling_notes"] == ["negative prompt ignored: guidance 1 runs no negative pass"]
