"""evaluate: Fréchet distance against closed forms, and a real student-vs-teacher evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from wanlite import cli
from wanlite.checkpoint.reader import TeacherReader
from wanlite.config import ConfigError
from wanlite.evaluate import EvaluationError, evaluate, frechet_distance, gaussian_stats, markdown_report
from wanlite.prompts import PromptError
from tests.fixtures.ship import SHIP_MARGIN, Shipped, make_student


def _random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T + (0 if rank else 0.1 * np.eye(d))


def _scipy_fd(mu1: np.ndarray, c1: np.ndarray, mu2: np.ndarray, c2: np.ndarray) -> float:
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))


def test_frechet_distance_of_1d_gaussians_is_the_closed_form() -> None:
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    got = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert got == pytest.approx((1 + 2) ** 2 + (2 - 3) ** 2, rel=1e-12)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_full_and_singular_covariances() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    c1, c2 = _random_spd(rng, 16), _random_spd(rng, 16)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(_scipy_fd(mu1, c1, mu2, c2), rel=1e-8)
    s1, s2 = _random_spd(rng, 16, rank=5), _random_spd(rng, 16, rank=7)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-6)
    assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_from_samples_converges_to_the_population_value() -> None:
    rng = np.random.default_rng(2)
    mu1, mu2 = np.zeros(4), np.array([1.0, 0, 0, 0])
    c1, c2 = np.eye(4), np.diag([1.0, 4.0, 1.0, 1.0])
    x = rng.multivariate_normal(mu1, c1, size=200_000)
    y = rng.multivariate_normal(mu2, c2, size=200_000)
    expected = 1.0 + (1 - 2) ** 2
    assert frechet_distance(*gaussian_stats(x), *gaussian_stats(y)) == pytest.approx(expected, abs=0.02)
    with pytest.raises(ValueError, match=r"expected \[N >= 2, D\]"):
        gaussian_stats(np.ones((1, 4)))


@pytest.mark.slow
def test_evaluation_writes_reports_and_grid(shipped: Shipped) -> None:
    report = json.loads(shipped.eval_report.read_text())
    assert report["kind"] == "evaluate" and report["passed"] is True
    assert report["gate"]["margin"] == SHIP_MARGIN and report["gate"]["failures"] == []
    assert report["gate"]["baselines"]["zero"] == {"velocity_rel_mse_high": 1.0, "velocity_rel_mse_low": 1.0}
    for name in ("fid", "clip_score"):  # no torchmetrics / cached weights on the test machines: said, not faked
        assert set(report["sample_quality"][name]) == {"not_computed"} and name not in report["metrics"]
    metrics = report["metrics"]
    assert {"velocity_rel_mse_high", "velocity_rel_mse_low", "frechet_latent"} <= set(metrics)
    assert all(np.isfinite(v) and v >= 0 for v in metrics.values())
    assert report["score"] == pytest.approx((metrics["velocity_rel_mse_high"] + metrics["velocity_rel_mse_low"]) / 2)
    # A random student is no better than predicting zero velocity, so the default gate would refuse it.
    assert min(metrics["velocity_rel_mse_high"], metrics["velocity_rel_mse_low"]) > 1.0
    assert metrics["frechet_latent"] > 0
    with Image.open(shipped.eval_dir / report["grid"]) as grid:
        assert grid.size == (2 * 64 + 3 * 2, 64 + 2 * 2), "one row: teacher | student, 64 px each"
    markdown = (shipped.eval_dir / "evaluation.md").read_text()
    assert "**PASSED**" in markdown and "grid.png" in markdown and report["prompts"][0] in markdown
    assert "fid: not computed (" in markdown
    # Shown away from its folder (a Prefect artifact), the report names the stored grid instead of embedding it.
    elsewhere = markdown_report(report, grid_uri="s3://bucket/evals/k/grid.png")
    assert "`s3://bucket/evals/k/grid.png`" in elsewhere and "](grid.png)" not in elsewhere


@pytest.mark.slow
def test_teacher_expert_as_student_scores_zero_on_its_own_range(
    tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Numerical check of the comparison itself: the low-noise expert, shipped as a student
    (it has a valid student shape: dim 256, 2 heads of 128), matches the teacher exactly
    wherever the teacher routes to it, and not where the high-noise expert answers."""
    TeacherReader(tiny_teacher).load_expert("low_noise_model").save_pretrained(tmp_path / "low")
    args = ["evaluate", "--student", str(tmp_path / "low"), "--teacher", str(tiny_teacher)]
    args += ["--out", str(tmp_path / "ev")]
    args += ["--num-prompts", "1", "--seeds", "3", "--steps", "1", "--sigmas", "0.95,0.5", "--size", "32"]
    assert cli.main(args) == 1, "the default gate fails: the high-noise range is another model"
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert report["metrics"]["velocity_rel_mse_low"] < 1e-10
    assert report["metrics"]["velocity_rel_mse_high"] > 0.1
    assert report["passed"] is False and report["gate"]["failures"][0].startswith("velocity_rel_mse_high")
    assert "FAILED" in capsys.readouterr().out


def test_bad_evaluation_inputs_are_refused(ship_student: Path, tiny_teacher: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(PromptError, match="empty.txt: expected at least one prompt"):
        evaluate(ship_student, tiny_teacher, out_dir=tmp_path / "o", prompts=empty)
    with pytest.raises(ConfigError, match=r"sigmas: expected values in \(0, 1\]"):
        evaluate(ship_student, tiny_teacher, out_dir=tmp_path / "o", sigmas=(0.5, 1.5))
    with pytest.raises(ConfigError, match="size: expected a positive multiple of 16"):
        evaluate(ship_student, tiny_teacher, out_dir=tmp_path / "o", size=40)
    assert not (tmp_path / "o").exists()


FAST_GRID = ["--num-prompts", "1", "--seeds", "3", "--steps", "1", "--size", "32"]


def _zero_velocity_student(out: Path) -> Path:
    """A seeded student whose proj_out is zeroed: it predicts v = 0 everywhere (a dead model)."""
    from wanlite.student import WanLiteStudent

    model = WanLiteStudent.from_pretrained(make_student(out))
    with torch.no_grad():
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    model.save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("guided", [False, True])
def test_default_gate_fails_dead_and_random_students(
    ship_student: Path, tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture, guided: bool
) -> None:
    """The case the gate exists for: predicting zero used to score exactly the old threshold (1.0) and pass."""
    dead = _zero_velocity_student(tmp_path / "dead")
    for name, student in (("dead", dead), ("random", ship_student)):
        args = ["evaluate", "--student", str(student), "--teacher", str(tiny_teacher), "--out", str(tmp_path / name)]
        assert cli.main(args + FAST_GRID + (["--guided"] if guided else [])) == 1, name
        report = json.loads((tmp_path / name / "evaluation.json").read_text())
        failures = report["gate"]["failures"]
        assert report["passed"] is False and any("zero predictor" in f for f in failures), (name, failures)
        assert {f.split(" ")[0] for f in failures} == {"velocity_rel_mse_high", "velocity_rel_mse_low"}, failures
        assert "FAILED (velocity_rel_mse_" in capsys.readouterr().out
    assert json.loads((tmp_path / "dead" / "evaluation.json").read_text())["score"] == pytest.approx(1.0)


@pytest.mark.slow
def test_gate_passes_a_student_that_beats_both_baselines_and_fails_one_that_does_not_beat_its_init(
    ship_student: Path, tiny_teacher: Path, tmp_path: Path
) -> None:
    """The low-noise expert as a student, on the low-noise range only: exact, so it beats zero and its
    (random) init; scored against itself as the init, the same student cannot beat it and fails."""
    TeacherReader(tiny_teacher).load_expert("low_noise_model").save_pretrained(tmp_path / "low")
    common = dict(num_prompts=1, seeds=(3,), steps=1, size=32, sigmas=(0.5, 0.2))
    report = evaluate(tmp_path / "low", tiny_teacher, out_dir=tmp_path / "a", baseline=ship_student, **common)
    assert report["passed"] is True, report["gate"]["failures"]
    assert set(report["gate"]["baselines"]) == {"zero", "init"}
    assert report["gate"]["baselines"]["init"]["velocity_rel_mse_low"] > 1.0
    again = evaluate(tmp_path / "low", tiny_teacher, out_dir=tmp_path / "b", baseline=tmp_path / "low", **common)
    assert again["passed"] is False and "init predictor" in again["gate"]["failures"][0]


def test_student_of_another_shape_than_the_teacher_is_refused(
    ship_student: Path, tiny_teacher: Path, tmp_path: Path
) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher, symlinks=True)
    for expert in ("high_noise_model", "low_noise_model"):
        config = teacher / expert / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "in_dim": 32}))
    with pytest.raises(EvaluationError, match=r"does not fit the teacher: in_dim: expected the teacher's 32, found 16"):
        evaluate(ship_student, teacher, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_non_finite_metrics_are_an_error_and_no_report(tiny_teacher: Path, tmp_path: Path) -> None:
    from wanlite.student import WanLiteStudent

    model = WanLiteStudent.from_pretrained(make_student(tmp_path / "nan"))
    with torch.no_grad():
        model.proj_out.bias.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    args = ["evaluate", "--student", str(tmp_path / "nan"), "--teacher", str(tiny_teacher)]
    args += ["--out", str(tmp_path / "o")]
    assert cli.main(args + FAST_GRID) != 0
    assert not (tmp_path / "o" / "evaluation.json").exists()
    with pytest.raises(EvaluationError, match="non-finite weights .* proj_out.bias"):  # refused before any metric
        evaluate(tmp_path / "nan", tiny_teacher, out_dir=tmp_path / "o", num_prompts=1, seeds=(3,), steps=1, size=32)


def test_a_non_finite_metric_from_finite_weights_is_an_error() -> None:
    """A student whose weights are finite but whose error overflows (or a teacher with zero velocity) gets no report."""
    from wanlite.evaluate import STUDENT, ZERO, RelMSE, VelocityStats, _report

    finite = RelMSE(err=1.0, ref=2.0, count=1)
    student = VelocityStats(high=RelMSE(err=float("inf"), ref=2.0, count=1), low=finite)
    stats = {STUDENT: student, ZERO: VelocityStats(high=finite, low=finite)}
    with pytest.raises(EvaluationError, match="expected finite metrics, found non-finite velocity_rel_mse_high"):
        _report(stats, {"frechet_latent": 1.0}, 0.1, {"student": "s"})
