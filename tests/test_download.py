"""download: a registered version lands in ComfyUI/models/diffusion_models/, sha-verified, never clobbering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wanlite import cli
from wanlite.config import PRESETS
from wanlite.download import ComfyUIError, download
from wanlite.export import file_sha256, load_export, load_student
from wanlite.registry import RegistryError
from wanlite.roundtrip import model_outputs, probe_inputs
from tests.fixtures.ship import Shipped


def test_registered_version_downloads_and_reloads_to_the_same_outputs(
    registered: dict, shipped: Shipped, comfyui_dir: Path
) -> None:
    uri = f"models:/{registered['name']}@champion"
    report = download(uri, comfyui_dir, tracking_uri=registered["tracking_uri"])
    placed = comfyui_dir / "models" / "diffusion_models" / "wanlite-tiny.safetensors"
    assert report["action"] == "downloaded" and Path(report["path"]) == placed
    assert file_sha256(placed) == file_sha256(shipped.export_file) == registered["tags"]["comfyui_sha256"]
    assert sorted(p.name for p in (comfyui_dir / "models").iterdir()) == ["diffusion_models"], "no temp left"

    inputs = probe_inputs(PRESETS["tiny"].arch)
    reloaded = model_outputs(load_export(placed), inputs)
    torch.testing.assert_close(reloaded, model_outputs(load_export(shipped.export_file), inputs), rtol=0, atol=0)
    student = model_outputs(load_student(shipped.student)[0], inputs)
    assert (reloaded - student).abs().max() / student.abs().max() < 0.05, "bf16 export of the same student"

    again = download(uri, comfyui_dir, tracking_uri=registered["tracking_uri"])
    assert again["action"] == "already present"


def test_download_installs_the_workflow_with_the_models_settings(
    registered: dict, shipped: Shipped, comfyui_dir: Path
) -> None:
    from wanlite.sampling import load_sampling
    from wanlite.workflow import workflow_settings

    report = download(f"models:/{registered['name']}@champion", comfyui_dir, tracking_uri=registered["tracking_uri"])
    installed = comfyui_dir / "user" / "default" / "workflows" / "wanlite-tiny.workflow.json"
    assert report["workflow"] == str(installed)
    recorded = load_sampling(shipped.student)
    settings = workflow_settings(json.loads(installed.read_text()))
    assert (settings["shift"], settings["steps"], settings["cfg"]) == (recorded.shift, recorded.steps, recorded.guidance)
    assert [p.name for p in installed.parent.iterdir()] == [installed.name], "no temp left"
    for path in (installed, Path(report["path"])):
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), f"{path}: mode follows the umask"


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_different_file_is_never_overwritten_silently(
    registered: dict, comfyui_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    placed = comfyui_dir / "models" / "diffusion_models" / "wanlite-tiny.safetensors"
    placed.write_bytes(b"the user's own model")
    argv = ["download", f"models:/{registered['name']}/{registered['version']}", "--comfyui", str(comfyui_dir),
            "--tracking-uri", registered["tracking_uri"]]  # fmt: skip
    assert cli.main(argv) == 2
    assert "a different file is already there" in capsys.readouterr().err
    assert placed.read_bytes() == b"the user's own model"
    assert cli.main([*argv, "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "replaced"
    assert file_sha256(placed) == registered["tags"]["comfyui_sha256"]


def test_folders_that_are_not_comfyui_are_refused(registered: dict, tmp_path: Path) -> None:
    uri = f"models:/{registered['name']}@champion"
    with pytest.raises(ComfyUIError, match=r"not a ComfyUI install \(no such directory\)"):
        download(uri, tmp_path / "absent", tracking_uri=registered["tracking_uri"])
    both = r"not a ComfyUI install \(no models/ directory; neither comfy/ nor main.py\)"
    with pytest.raises(ComfyUIError, match=both):
        download(uri, tmp_path, tracking_uri=registered["tracking_uri"])
    (tmp_path / "models").mkdir()
    with pytest.raises(ComfyUIError, match=r"neither comfy/ nor main.py"):
        download(uri, tmp_path, tracking_uri=registered["tracking_uri"])
    assert list((tmp_path / "models").iterdir()) == []


def test_unknown_models_aliases_and_versions_are_named(registered: dict, comfyui_dir: Path) -> None:
    name, tracking = registered["name"], registered["tracking_uri"]
    with pytest.raises(RegistryError, match="no registered model named 'wanlite-nope'"):
        download("models:/wanlite-nope@champion", comfyui_dir, tracking_uri=tracking)
    with pytest.raises(RegistryError, match=rf"model '{name}' has no alias 'prod'; aliases: @candidate, @champion"):
        download(f"models:/{name}@prod", comfyui_dir, tracking_uri=tracking)
    with pytest.raises(RegistryError, match=rf"model '{name}' has no version 999"):
        download(f"models:/{name}/999", comfyui_dir, tracking_uri=tracking)
    with pytest.raises(RegistryError, match="expected a model URI models:/NAME@ALIAS"):
        download("runs:/abc/model", comfyui_dir, tracking_uri=tracking)


def test_placing_across_filesystems_copies_then_renames(tmp_path: Path) -> None:
    """A models/diffusion_models folder symlinked to another disk cannot take a plain rename."""
    from wanlite.download import _place

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the test's tmp dir")
    src = shm / f"wanlite-test-{tmp_path.name}.safetensors"
    src.write_bytes(b"payload")
    target = tmp_path / "m.safetensors"
    try:
        _place(src, target)
    finally:
        src.unlink(missing_ok=True)
    assert target.read_bytes() == b"payload" and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
