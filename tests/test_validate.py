"""`wanlite validate`: valid teachers pass; every kind of bad input is named precisely.

Each corruption test copies a session teacher to tmp_path, breaks one thing the way
it breaks in real life (deleted shard, cut download, edited config, malicious
pickle), and asserts the problem names the file, the key, what was expected and
what was found.
"""

from __future__ import annotations

import builtins
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wanlite.checkpoint.layout import NATIVE_T5, NATIVE_VAE, SHARD_INDEX
from wanlite.checkpoint.validate import (
    REPORT_JSON,
    REPORT_MD,
    Problem,
    ValidationReport,
    read_safetensors_header,
    validate_teacher,
)
from wanlite.cli import main

# --- helpers ---------------------------------------------------------------------------


@pytest.fixture
def native(tiny_teacher: Path, tmp_path: Path) -> Path:
    """A private copy of the native tiny teacher, safe to corrupt."""
    return Path(shutil.copytree(tiny_teacher, tmp_path / "native"))


@pytest.fixture
def diffusers(tiny_diffusers_teacher: Path, tmp_path: Path) -> Path:
    """A private copy of the diffusers-layout tiny teacher, safe to corrupt."""
    return Path(shutil.copytree(tiny_diffusers_teacher, tmp_path / "diffusers"))


def weight_map(expert: Path) -> dict[str, str]:
    return json.loads((expert / SHARD_INDEX).read_text())["weight_map"]


def rewrite_tensor(shard: Path, name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Rewrite one tensor of a real safetensors shard, keeping the others and the metadata."""
    with safe_open(shard, "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    tensors[name] = change(tensors[name])
    save_file(tensors, shard, metadata=metadata)


def only(report: ValidationReport, predicate: Callable[[Problem], bool]) -> Problem:
    """The single problem matching `predicate`, with every problem shown when that fails."""
    hits = [p for p in report.problems if predicate(p)]
    assert len(hits) == 1, "\n".join(map(str, report.problems)) or "no problems"
    return hits[0]


# --- valid teachers --------------------------------------------------------------------


def test_native_teacher_is_valid(tiny_teacher: Path, tmp_path: Path) -> None:
    report = validate_teacher(tiny_teacher)
    assert report.ok, "\n".join(map(str, report.problems))
    assert report.layout == "native"
    assert set(report.components) == {"high_noise_model", "low_noise_model", "t5", "vae", "tokenizer"}
    for name in ("high_noise_model", "low_noise_model"):
        comp = report.components[name]
        assert comp.arch is not None and comp.arch["dim"] == 256
        assert comp.tensors == 12 + 27 * comp.arch["num_layers"] + 3
        assert len(comp.dtypes) == 1 and comp.bytes > comp.params
    assert report.components["t5"].arch["dim"] == 4096
    assert report.components["vae"].arch["z_dim"] == 16

    js, md = report.write(tmp_path / "out")
    data = json.loads(js.read_text())
    assert data["valid"] is True and data["layout"] == "native" and data["problems"] == []
    assert data["components"]["high_noise_model"]["params"] == report.components["high_noise_model"].params
    assert "# Teacher validation: VALID" in md.read_text() and "| high_noise_model |" in md.read_text()


def test_diffusers_teacher_is_valid(tiny_diffusers_teacher: Path, tiny_teacher: Path) -> None:
    report = validate_teacher(tiny_diffusers_teacher)
    assert report.ok, "\n".join(map(str, report.problems))
    assert report.layout == "diffusers"
    native = validate_teacher(tiny_teacher)
    for name in ("high_noise_model", "low_noise_model", "t5", "vae"):
        assert report.components[name].params == native.components[name].params, name
        assert report.components[name].arch == native.components[name].arch, name


# --- CLI -------------------------------------------------------------------------------


def test_cli_valid_teacher_exits_0_and_writes_reports(tiny_teacher: Path, tmp_path: Path, capsys) -> None:
    assert main(["validate", str(tiny_teacher), "--report-dir", str(tmp_path / "r"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["valid"] is True
    assert json.loads((tmp_path / "r" / REPORT_JSON).read_text()) == printed
    assert (tmp_path / "r" / REPORT_MD).is_file()


@pytest.mark.parametrize("kind", ["local_store", pytest.param("s3_store", marks=pytest.mark.slow)])
def test_cli_store_uri(kind: str, request, tiny_teacher: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """file:// and s3:// (moto) store URIs resolve through the store's manifest-verified local_dir."""
    store = request.getfixturevalue(kind)
    monkeypatch.setenv("WANLITE_CACHE", str(tmp_path / "cache"))
    store.put_dir(tiny_teacher, "teachers/tiny", progress=False)
    assert main(["validate", store.uri("teachers/tiny"), "--report-dir", str(tmp_path / "r")]) == 0
    assert "native layout, valid" in capsys.readouterr().out


def test_cli_store_uri_without_manifest_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "store" / "teachers" / "half").mkdir(parents=True)
    uri = (tmp_path / "store" / "teachers" / "half").as_uri()
    assert main(["validate", uri, "--report-dir", str(tmp_path / "r")]) == 2
    assert "half" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_invalid_teacher_exits_1_and_prints_problems(native: Path, tmp_path: Path, capsys) -> None:
    (native / NATIVE_VAE).unlink()
    assert main(["validate", str(native), "--report-dir", str(tmp_path / "r")]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and NATIVE_VAE in out and "no such file" in out
    assert json.loads((tmp_path / "r" / REPORT_JSON).read_text())["valid"] is False


def test_cli_missing_directory_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["validate", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


# --- layout and files ------------------------------------------------------------------


def test_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "weights.bin").write_bytes(b"\0" * 16)
    report = validate_teacher(tmp_path / "odd")
    problem = only(report, lambda p: p.key == "layout")
    assert report.layout is None and not report.ok
    assert "native" in problem.expected and "diffusers" in problem.expected
    assert "weights.bin" in problem.found


def test_missing_expert_folder(native: Path) -> None:
    shutil.rmtree(native / "low_noise_model")
    report = validate_teacher(native)
    problem = only(report, lambda p: p.file == "low_noise_model")
    assert report.layout == "native"
    assert "low_noise_model expert folder" in problem.expected and problem.found == "no such folder"


def test_missing_diffusers_expert_folder(diffusers: Path) -> None:
    shutil.rmtree(diffusers / "transformer_2")
    problem = only(validate_teacher(diffusers), lambda p: p.file == "transformer_2")
    assert "expert folder" in problem.expected and problem.found == "no such folder"


def test_missing_shard(native: Path) -> None:
    expert = native / "high_noise_model"
    shard = sorted(set(weight_map(expert).values()))[-1]
    (expert / shard).unlink()
    report = validate_teacher(native)
    problem = only(report, lambda p: shard in p.key)
    assert problem.file == f"high_noise_model/{SHARD_INDEX}"
    assert f"shard file {shard}" in problem.expected and problem.found == "no such file"
    # the tensors that shard held are not reported again one by one
    assert len(report.problems) == 1, "\n".join(map(str, report.problems))


def test_truncated_shard(native: Path) -> None:
    expert = native / "low_noise_model"
    shard = expert / sorted(set(weight_map(expert).values()))[0]
    full = shard.stat().st_size
    with shard.open("r+b") as handle:
        handle.truncate(full - 1000)
    problem = only(validate_teacher(native), lambda p: p.key == "data_offsets")
    assert problem.file == f"low_noise_model/{shard.name}"
    header_len = int.from_bytes(shard.read_bytes()[:8], "little")
    assert problem.expected.startswith(f"{full - 8 - header_len} bytes")
    assert "truncated" in problem.found and str(full - 1000 - 8 - header_len) in problem.found


def test_shard_cut_inside_its_header(native: Path) -> None:
    expert = native / "low_noise_model"
    shard = expert / sorted(set(weight_map(expert).values()))[0]
    with shard.open("r+b") as handle:
        handle.truncate(100)
    problem = only(validate_teacher(native), lambda p: p.key == "header")
    assert problem.file == f"low_noise_model/{shard.name}"
    assert "truncated" in problem.found and "92 bytes" in problem.found


def test_index_names_tensor_no_shard_has(native: Path) -> None:
    index = native / "high_noise_model" / SHARD_INDEX
    data = json.loads(index.read_text())
    shard = next(iter(data["weight_map"].values()))
    data["weight_map"]["blocks.0.ghost.weight"] = shard
    index.write_text(json.dumps(data))
    problem = only(validate_teacher(native), lambda p: p.key == "blocks.0.ghost.weight")
    assert problem.file == f"high_noise_model/{SHARD_INDEX}"
    assert shard in problem.expected and f"{shard} has no tensor" in problem.found


def test_shard_holds_tensor_the_index_does_not_name(native: Path) -> None:
    index = native / "high_noise_model" / SHARD_INDEX
    data = json.loads(index.read_text())
    shard = data["weight_map"].pop("head.modulation")
    index.write_text(json.dumps(data))
    report = validate_teacher(native)
    problem = only(report, lambda p: p.key == "head.modulation" and "index" in p.found)
    assert problem.file == f"high_noise_model/{shard}"


def test_total_size_mismatch(native: Path) -> None:
    index = native / "high_noise_model" / SHARD_INDEX
    data = json.loads(index.read_text())
    real = data["metadata"]["total_size"]
    data["metadata"]["total_size"] = real + 2
    index.write_text(json.dumps(data))
    problem = only(validate_teacher(native), lambda p: p.key == "metadata.total_size")
    assert problem.expected.startswith(str(real)) and problem.found == str(real + 2)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_weight_map_naming_a_file_outside_the_folder_is_refused(native: Path, where: str) -> None:
    from wanlite.checkpoint.reader import TeacherReader, TeacherReadError

    expert = native / "high_noise_model"
    index = expert / SHARD_INDEX
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[0]
    outside = native.parent / "elsewhere.safetensors"  # a real shard, so reading it would "work"
    shutil.move(expert / shard, outside)
    name = "../../elsewhere.safetensors" if where == "parent" else str(outside)
    data["weight_map"] = {k: name if v == shard else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    problem = only(validate_teacher(native), lambda p: p.key == f"weight_map -> {name}")
    assert problem.file == f"high_noise_model/{SHARD_INDEX}"
    assert "a shard file name inside" in problem.expected and problem.found == "a path outside it"
    with pytest.raises(TeacherReadError, match=rf"weight_map: expected shard file names inside .*found {name}"):
        TeacherReader(native)


# --- tensors ---------------------------------------------------------------------------


def test_wrong_shape(native: Path) -> None:
    expert = native / "high_noise_model"
    name = "blocks.1.ffn.0.weight"
    shard = weight_map(expert)[name]
    rewrite_tensor(expert / shard, name, lambda t: t.t().contiguous())  # [640, 256] -> [256, 640]
    report = validate_teacher(native)
    problem = only(report, lambda p: p.key == name)
    assert problem.file == f"high_noise_model/{shard}"
    assert problem.expected.startswith("shape [640, 256]") and problem.found == "shape [256, 640]"
    assert len(report.problems) == 1, "\n".join(map(str, report.problems))


def test_wrong_shape_diffusers_names_the_diffusers_key(diffusers: Path) -> None:
    expert = diffusers / "transformer"
    name = "blocks.2.ffn.net.0.proj.weight"
    shard = expert / weight_map(expert)[name]
    rewrite_tensor(shard, name, lambda t: t.t().contiguous())
    problem = only(validate_teacher(diffusers), lambda p: p.key == name)
    assert problem.expected.startswith("shape [640, 256]") and problem.found == "shape [256, 640]"


def test_wrong_dtype(native: Path) -> None:
    expert = native / "low_noise_model"
    name = "blocks.0.self_attn.q.weight"
    shard = weight_map(expert)[name]
    before = validate_teacher(native).components["low_noise_model"].dtypes
    (main_dtype,) = before
    other = torch.float16 if main_dtype != "F16" else torch.bfloat16
    rewrite_tensor(expert / shard, name, lambda t: t.to(other))
    report = validate_teacher(native)
    problem = only(report, lambda p: p.key == name)
    assert problem.file == f"low_noise_model/{shard}"
    assert problem.expected.startswith(main_dtype) and problem.found in {"F16", "BF16"}


def test_integer_tensor_is_not_a_weight(native: Path) -> None:
    expert = native / "low_noise_model"
    name = "head.head.bias"
    rewrite_tensor(expert / weight_map(expert)[name], name, lambda t: t.to(torch.int32))
    problem = only(validate_teacher(native), lambda p: p.key == name and "floating" in p.expected)
    assert problem.found == "I32"


def test_config_dims_disagree_with_tensors(native: Path) -> None:
    config = native / "high_noise_model" / "config.json"
    cfg = json.loads(config.read_text())
    cfg["ffn_dim"] = 512
    config.write_text(json.dumps(cfg))
    report = validate_teacher(native)
    problem = only(report, lambda p: p.key == "ffn_dim")
    assert problem.file == "high_noise_model/config.json"
    assert problem.expected.startswith("640, as the tensors imply")
    assert "blocks.0.ffn.0.weight is [640, 256]" in problem.expected
    assert problem.found == "512"
    # one actionable message, not one per FFN tensor (nor an expert-mismatch echo)
    assert len(report.problems) == 1, "\n".join(map(str, report.problems))


def test_diffusers_config_layers_disagree_with_tensors(diffusers: Path) -> None:
    config = diffusers / "transformer_2" / "config.json"
    cfg = json.loads(config.read_text())
    real = cfg["num_layers"]
    cfg["num_layers"] = real + 1
    config.write_text(json.dumps(cfg))
    report = validate_teacher(diffusers)
    problem = only(report, lambda p: p.key == "num_layers")
    assert problem.file == "transformer_2/config.json"
    assert problem.expected.startswith(f"{real}, as the tensors imply") and problem.found == str(real + 1)
    assert len(report.problems) == 1, "\n".join(map(str, report.problems))


def test_experts_must_share_one_architecture(native: Path) -> None:
    """A low-noise expert one layer shorter (config, tensors and index agreeing) is refused."""
    from wanlite.config import TINY_TEACHER

    expert = native / "low_noise_model"
    last = TINY_TEACHER.num_layers - 1
    index = json.loads((expert / SHARD_INDEX).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(expert / shard, "pt") as handle:
            names = [k for k in handle.keys() if not k.startswith(f"blocks.{last}.")]  # noqa: SIM118
            kept = {k: handle.get_tensor(k) for k in names}
        save_file(kept, expert / shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith(f"blocks.{last}.")}
    index["metadata"].pop("total_size", None)
    (expert / SHARD_INDEX).write_text(json.dumps(index))
    cfg = json.loads((expert / "config.json").read_text())
    cfg["num_layers"] = last
    (expert / "config.json").write_text(json.dumps(cfg))
    problem = only(validate_teacher(native), lambda p: p.key == "num_layers")
    assert problem.file == "low_noise_model/config.json"
    assert problem.expected.startswith(f"{TINY_TEACHER.num_layers}, as in high_noise_model/config.json")
    assert problem.found == str(last)


# --- .pth files ------------------------------------------------------------------------


class _Booby:
    """Unpickling this would create a marker file (by calling `open(marker, "w")`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", ["object", "function"])
def test_pth_with_pickled_object_is_refused_unexecuted(native: Path, tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "EXECUTED"
    evil = _Booby(marker) if payload == "object" else shutil.rmtree
    path = native / NATIVE_VAE
    state = torch.load(path, weights_only=True)
    state["extra"] = evil
    torch.save(state, path)

    report = validate_teacher(native)
    problem = only(report, lambda p: p.file == NATIVE_VAE)
    assert "state dict of tensors" in problem.expected
    assert "non-tensor objects" in problem.found and "refused" in problem.found
    assert not marker.exists(), "validation unpickled (executed) the object"
    if payload == "object":  # control: the file really is a booby trap for a plain torch.load
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_pth_with_wrong_tensor_shape(native: Path) -> None:
    path = native / NATIVE_T5
    state = torch.load(path, weights_only=True)
    name = "blocks.1.ffn.fc1.weight"
    state[name] = state[name][:-1].clone()
    torch.save(state, path)
    problem = only(validate_teacher(native), lambda p: p.key == name)
    assert problem.file == NATIVE_T5
    assert problem.expected.startswith("shape [")
    assert problem.found == f"shape {list(state[name].shape)}"


def test_pth_missing_tensor_and_non_tensor_value(native: Path) -> None:
    path = native / NATIVE_T5
    state = torch.load(path, weights_only=True)
    del state["blocks.0.norm1.weight"]
    state["step"] = 7
    torch.save(state, path)
    report = validate_teacher(native)
    assert only(report, lambda p: p.key == "blocks.0.norm1.weight").found == "no such tensor"
    assert "int" in only(report, lambda p: p.key == "step").found


def test_t5_width_must_match_experts_text_dim(native: Path) -> None:
    """Experts whose text_dim disagrees with T5's width cannot consume its embeddings."""
    for expert in ("high_noise_model", "low_noise_model"):
        index = json.loads((native / expert / SHARD_INDEX).read_text())
        name = "text_embedding.0.weight"
        rewrite_tensor(native / expert / index["weight_map"][name], name, lambda t: t[:, :2048].contiguous())
        index["metadata"].pop("total_size", None)
        (native / expert / SHARD_INDEX).write_text(json.dumps(index))
    report = validate_teacher(native)
    problem = only(report, lambda p: p.file == NATIVE_T5 and p.key == "dim")
    assert problem.expected.startswith("2048") and problem.found == "4096"


# --- tokenizer, many problems at once, header-only reads ------------------------------


def test_missing_tokenizer(native: Path) -> None:
    shutil.rmtree(native / "google")
    problem = only(validate_teacher(native), lambda p: p.file == "google/umt5-xxl")
    assert "tokenizer" in problem.expected and problem.found == "no such folder"


def test_tokenizer_larger_than_t5_vocabulary(native: Path) -> None:
    path = native / NATIVE_T5
    state = torch.load(path, weights_only=True)
    state["token_embedding.weight"] = state["token_embedding.weight"][:100].clone()
    torch.save(state, path)
    problem = only(validate_teacher(native), lambda p: p.key == "vocab size")
    assert problem.file == "google/umt5-xxl"
    assert problem.expected == "at most 100 (rows of the T5 token embedding)" and int(problem.found) > 100


def test_all_problems_collected_in_one_pass(native: Path) -> None:
    expert = native / "high_noise_model"
    (expert / sorted(set(weight_map(expert).values()))[-1]).unlink()
    (native / NATIVE_VAE).write_bytes(b"not a zip")
    shutil.rmtree(native / "google")
    files = {p.file for p in validate_teacher(native).problems}
    assert {f"high_noise_model/{SHARD_INDEX}", NATIVE_VAE, "google/umt5-xxl"} <= files


def test_header_read_touches_no_tensor_data(tmp_path: Path) -> None:
    """A 4 GiB (sparse) shard is checked with a few hundred bytes of reads."""
    io = Path("/proc/self/io")
    if not io.exists():
        pytest.skip("needs Linux /proc/self/io to count bytes read")
    numel = 1 << 30
    header = json.dumps({"w": {"dtype": "F32", "shape": [numel], "data_offsets": [0, 4 * numel]}}).encode()
    path = tmp_path / "big.safetensors"
    with path.open("wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        handle.truncate(8 + len(header) + 4 * numel)

    def rchar() -> int:
        return int(next(line for line in io.read_text().splitlines() if line.startswith("rchar")).split()[1])

    before = rchar()
    parsed, data_len = read_safetensors_header(path)
    read = rchar() - before
    assert parsed["w"]["shape"] == [numel] and data_len == 4 * numel
    assert read < 64 * 1024, f"read {read} bytes"
