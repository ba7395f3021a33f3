"""export: one native-named .safetensors that ComfyUI detects and sizes, and diffusers reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file

from wanlite import cli
from wanlite.checkpoint.transformer_keys import COMFY_PREFIX, native_tensor_shapes, to_diffusers
from wanlite.config import PRESETS, ConfigError
from wanlite.export import ExportError, export_student, load_export, read_export
from wanlite.roundtrip import model_outputs, probe_inputs

TINY = PRESETS["tiny"].arch


def comfyui_detect(path: Path) -> dict:
    """ComfyUI's Wan detection (comfy/model_detection.py), restated from WAN_FORMATS.md §7.

    Written independently of wanlite's reader on purpose: the test must not
    grade the exporter with the exporter's own rules.
    """
    with safe_open(str(path), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        metadata = fh.metadata() or {}
    if sum(k.startswith(COMFY_PREFIX) for k in shapes) > 5:
        stripped = {k[len(COMFY_PREFIX) :]: v for k, v in shapes.items() if k.startswith(COMFY_PREFIX)}
        shapes = stripped or shapes
    assert "head.modulation" in shapes, "ComfyUI detects Wan by head.modulation"
    dim = shapes["head.modulation"][-1]
    config = {
        "image_model": "wan2.1",
        "dim": dim,
        "num_heads": dim // 128,
        "out_dim": shapes["head.head.weight"][0] // 4,
        "ffn_dim": shapes["blocks.0.ffn.0.weight"][0],
        "num_layers": len({k.split(".")[1] for k in shapes if k.startswith("blocks.")}),
        "in_dim": shapes["patch_embedding.weight"][1],
        "model_type": "i2v" if "img_emb.proj.0.bias" in shapes else "t2v",
    }
    config.update(json.loads(metadata.get("config", "{}")).get("transformer", {}))
    return {"config": config, "shapes": shapes, "metadata": metadata}


@pytest.fixture(scope="module")
def fp32_export(ship_student: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "student.safetensors"
    return out, export_student(ship_student, out, dtype="fp32", teacher_sha256="ab" * 32)


@pytest.mark.parametrize("prefix", [False, True], ids=["bare", "prefixed"])
def test_comfyui_detects_and_sizes_the_export(ship_student: Path, tmp_path: Path, prefix: bool) -> None:
    report = export_student(ship_student, tmp_path, dtype="bf16", prefix=prefix)
    path = tmp_path / "wanlite-tiny.safetensors"
    assert report["file"] == path.name and path.is_file()
    seen = comfyui_detect(path)
    cfg = seen["config"]
    assert (cfg["dim"], cfg["num_heads"], cfg["num_layers"], cfg["ffn_dim"]) == (128, 1, 2, 256)
    assert cfg["num_heads"] == cfg["dim"] / 128 == TINY.num_heads
    assert (cfg["in_dim"], cfg["out_dim"], cfg["model_type"]) == (16, 16, "t2v")
    assert not any(k.startswith("img_emb.") for k in seen["shapes"])
    assert seen["shapes"] == native_tensor_shapes(TINY), "exactly a native WanModel's key set and shapes"
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
        assert {fh.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    assert all(k.startswith(COMFY_PREFIX) for k in keys) is prefix
    assert read_export(path).prefixed is prefix


def test_header_carries_architecture_and_provenance(fp32_export: tuple[Path, dict], ship_student: Path) -> None:
    path, report = fp32_export
    meta = comfyui_detect(path)["metadata"]
    transformer = json.loads(meta["config"])["transformer"]
    assert transformer == {
        "model_type": "t2v", "dim": 128, "ffn_dim": 256, "num_heads": 1, "num_layers": 2,
        "in_dim": 16, "out_dim": 16, "text_dim": 4096, "freq_dim": 256, "text_len": 512, "eps": 1e-6,
    }  # fmt: skip
    assert meta["teacher_sha256"] == "ab" * 32
    assert meta["wanlite_preset"] == "tiny" and meta["wanlite_version"]
    assert len(meta["source_sha256"]) == 64
    assert report["passed"] and report["num_tensors"] == len(native_tensor_shapes(TINY))


def test_export_reproduces_student_outputs_through_diffusers(
    fp32_export: tuple[Path, dict], ship_student: Path
) -> None:
    path, _ = fp32_export
    student = WanTransformer3DModel.from_pretrained(ship_student).eval()
    inputs = probe_inputs(TINY)
    expected = model_outputs(student, inputs)
    assert expected.abs().max() > 0.1, "a trivial student would prove nothing"

    # 1. diffusers' own converter back to diffusers names, strict load: bit-identical weights.
    rebuilt = WanTransformer3DModel.from_config(student.config).eval()
    rebuilt.load_state_dict(to_diffusers(load_file(str(path))), strict=True)
    for name, tensor in student.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    torch.testing.assert_close(model_outputs(rebuilt, inputs), expected, rtol=0, atol=0)

    # 2. stock from_single_file with the student's config folder. Its tensors keep the
    # file's (unaligned) memory, so SIMD paths may differ in the last bit: fp32 rounding.
    single = WanTransformer3DModel.from_single_file(str(path), config=str(ship_student), local_files_only=True)
    torch.testing.assert_close(model_outputs(single.eval(), inputs), expected, rtol=1e-5, atol=1e-5)

    # 3. our loader, which takes the architecture from the file itself.
    torch.testing.assert_close(model_outputs(load_export(path), inputs), expected, rtol=1e-5, atol=1e-5)


def test_bf16_export_matches_student_within_bf16_rounding(ship_student: Path, tmp_path: Path) -> None:
    path = tmp_path / "bf16.safetensors"
    export_student(ship_student, path, dtype="bf16", prefix=True)
    inputs = probe_inputs(TINY)
    expected = model_outputs(WanTransformer3DModel.from_pretrained(ship_student).eval(), inputs)
    got = model_outputs(load_export(path, dtype=torch.float32), inputs)
    rel = (got - expected).abs().max() / expected.abs().max()
    assert 0 < rel < 0.05, f"bf16 weights should differ from fp32 by rounding only, found rel {rel:.3g}"


def test_cli_export_default_name_and_report(ship_student: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report_path = tmp_path / "export.json"
    assert cli.main(["export", str(ship_student), "--out", str(tmp_path), "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["file"] == "wanlite-tiny.safetensors" and report["dtype"] == "bf16"
    assert (tmp_path / report["file"]).stat().st_size == report["size"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary file left behind"


def test_unsupported_dtype_is_refused(ship_student: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"dtype: expected one of bf16, fp16, fp32, found 'fp8'"):
        export_student(ship_student, tmp_path / "x.safetensors", dtype="fp8")
    assert cli.main(["export", str(ship_student), "--out", str(tmp_path), "--dtype", "int8"]) == 2
    assert "dtype: expected one of" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file_under_the_final_name(
    ship_student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "wanlite-tiny.safetensors"
    target.write_bytes(b"previous export")

    def disk_full(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("wanlite.export.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_student(ship_student, target, dtype="fp32")
    assert target.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_corrupt_or_truncated_exports_are_refused(fp32_export: tuple[Path, dict], tmp_path: Path) -> None:
    path, _ = fp32_export
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"truncated\.safetensors: not a complete safetensors file"):
        read_export(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ExportError, match=r"garbage\.safetensors: not a complete safetensors file"):
        read_export(garbage)
    with pytest.raises(FileNotFoundError, match="no such export file"):
        read_export(tmp_path / "absent.safetensors")


def test_incomplete_key_set_is_refused(fp32_export: tuple[Path, dict], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = load_file(str(fp32_export[0]))
    del tensors["blocks.1.cross_attn.norm_k.weight"]
    holed = tmp_path / "holed.safetensors"
    save_file(tensors, str(holed))
    missing = r"holed\.safetensors: missing tensor 'blocks\.1\.cross_attn\.norm_k\.weight'"
    with pytest.raises(ExportError, match=missing):
        read_export(holed)


def test_export_to_a_store_publishes_file_and_report_under_a_manifest(ship_student: Path, store) -> None:
    uri = store.uri("exports/run-1")
    report = export_student(ship_student, uri, dtype="bf16")
    assert report["uri"] == f"{uri}/wanlite-tiny.safetensors"
    manifest = store.read_manifest("exports/run-1")
    assert set(manifest.files) == {"wanlite-tiny.safetensors", "wanlite-tiny.workflow.json", "export_report.json"}
    assert manifest.files["wanlite-tiny.safetensors"].sha256 == report["sha256"]
    local = store.local_dir("exports/run-1")
    assert read_export(local / "wanlite-tiny.safetensors").arch == TINY
    assert json.loads((local / "export_report.json").read_text())["sha256"] == report["sha256"]


def test_header_records_the_students_sampling(fp32_export: tuple[Path, dict], ship_student: Path) -> None:
    from wanlite.sampling import HEADER_KEY, Sampling, load_sampling

    path, report = fp32_export
    header = comfyui_detect(path)["metadata"]
    assert Sampling.from_json(header[HEADER_KEY]) == load_sampling(ship_student)
    assert report["sampling_recorded"] and report["sampling"] == load_sampling(ship_student).to_dict()


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    import os

    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_export_into_a_new_folder_is_readable_per_umask(ship_student: Path, tmp_path: Path, umask, mask, mode) -> None:
    umask(mask)
    report = export_student(ship_student, tmp_path / "new" / "folder", dtype="bf16")
    path = Path(report["path"])
    assert path.parent == tmp_path / "new" / "folder" and path.name == "wanlite-tiny.safetensors"
    assert path.stat().st_mode & 0o777 == mode, "mkstemp's 0600 would hide the file from ComfyUI run as another user"
    assert Path(report["workflow"]).stat().st_mode & 0o777 == mode


def test_out_that_is_a_file_with_another_suffix_is_refused(ship_student: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--out: expected a \.safetensors file"):
        export_student(ship_student, tmp_path / "model.bin")
