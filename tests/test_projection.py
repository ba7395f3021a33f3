"""Teacher reader and teacher -> student projection: exactness, coherence, laziness, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.student import PROJ_TEACHER, write_teacher
from wanlite.checkpoint.layout import DIFFUSERS_EXPERTS, EXPERT_DIRS, SHARD_INDEX
from wanlite.checkpoint.reader import TeacherReader, TeacherReadError
from wanlite.checkpoint.transformer_keys import native_tensor_shapes, native_to_diffusers_names, to_diffusers
from wanlite.cli import main as cli_main
from wanlite.config import ConfigError, WanArch
from wanlite.projection import ProjectionError, project_student
from wanlite.projection.calibrate import CalibrationError, build_calibration_set, collect_statistics, high_noise_share
from wanlite.projection.project import REPORT_JSON, build_student_state
from wanlite.projection.select import importance_selection, uniform_selection
from wanlite.sampling import load_sampling, student_sampling
from wanlite.student import WanLiteStudent

HIGH, LOW = EXPERT_DIRS
REPO = Path(__file__).resolve().parents[1]
HALF = WanArch(dim=256, ffn_dim=512, num_heads=2, num_layers=PROJ_TEACHER.num_layers)  # width only
HALF_SHALLOW = HALF.replace(num_layers=2)  # depth + width
SHALLOW = PROJ_TEACHER.replace(num_layers=2)  # depth only


def held_out_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed inputs never used for calibration: both experts' timestep ranges."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    latents = torch.randn(4, 16, 8, 8, generator=gen)
    context = torch.randn(4, 512, 4096, generator=gen)
    return latents, torch.tensor([990.0, 900.0, 600.0, 150.0]), context


def teacher_output(reader: TeacherReader, latents, timesteps, context) -> torch.Tensor:
    """What the teacher predicts: each input through the expert its timestep routes to."""
    out = torch.empty_like(latents)
    for expert in EXPERT_DIRS:
        rows = (timesteps >= 875) if expert == HIGH else (timesteps < 875)
        model = reader.load_expert(expert)
        with torch.no_grad():
            out[rows] = model(latents[rows].unsqueeze(2), timesteps[rows], context[rows]).sample.squeeze(2)
    return out


def student_output(student: WanLiteStudent, latents, timesteps, context) -> torch.Tensor:
    with torch.no_grad():
        return student.eval().forward_image(latents, timesteps, context)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


# --- the reader ------------------------------------------------------------------------


@pytest.mark.slow
def test_reader_gives_the_same_tensors_in_both_layouts(tiny_teacher, tiny_diffusers_teacher):
    native, diffusers = TeacherReader(tiny_teacher), TeacherReader(tiny_diffusers_teacher)
    assert (native.layout, diffusers.layout) == ("native", "diffusers")
    assert native.arch == diffusers.arch and native.expert_names == diffusers.expert_names == EXPERT_DIRS
    for expert in EXPERT_DIRS:
        for name, tensor in native.tensors(expert):
            assert torch.equal(tensor, diffusers.tensor(expert, name)), (expert, name)
    latents, timesteps, context = held_out_inputs(0)
    x = latents[:2].unsqueeze(2)
    with torch.no_grad():
        whole = diffusers.load_expert(LOW)(x, timesteps[:2], context[:2]).sample
        streamed = native.streaming_expert(LOW)(x, timesteps[:2], context[:2]).sample
    assert torch.equal(whole, streamed)


def test_reader_reads_lazily_one_shard_at_a_time(planted_teacher, tmp_path):
    """A missing shard only fails the tensors stored in it: nothing is read up front."""
    teacher = tmp_path / "teacher"
    for expert in EXPERT_DIRS:
        (teacher / expert).mkdir(parents=True)
        for file in (planted_teacher / expert).iterdir():
            (teacher / expert / file.name).symlink_to(file)
    index = json.loads((teacher / LOW / SHARD_INDEX).read_text())["weight_map"]
    gone = index["head.head.weight"]
    (teacher / LOW / gone).unlink()
    reader = TeacherReader(teacher)
    kept = next(name for name, shard in index.items() if shard != gone)
    assert torch.equal(reader.tensor(LOW, kept), TeacherReader(planted_teacher).tensor(LOW, kept))
    with pytest.raises(TeacherReadError, match=f"{gone}: missing shard"):
        reader.tensor(LOW, "head.head.weight")


def test_reader_names_file_key_and_shapes_on_mismatch(planted_teacher, tmp_path):
    teacher = tmp_path / "teacher"
    for expert in EXPERT_DIRS:
        (teacher / expert).mkdir(parents=True)
        for file in (planted_teacher / expert).iterdir():
            (teacher / expert / file.name).symlink_to(file)
        config = teacher / expert / "config.json"
        wrong = {**json.loads(config.read_text()), "ffn_dim": 2048}
        config.unlink()
        config.write_text(json.dumps(wrong))
    expected = r"blocks\.0\.ffn\.0\.weight: expected shape \(2048, 512\), found \(1024, 512\)"
    with pytest.raises(TeacherReadError, match=expected):
        TeacherReader(teacher).tensor(LOW, "blocks.0.ffn.0.weight")


# --- (a) same shape: exact reproduction -------------------------------------------------


@pytest.mark.parametrize("method", ["importance", "uniform"])
def test_same_shape_student_reproduces_the_teacher_exactly(planted_teacher, tmp_path, method):
    report = project_student(planted_teacher, PROJ_TEACHER, out_dir=tmp_path / "s", method=method, calib_samples=2,
                            calib_random=True)
    assert report["totals"]["randomly_initialised"] == 0
    assert report["totals"]["from_teacher"] == report["totals"]["tensors"] == len(native_tensor_shapes(PROJ_TEACHER))
    student = WanLiteStudent.from_pretrained(tmp_path / "s")
    reader = TeacherReader(planted_teacher)
    latents, timesteps, context = held_out_inputs(0)
    with torch.no_grad():
        expected = reader.load_expert(LOW)(latents.unsqueeze(2), timesteps, context).sample.squeeze(2)
    assert torch.equal(student_output(student, latents, timesteps, context), expected)


# --- (b) reductions: importance < uniform < random init ---------------------------------

# Margins fixed before looking at results: importance must remove at least a quarter of
# the uniform baseline's error (a smaller gain would not justify calibration), and the
# uniform baseline must beat random init by at least a tenth (else "inherits the
# teacher" means nothing). Each must hold for every seed and both reductions, not on average.
IMPORTANCE_VS_UNIFORM = 0.75
UNIFORM_VS_RANDOM = 0.9


def _projected(reader: TeacherReader, arch: WanArch, selection) -> WanLiteStudent:
    state, _ = build_student_state(reader, arch, selection, {LOW: 1.0}, torch.float32)
    student = WanLiteStudent.from_arch(arch)
    student.load_state_dict(to_diffusers(state), strict=True)
    return student


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_importance_beats_uniform_beats_random_init(tmp_path, seed):
    teacher = write_teacher(tmp_path / "teacher", PROJ_TEACHER, seed=seed)
    reader = TeacherReader(teacher)
    calib = build_calibration_set(reader.arch, num_samples=2, latent_size=8, seed=seed)
    stats = collect_statistics(reader, calib)
    inputs = held_out_inputs(seed)
    reference = teacher_output(reader, *inputs)
    for arch in (HALF, HALF_SHALLOW):
        torch.manual_seed(seed)
        errors = {
            "importance": relative_error(
                student_output(_projected(reader, arch, importance_selection(stats, reader.arch, arch)), *inputs),
                reference,
            ),
            "uniform": relative_error(
                student_output(_projected(reader, arch, uniform_selection(reader.arch, arch)), *inputs), reference
            ),
            "random": relative_error(student_output(WanLiteStudent.from_arch(arch), *inputs), reference),
        }
        assert errors["importance"] < IMPORTANCE_VS_UNIFORM * errors["uniform"], (arch, errors)
        assert errors["uniform"] < UNIFORM_VS_RANDOM * errors["random"], (arch, errors)


def test_importance_keeps_planted_massive_channels(planted_teacher, tmp_path):
    report = project_student(planted_teacher, HALF_SHALLOW, out_dir=tmp_path / "s", calib_samples=2, calib_random=True)
    bias = TeacherReader(planted_teacher).tensor(LOW, "patch_embedding.bias")
    planted = set(bias.topk(4).indices.tolist())  # the fixture's massive channels: a huge constant bias
    # the log-normal channel gains can push a few more past the 100x threshold; those count too
    assert planted <= set(report["selection"]["outlier_channels"])
    assert report["selection"]["layers"] == [0, 3]
    assert all(s != 1.0 for s in report["selection"]["qk_scale"]["self_attn.norm_q"])  # RMS span shrank
    assert report["totals"]["randomly_initialised"] == 0
    assert report["calibration"]["inputs_per_expert"][HIGH] > 0 and report["calibration"]["inputs_per_expert"][LOW] > 0
    md = (tmp_path / "s" / "projection_report.md").read_text()
    assert "**0 randomly initialised**" in md and "blocks.1.ffn.2.weight" in md


def _site_inputs(model, latents, timesteps, context) -> dict[str, torch.Tensor]:
    """What block 0's self-attn, cross-attn and FFN, and the head's projection, receive."""
    captured: dict[str, torch.Tensor] = {}
    block = model.blocks[0]
    sites = {"norm1": block.attn1, "norm3": block.attn2, "norm2": block.ffn, "head": model.proj_out}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, k=k: captured.__setitem__(k, a[0].float())) for k, m in sites.items()
    ]
    with torch.no_grad():
        model(latents.unsqueeze(2), timesteps, context)
    for hook in hooks:
        hook.remove()
    return captured


def _scale_vs_teacher(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Least-squares k in student ~ k * teacher: 1.0 when the student sees the teacher's values."""
    return float((student * teacher).sum() / teacher.pow(2).sum())


@pytest.mark.slow
def test_norm_ratios_restore_the_teachers_block_inputs_with_massive_channels_kept(planted_teacher, tmp_path):
    """With the massive channels kept, a LayerNorm over the kept channels divides by a larger sigma: the
    student's block inputs came out at about half the teacher's. The folded ratio brings them back to 1x."""
    latents, timesteps, context = (t[2:] for t in held_out_inputs(0))  # low-noise timesteps: the seeding expert
    teacher = _site_inputs(TeacherReader(planted_teacher).load_expert(LOW), latents, timesteps, context)
    scales = {}
    for fix in (True, False):
        out = tmp_path / f"fix-{fix}"
        report = project_student(planted_teacher, HALF, out_dir=out, calib_samples=4, calib_random=True,
                                 norm_ratios=fix)  # fmt: skip
        assert report["fixes"]["norm_ratios"] is fix
        kept = torch.tensor(report["selection"]["channel_indices"])
        student = _site_inputs(WanLiteStudent.from_pretrained(out), latents, timesteps, context)
        scales[fix] = {k: _scale_vs_teacher(student[k], teacher[k][..., kept]) for k in ("norm1", "head")}
    ratios = report_with_fix = json.loads((tmp_path / "fix-True" / REPORT_JSON).read_text())["norm_ratios"]
    assert all(r > 1.3 for r in ratios["blocks"]["norm1"]) and ratios["head"] > 1.3, ratios
    assert "norm ratio" in (tmp_path / "fix-True" / "projection_report.md").read_text()
    assert report_with_fix["blocks"]["norm3"] and report["norm_ratios"] is None
    # block 0's input is exactly the teacher's kept channels, so its first LayerNorm is compared exactly;
    # the head sees the residual after every (approximated) block, so it gets a looser bound
    assert 0.95 < scales[True]["norm1"] < 1.05 and scales[False]["norm1"] < 0.8, scales
    assert abs(scales[True]["head"] - 1) < abs(scales[False]["head"] - 1), scales


@pytest.mark.slow
def test_embedding_hidden_units_are_ranked_by_their_own_activations(planted_teacher, tmp_path):
    """The fixture makes half of each embedding MLP's hidden units matter (x3) and half not (x0.2), at random
    positions unrelated to the residual channels; the student keeps half, so it must keep the big ones (all of
    them for the text MLP; for the time MLP a big unit whose activation stays near zero on the calibration
    timesteps may rightly lose to a small busy one). The residual channel set keeps about half of them."""
    reader = TeacherReader(planted_teacher)
    for fix in (True, False):
        report = project_student(planted_teacher, HALF, out_dir=tmp_path / f"fix-{fix}", calib_samples=2,
                                 calib_random=True, rank_embedding_units=fix)  # fmt: skip
        for mlp in ("text_embedding", "time_embedding"):
            big = reader.tensor(LOW, f"{mlp}.2.weight").norm(dim=0).topk(HALF.dim).indices.sort().values.tolist()
            kept = report["selection"]["embedding_units"][mlp]
            overlap = len(set(kept) & set(big)) / len(big)
            assert (overlap >= (1.0 if mlp == "text_embedding" else 0.9)) if fix else overlap < 0.7, (mlp, fix, overlap)


# --- (c) depth only: exactly the chosen blocks ------------------------------------------


def test_depth_only_reduction_copies_the_chosen_blocks(planted_teacher, tmp_path):
    report = project_student(planted_teacher, SHALLOW, out_dir=tmp_path / "s", calib_samples=2, calib_random=True)
    assert report["selection"]["layers"] == [0, PROJ_TEACHER.num_layers - 1]
    reader = TeacherReader(planted_teacher)
    student = WanLiteStudent.from_pretrained(tmp_path / "s").state_dict()
    to_diffusers_name = native_to_diffusers_names(SHALLOW)
    for name in native_tensor_shapes(SHALLOW):
        source = name
        if name.startswith("blocks."):
            j, rest = name.split(".", 2)[1:]
            source = f"blocks.{report['selection']['layers'][int(j)]}.{rest}"
        assert torch.equal(student[to_diffusers_name[name]], reader.tensor(LOW, source)), name


def test_mix_blends_both_experts_and_says_so(planted_teacher, tmp_path):
    report = project_student(planted_teacher, SHALLOW, out_dir=tmp_path / "s", method="uniform", expert="mix")
    share = high_noise_share()
    assert report["seeded_from"] == pytest.approx({HIGH: share, LOW: 1 - share})
    assert abs(share - 0.632) < 1e-3
    reader = TeacherReader(planted_teacher)
    name = "blocks.3.ffn.0.weight"
    blended = share * reader.tensor(HIGH, name) + (1 - share) * reader.tensor(LOW, name)
    student = WanLiteStudent.from_pretrained(tmp_path / "s").state_dict()
    assert torch.allclose(student["blocks.1.ffn.net.0.proj.weight"], blended, atol=1e-7, rtol=0)
    entry = next(e for e in report["tensors"] if e["tensor"] == "blocks.1.ffn.0.weight")
    assert len(entry["sources"]) == 2 and "blend" in entry["method"]


# --- (d) the projected student stands alone ---------------------------------------------

_LOAD_ALONE = """
import sys, torch
from wanlite.student import WanLiteStudent
student = WanLiteStudent.from_pretrained(sys.argv[1])
with torch.no_grad():
    out = student.forward_image(torch.randn(1, 16, 8, 8), torch.tensor([500.0]), torch.randn(1, 512, 4096))
assert torch.isfinite(out).all()
print("ok")
"""


@pytest.mark.slow
def test_projected_student_loads_without_the_teacher(planted_teacher, tmp_path):
    teacher = shutil.copytree(planted_teacher, tmp_path / "teacher")
    project_student(teacher, HALF_SHALLOW, out_dir=tmp_path / "student", method="uniform")
    config = (tmp_path / "student" / "config.json").read_text()
    assert str(teacher) not in config and "teacher" not in config
    # A slice of the teacher has no guidance folded in: it records the teacher-like CFG settings.
    assert load_sampling(tmp_path / "student") == student_sampling(guided=False)
    teacher.rename(tmp_path / "moved-away")  # root ignores chmod 000, so the teacher is moved instead
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_ALONE, str(tmp_path / "student")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


# --- bad input: clear errors before any heavy work --------------------------------------


def stub_teacher(root: Path, *, layout: str = "native", experts=EXPERT_DIRS, **changes) -> Path:
    """Configs and shard indexes only; the shards are empty files, so reading any tensor would fail.

    An error raised against a stub therefore proves it was raised before any weight was read.
    """
    arch = PROJ_TEACHER.replace(**changes)
    names = native_tensor_shapes(arch)
    if layout == "diffusers":
        names = native_to_diffusers_names(arch).values()
        (root / "model_index.json").parent.mkdir(parents=True, exist_ok=True)
        (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    for expert in experts:
        folder = root / (expert if layout == "native" else DIFFUSERS_EXPERTS[expert])
        folder.mkdir(parents=True)
        config = arch.native_config() if layout == "native" else arch.diffusers_config()
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "empty.safetensors").touch()
        (folder / SHARD_INDEX).write_text(json.dumps({"weight_map": dict.fromkeys(names, "empty.safetensors")}))
    return root


@pytest.mark.parametrize(
    ("student", "teacher_changes", "error", "message"),
    [
        (HALF.replace(dim=200, num_heads=1), {}, ConfigError, r"dim: 200 is not a multiple of 128"),
        (HALF.replace(num_layers=6), {}, ProjectionError, r"num_layers: student 6 exceeds the teacher's 4"),
        (HALF.replace(dim=640, num_heads=5), {}, ProjectionError, r"num_heads: student 5 exceeds the teacher's 4"),
        (HALF.replace(ffn_dim=2048), {}, ProjectionError, r"ffn_dim: student 2048 exceeds the teacher's 1024"),
        (HALF, {"text_dim": 1024}, ProjectionError, r"text_dim: expected the teacher's 1024, found 4096"),
        (HALF, {"in_dim": 32, "out_dim": 32}, ProjectionError, r"in_dim: expected the teacher's 32, found 16.*out_dim"),
    ],
)
def test_incompatible_shapes_are_refused(tmp_path, student, teacher_changes, error, message):
    teacher = stub_teacher(tmp_path / "teacher", layout="diffusers", **teacher_changes)
    with pytest.raises(error, match=message):
        project_student(teacher, student, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("expert", ["low", "mix"])
def test_missing_expert_is_refused(tmp_path, expert):
    teacher = stub_teacher(tmp_path / "teacher", layout="diffusers", experts=(HIGH,))
    with pytest.raises(ProjectionError, match=f"--expert {expert} needs low_noise_model.*found high_noise_model"):
        project_student(teacher, HALF, out_dir=tmp_path / "out", expert=expert)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"calib_latents": torch.zeros(2, 4, 8, 8)}, r"latents: expected \[N, 16, h, w\].*found \[2, 4, 8, 8\]"),
        ({"calib_latents": torch.zeros(2, 16, 7, 8)}, r"even h, w.*found \[2, 16, 7, 8\]"),
        ({"calib_latents": torch.zeros(2, 16, 8, 8), "calib_context": torch.zeros(2, 77, 1024)},
         r"context: expected \[2, L <= 512, 4096\].*found \[2, 77, 1024\]"),
        ({"calib_latents": torch.zeros(2, 16, 8, 8), "calib_context": torch.zeros(3, 77, 4096)},
         r"context: expected \[2, .*found \[3, 77, 4096\]"),
        ({"calib_samples": 0}, r"calib_samples: expected >= 1, found 0"),
    ],
)
def test_bad_calibration_data_is_refused(tmp_path, options, message):
    with pytest.raises(CalibrationError, match=message):
        project_student(
            stub_teacher(tmp_path / "teacher"), HALF, out_dir=tmp_path / "out", calib_random=True, **options
        )


@pytest.mark.parametrize(("option", "message"), [({"method": "svd"}, "method: expected one of importance, uniform"),
                                                 ({"expert": "both"}, "expert: expected one of low, high, mix")])
def test_unknown_method_or_expert_is_refused(tmp_path, option, message):
    with pytest.raises(ProjectionError, match=message):
        project_student(stub_teacher(tmp_path / "teacher"), HALF, out_dir=tmp_path / "out", **option)


def test_output_holding_another_student_is_refused(planted_teacher, tmp_path):
    out = tmp_path / "student"
    first = project_student(planted_teacher, HALF_SHALLOW, out_dir=out, method="uniform")
    weights = out / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = project_student(planted_teacher, HALF_SHALLOW, out_dir=out, method="uniform")  # same projection: kept
    assert again == first and weights.stat().st_mtime_ns == stamp
    with pytest.raises(ProjectionError, match="already holds a different student"):
        project_student(planted_teacher, HALF_SHALLOW, out_dir=out, method="uniform", expert="high")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a student")
    with pytest.raises(ProjectionError, match="not empty and holds no finished projection"):
        project_student(planted_teacher, HALF_SHALLOW, out_dir=tmp_path / "other", method="uniform")


# --- the command line -------------------------------------------------------------------


@pytest.mark.slow
def test_cli_projects_the_tiny_preset_into_the_store(tiny_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANLITE_STORE", f"file://{tmp_path / 'store'}")
    args = ["project", "--teacher", str(tiny_teacher), "--preset", "tiny", "--calib-samples", "2"]
    assert cli_main(args) == 2, "importance without calibration data: refused unless random inputs are asked for"
    assert "expected the pipeline's own data" in capsys.readouterr().err
    args.append("--calib-random")
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    uri = printed.split("student: ")[1].split()[0]
    assert uri.startswith(f"file://{tmp_path / 'store'}/students/") and uri.endswith("/init")
    folder = Path(uri.removeprefix("file://"))
    assert (folder / "_MANIFEST.json").is_file() and (folder / REPORT_JSON).is_file()
    assert WanLiteStudent.from_pretrained(folder).arch.dim == 128
    assert "0 randomly initialised" in printed
    assert cli_main(args) == 0  # the same projection again: found in the store, nothing recomputed
    assert cli_main(["project", "--teacher", str(tiny_teacher), "--preset", "lite-1024"]) == 2
    assert "exceeds the teacher's" in capsys.readouterr().err

    seed_config = tmp_path / "student.json"  # the seed notes' vocabulary, to a local folder
    seed_config.write_text(json.dumps({"hidden_size": 128, "depth": 1, "num_heads": 1, "ffn_dim": 128}))
    local = tmp_path / "local-student"
    assert cli_main(["project", "--teacher", str(tiny_teacher), "--config", str(seed_config),
                     "--method", "uniform", "--out", str(local)]) == 0
    assert WanLiteStudent.from_pretrained(local).arch.num_layers == 1
    save_file({"latents": torch.zeros(2, 4, 8, 8)}, tmp_path / "calib.safetensors")
    assert cli_main(["project", "--teacher", str(tiny_teacher), "--calib-data", str(tmp_path / "calib.safetensors"),
                     "--out", str(tmp_path / "never")]) == 2
    assert "calibration latents: expected [N, 16, h, w]" in capsys.readouterr().err


def test_calibration_reads_each_expert_once_per_pass_not_once_per_batch(planted_teacher, monkeypatch):
    reader = TeacherReader(planted_teacher)
    reads: list[str] = []
    tensor = TeacherReader.tensor
    monkeypatch.setattr(TeacherReader, "tensor", lambda self, e, n: reads.append(n) or tensor(self, e, n))
    calib = build_calibration_set(reader.arch, num_samples=3, latent_size=8, timesteps_per_sample=2, seed=0)
    stats = collect_statistics(reader, calib, batch_size=1)  # 6 batches over the two experts
    assert stats.loading == {HIGH: "resident", LOW: "resident"}
    assert len(reads) == 2 * len(native_tensor_shapes(PROJ_TEACHER)), "every tensor once per expert"


@pytest.mark.slow
def test_cli_calibrates_on_the_pipelines_own_data(tiny_teacher, tiny_latents, tiny_embeddings, tmp_path, capsys):
    args = ["project", "--teacher", str(tiny_teacher), "--data", tiny_latents["uri"], "--out", str(tmp_path / "s")]
    assert cli_main(args) == 2 and "give --data with --embeddings" in capsys.readouterr().err
    assert cli_main([*args, "--embeddings", tiny_embeddings["uri"], "--calib-samples", "2"]) == 0
    report = json.loads((tmp_path / "s" / REPORT_JSON).read_text())
    assert report["calibration"]["source"] == "given latents, given context" and report["calibration"]["samples"] == 2
    assert report["fixes"] == {"norm_ratios": True, "rank_embedding_units": True} and report["norm_ratios"]["tokens"]


# --- the statistics and selection rules, on their own -----------------------------------


def test_head_and_neuron_energies_match_their_definitions():
    """The Gram-matrix and factorised forms equal projecting every head/neuron to full width."""
    from wanlite.projection.calibrate import _head_energy, _neuron_energy

    gen = torch.Generator().manual_seed(0)
    heads, d, ffn = 3, 3 * 128, 64
    a, w_o = torch.randn(2, 5, d, generator=gen), torch.randn(d, d, generator=gen)
    act, w_2 = torch.randn(2, 5, ffn, generator=gen), torch.randn(d, ffn, generator=gen)
    gate = torch.randn(2, d, generator=gen)
    for g in (gate, None):
        per_head = [a[..., h * 128 : (h + 1) * 128] @ w_o[:, h * 128 : (h + 1) * 128].T for h in range(heads)]
        direct = torch.stack([(y * (1 if g is None else g[:, None])).pow(2).sum() for y in per_head])
        assert torch.allclose(_head_energy(a, w_o, heads, g), direct, rtol=1e-4)
    direct = torch.stack([((act[..., n:n + 1] * w_2[:, n]) * gate[:, None]).pow(2).sum() for n in range(ffn)])
    assert torch.allclose(_neuron_energy(act, w_2, gate), direct, rtol=1e-4)


def test_selection_rules():
    from wanlite.projection.select import massive_channels, rms_ratio, select_channels, uniform_layers

    assert uniform_layers(40, 16) == (0, 3, 5, 8, 10, 13, 16, 18, 21, 23, 26, 29, 31, 34, 36, 39)
    assert uniform_layers(4, 4) == (0, 1, 2, 3) and uniform_layers(4, 1) == (0,)
    energy = torch.ones(3, 8)
    energy[1, 5] = 150.0  # one massive channel at one depth is enough
    energy[2, 2] = 50.0  # large, but under the 100x threshold
    assert massive_channels(energy) == (5,)
    scores = torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1])
    assert select_channels(scores, 3, forced=(5,)).tolist() == [0, 1, 5]
    assert rms_ratio(torch.arange(1.0, 9.0), torch.arange(8)) == 1.0
    assert rms_ratio(torch.tensor([4.0, 4.0, 0.0, 0.0]), torch.tensor([0, 1])) == pytest.approx(2 ** 0.5)
