"""The distillation objective: noise levels, noising, expert routing, targets and losses, checked numerically."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import WanTransformer3DModel

from wanlite.config import WanArch
from wanlite.distill import objective
from wanlite.distill.data import BatchOrder
from wanlite.distill.options import TrainConfig
from wanlite.distill.train import lr_lambda

SHIFT = 12.0


def _expert(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    arch = WanArch(dim=128, ffn_dim=128, num_heads=1, num_layers=1)
    model = WanTransformer3DModel.from_config(arch.diffusers_config())
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def experts() -> tuple[WanTransformer3DModel, WanTransformer3DModel]:
    """Two distinguishable experts (different random weights)."""
    return _expert(1), _expert(2)


# --- noise levels --------------------------------------------------------------------


def test_sigmas_follow_the_samplers_shifted_schedule() -> None:
    sigma = objective.sample_sigmas(200_000, shift=SHIFT, generator=torch.Generator().manual_seed(0))
    assert 0 <= float(sigma.min()) and float(sigma.max()) < 1
    # sigma = s u / (1 + (s-1) u) with u uniform  =>  P(sigma <= x) = x / (s - (s-1) x)
    for x in (0.2, 0.5, 0.8, 0.875, 0.95):
        expected = x / (SHIFT - (SHIFT - 1) * x)
        assert float((sigma <= x).double().mean()) == pytest.approx(expected, abs=4e-3)
    high = objective.routes_high(objective.to_timestep(sigma)).double().mean()
    assert float(high) == pytest.approx(1 - 0.875 / (SHIFT - (SHIFT - 1) * 0.875), abs=4e-3)  # ~63 %


def test_noising_and_velocity_conventions_invert_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 16, 1, 4, 4, generator=g), torch.randn(5, 16, 1, 4, 4, generator=g)
    sigma = torch.tensor([0.0, 0.25, 0.5, 0.875, 1.0])
    x_t = objective.add_noise(x0, eps, sigma)
    v = objective.flow_velocity(x0, eps)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[-1], eps[-1])
    # the flow sampler's x0 = x_t - sigma v recovers the clean sample
    torch.testing.assert_close(x_t - sigma.view(-1, 1, 1, 1, 1) * v, x0, atol=1e-6, rtol=0)
    assert torch.equal(objective.to_timestep(torch.tensor([0.875])), torch.tensor([875.0]))


# --- routing ------------------------------------------------------------------------------


def test_routing_sends_each_timestep_to_the_right_expert(experts) -> None:
    high, low = experts
    t = torch.tensor([874.99, 875.0, 875.01, 999.0, 0.0])
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(5, 16, 1, 4, 4, generator=g)
    context = torch.randn(5, 512, 4096, generator=g)
    out = objective.teacher_targets(
        objective.Expert(high, 1.0), objective.Expert(low, 1.0), x_t, t, context, None, run_high=True, run_low=True
    )
    assert out.high.tolist() == [False, True, True, True, False]
    for i, owner in enumerate([low, high, high, high, low]):
        other = high if owner is low else low
        alone = objective.predict(owner, x_t[i : i + 1], t[i : i + 1], context[i : i + 1])[0]
        torch.testing.assert_close(out.velocity[i], alone, atol=1e-5, rtol=1e-5)
        wrong = objective.predict(other, x_t[i : i + 1], t[i : i + 1], context[i : i + 1])[0]
        assert (out.velocity[i] - wrong).abs().max() > 1e-2, "the experts must be distinguishable"


def test_guided_targets_use_each_experts_own_scale(experts) -> None:
    high, low = experts
    t = torch.tensor([900.0, 100.0])
    g = torch.Generator().manual_seed(3)
    x_t, context = torch.randn(2, 16, 1, 4, 4, generator=g), torch.randn(2, 512, 4096, generator=g)
    negative = torch.randn(1, 512, 4096, generator=g).expand(2, -1, -1)
    out = objective.teacher_targets(
        objective.Expert(high, 4.0), objective.Expert(low, 3.0), x_t, t, context, negative, run_high=True, run_low=True
    )
    for i, (model, scale) in enumerate([(high, 4.0), (low, 3.0)]):
        cond = objective.predict(model, x_t[i : i + 1], t[i : i + 1], context[i : i + 1])
        uncond = objective.predict(model, x_t[i : i + 1], t[i : i + 1], negative[i : i + 1])
        torch.testing.assert_close(out.velocity[i], (uncond + scale * (cond - uncond))[0], atol=1e-4, rtol=1e-4)


def test_an_expert_no_local_sample_needs_still_runs(experts) -> None:
    """Under FSDP an expert's forward is a collective: a rank runs it even when none of its samples need it."""
    high, low = experts
    calls = {"high": 0, "low": 0}
    hooks = [high.register_forward_pre_hook(lambda *_: calls.__setitem__("high", calls["high"] + 1)),
             low.register_forward_pre_hook(lambda *_: calls.__setitem__("low", calls["low"] + 1))]  # fmt: skip
    try:
        t = torch.tensor([100.0, 200.0])  # both low-noise locally; another rank holds a high-noise sample
        x_t, context = torch.randn(2, 16, 1, 4, 4), torch.randn(2, 512, 4096)
        out = objective.teacher_targets(
            objective.Expert(high, 1.0), objective.Expert(low, 1.0), x_t, t, context, None, run_high=True, run_low=True
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"high": 1, "low": 1}
    torch.testing.assert_close(out.velocity, objective.predict(low, x_t, t, context), atol=1e-5, rtol=1e-5)


# --- the objective on analytic velocity fields -----------------------------------------


def _gaussian_optimal_velocity(x_t: torch.Tensor, sigma: float, mu: float, s: float) -> torch.Tensor:
    """E[eps - x0 | x_t] for x0 ~ N(mu, s^2) per coordinate (closed form)."""
    var = (1 - sigma) ** 2 * s**2 + sigma**2
    return (sigma - (1 - sigma) * s**2) / var * (x_t - (1 - sigma) * mu) - mu


@pytest.mark.parametrize("sigma", [0.2, 0.6, 0.95])
def test_flow_target_regresses_onto_the_closed_form_gaussian_velocity(sigma: float) -> None:
    mu, s, n = 0.7, 0.5, 400_000
    g = torch.Generator().manual_seed(4)
    x0 = mu + s * torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    x_t = objective.add_noise(x0, eps, torch.full((n,), sigma, dtype=torch.float64))
    target = objective.flow_velocity(x0, eps)
    # least squares of the target on [x_t, 1] is E[target | x_t] (linear for Gaussian data)
    design = torch.stack([x_t, torch.ones_like(x_t)], dim=1)
    slope, intercept = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.flatten().tolist()
    var = (1 - sigma) ** 2 * s**2 + sigma**2
    tol = 5 * math.sqrt((1 + s**2) / (n * var))  # five standard errors of the least-squares slope
    assert slope == pytest.approx((sigma - (1 - sigma) * s**2) / var, abs=tol)
    assert intercept == pytest.approx(-mu - slope * (1 - sigma) * mu, abs=tol)


def test_distilling_the_optimal_velocity_equals_flow_matching_up_to_a_constant() -> None:
    """E|v - (eps - x0)|^2 = E|v - v*|^2 + const: the teacher target and the GT flow term agree."""
    mu, s, sigma, n = -0.3, 0.8, 0.5, 400_000
    g = torch.Generator().manual_seed(5)
    x0 = mu + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, generator=g, dtype=torch.float64)
    x_t = objective.add_noise(x0, eps, torch.full((n,), sigma, dtype=torch.float64))
    v_star = _gaussian_optimal_velocity(x_t, sigma, mu, s)
    gaps = []
    for delta in (0.0, 0.3, -1.0):
        student = v_star + delta * torch.tanh(x_t)
        gt = objective.mse_per_sample(student, objective.flow_velocity(x0, eps)).mean()
        kd = objective.mse_per_sample(student, v_star).mean()
        gaps.append(float(gt - kd))
    assert max(gaps) - min(gaps) < 5e-3
    # with x0 fixed (s = 0) the optimal velocity is exactly eps - x0: the distillation loss is then zero
    x_fixed = torch.full((8, 1), mu, dtype=torch.float64)
    eps8 = torch.randn(8, 1, generator=g, dtype=torch.float64)
    x_t8 = objective.add_noise(x_fixed, eps8, torch.full((8,), sigma, dtype=torch.float64))
    exact = _gaussian_optimal_velocity(x_t8, sigma, mu, 0.0)
    torch.testing.assert_close(exact, objective.flow_velocity(x_fixed, eps8))


# --- feature loss --------------------------------------------------------------------------


def test_feature_loss_is_zero_at_match_scale_free_and_ignores_massive_activations() -> None:
    g = torch.Generator().manual_seed(6)
    channels = torch.tensor([1, 4, 5, 9] + list(range(12, 40)))  # the student's 32 channels of the teacher's 48
    teacher = [torch.randn(2, 16, 48, generator=g) for _ in range(2)]
    matched = [t[..., channels] for t in teacher]
    assert float(objective.feature_loss(matched, teacher, channels, mask_k=4.0)) == 0.0
    student = [t + 0.1 * torch.randn(t.shape, generator=g) for t in matched]
    base = float(objective.feature_loss(student, teacher, channels, mask_k=4.0))
    scaled = float(objective.feature_loss([10 * s for s in student], [10 * t for t in teacher], channels, 4.0))
    assert scaled == pytest.approx(base, rel=1e-5)
    spiked = [t.clone() for t in teacher]
    spiked[0][0, 0, channels[0]] = 1e4  # a "massive activation" the student does not reproduce
    assert float(objective.feature_loss(student, spiked, channels, mask_k=4.0)) == pytest.approx(base, rel=0.05)
    with pytest.raises(ValueError, match=r"kept channels are \(2, 16, 31\), student features \(2, 16, 32\)"):
        objective.feature_loss(student, teacher, channels[:-1], mask_k=4.0)


def test_feature_map_is_read_from_the_projection_report() -> None:
    report = {"selection": {"layers": [0, 3, 5, 39], "channel_indices": [0, 7, 4095]}}
    fmap = objective.FeatureMap.from_report(report, "r.json", 4, (40, 5120))
    assert fmap.teacher_layers == [0, 3, 5, 39] and fmap.channels.tolist() == [0, 7, 4095]
    with pytest.raises(ValueError, match="r.json: expected selection.layers and selection.channel_indices"):
        objective.FeatureMap.from_report({"selection": {"layers": [0, 3]}}, "r.json", 2, (40, 5120))
    with pytest.raises(ValueError, match=r"do not map 3 student blocks onto 40 teacher blocks"):
        objective.FeatureMap.from_report(report, "r.json", 3, (40, 5120))
    with pytest.raises(ValueError, match="exceed the teacher's dim 1024"):
        objective.FeatureMap.from_report(report, "r.json", 4, (40, 1024))


@pytest.mark.slow
def test_projected_student_block_matches_the_teacher_block_it_was_projected_from(planted_teacher, tmp_path) -> None:
    """Depth-only projection keeps teacher blocks [0, 3]: student block 0 IS teacher block 0, so its feature
    loss is exactly 0 at step 0 (a uniform end-aligned map would compare it with teacher block 1)."""
    from tests.fixtures.student import PROJ_TEACHER
    from wanlite.checkpoint.reader import TeacherReader
    from wanlite.projection import project_student
    from wanlite.student import WanLiteStudent

    report = project_student(planted_teacher, PROJ_TEACHER.replace(num_layers=2), out_dir=tmp_path / "s",
                             method="uniform")  # fmt: skip
    fmap = objective.FeatureMap.from_report(report, "report", 2, (PROJ_TEACHER.num_layers, PROJ_TEACHER.dim))
    assert fmap.teacher_layers == [0, 3]
    low = objective.Expert(TeacherReader(planted_teacher).load_expert("low_noise_model"), 1.0)
    student = WanLiteStudent.from_pretrained(tmp_path / "s").eval()
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 16, 1, 8, 8, generator=g), torch.tensor([500.0, 200.0])
    context = torch.randn(2, 512, 4096, generator=g)
    target = objective.teacher_targets(low, low, x_t, t, context, None, run_high=False, run_low=True,
                                       feature_layers=fmap.teacher_layers)  # fmt: skip
    with torch.no_grad(), objective.capture_blocks(student, [0, 1]) as feats:
        objective.predict(student, x_t, t, context)
    assert float(objective.feature_loss(feats[:1], target.features[:1], fmap.channels, 4.0)) == 0.0
    assert float(objective.feature_loss(feats[1:], target.features[1:], fmap.channels, 4.0)) > 0.01



# --- data order and schedule ----------------------------------------------------------------


def test_batch_order_is_world_size_invariant_and_covers_each_epoch() -> None:
    one, two = BatchOrder(10, 4, 1, seed=3), BatchOrder(10, 4, 2, seed=3)
    stream = torch.cat([one.global_indices(s) for s in range(5)])  # 20 samples = two epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    for step in range(5):
        both = two.global_indices(step)
        assert torch.equal(both, one.global_indices(step))
        assert torch.equal(torch.cat([both[two.rank_slice(0)], both[two.rank_slice(1)]]), both)


def test_batch_not_divisible_by_world_size_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size: the global batch 3 is not divisible by the world size 2"):
        BatchOrder(10, 3, 2, seed=0)


def test_lr_warms_up_then_decays_by_cosine_to_the_floor() -> None:
    cfg = TrainConfig(teacher="t", data="d", embeddings="e", steps=110, warmup_steps=10, min_lr_ratio=0.1)
    factor = lr_lambda(cfg)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(110) == pytest.approx(0.1)
