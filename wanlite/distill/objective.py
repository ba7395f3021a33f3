"""The distillation objective, as pure functions: noise levels, noising, expert routing, targets, losses.

Conventions are the teacher's (WAN_FORMATS.md §3): `x_t = (1 - sigma) x0 + sigma eps`,
the model predicts the velocity `v = eps - x0`, the timestep it is fed is
`t = 1000 sigma`, and Wan 2.2 routes `t >= 875` to the high-noise expert with
guidance 4.0, anything lower to the low-noise expert with guidance 3.0. Noise
levels are drawn through the sampler's own shift so that training spends its
steps where sampling spends them (about 63 % above the boundary at shift 12).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from wanlite.config import BOUNDARY_RATIO, NUM_TRAIN_TIMESTEPS

BOUNDARY_T = BOUNDARY_RATIO * NUM_TRAIN_TIMESTEPS
"""875: timesteps at or above it belong to the high-noise expert (`t >= boundary`, as the official sampler)."""


# --- noise ---------------------------------------------------------------------------


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow sampler's time shift `s u / (1 + (s - 1) u)`: maps uniform levels onto the sampled ones."""
    return shift * u / (1 + (shift - 1) * u)


def sample_sigmas(n: int, *, shift: float, generator: torch.Generator) -> torch.Tensor:
    """n noise levels in [0, 1), distributed like the teacher's shifted schedule (float32, CPU)."""
    return shift_sigmas(torch.rand(n, generator=generator, dtype=torch.float64), shift).float()


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`x_t = (1 - sigma) x0 + sigma eps`, with one sigma per sample."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * eps


def flow_velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The ground-truth flow-matching target `eps - x0` (what the teacher was trained to predict)."""
    return eps - x0


def to_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The model's timestep input `t = 1000 sigma`."""
    return sigma * NUM_TRAIN_TIMESTEPS


def routes_high(t: torch.Tensor, boundary: float = BOUNDARY_T) -> torch.Tensor:
    """True where the high-noise expert handles timestep t (`t >= boundary`), as Wan 2.2 and `WanPipeline`."""
    return t >= boundary


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance `v_u + g (v_c - v_u)`."""
    return v_uncond + scale * (v_cond - v_uncond)


# --- the teacher ---------------------------------------------------------------------


@dataclass(frozen=True)
class Expert:
    """One teacher expert and the guidance scale it samples with (1.0 = no CFG)."""

    model: nn.Module
    guidance: float


def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A Wan transformer's velocity for 5-D latents [B, C, F, H, W]."""
    return model(hidden_states=x_t, timestep=t, encoder_hidden_states=context, return_dict=False)[0]


def expert_velocity(
    expert: Expert, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, negative: torch.Tensor | None
) -> torch.Tensor:
    """The expert's (guided) velocity; conditional and unconditional passes share one batched forward."""
    if expert.guidance == 1.0 or negative is None:
        return predict(expert.model, x_t, t, context)
    both = predict(expert.model, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, negative]))
    v_cond, v_uncond = both.chunk(2)
    return guided(v_cond, v_uncond, expert.guidance)


@dataclass
class TeacherOutput:
    """Velocity targets for a batch, and the teacher's features at the mapped layers (conditional pass)."""

    velocity: torch.Tensor
    high: torch.Tensor
    features: list[torch.Tensor]


@torch.no_grad()
def teacher_targets(
    high: Expert,
    low: Expert,
    x_t: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    negative: torch.Tensor | None,
    *,
    run_high: bool,
    run_low: bool,
    feature_layers: Sequence[int] = (),
) -> TeacherOutput:
    """Route every sample to its expert and return the experts' velocities (and features).

    `run_high`/`run_low` say whether ANY rank's samples need that expert. A
    sharded teacher's forward is a collective (FSDP all-gathers each block), so
    a rank whose own samples all fall on one side still runs the other expert,
    on one sample whose output it discards: every rank enters every collective.
    """
    is_high = routes_high(t)
    velocity = torch.zeros_like(x_t, dtype=torch.float32)
    features: list[torch.Tensor | None] = [None] * len(feature_layers)
    for expert, mask, needed in ((high, is_high, run_high), (low, ~is_high, run_low)):
        if not needed:
            continue
        idx = mask.nonzero().flatten()
        take = idx if idx.numel() else torch.zeros(1, dtype=torch.long, device=t.device)
        neg = negative[take] if negative is not None else None
        with capture_blocks(expert.model, feature_layers) as captured:
            v = expert_velocity(expert, x_t[take], t[take], context[take], neg)
        if not idx.numel():
            continue
        velocity[idx] = v.float()
        for i, feat in enumerate(captured):
            cond = feat[: idx.numel()].float()  # the conditional half when CFG batched both passes
            if features[i] is None:
                features[i] = cond.new_zeros((x_t.shape[0], *cond.shape[1:]))
            features[i][idx] = cond
    return TeacherOutput(velocity=velocity, high=is_high, features=[f for f in features if f is not None])


# --- losses --------------------------------------------------------------------------


def mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, [B] (float32 whatever the compute dtype)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def feature_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], channels: torch.Tensor, mask_k: float
) -> torch.Tensor:
    """Masked, normalised feature matching at mapped layers, averaged over layers.

    The student's residual channels are an exact subset of the teacher's (the
    projection's `channels`), so each student feature is compared with the
    teacher's feature on those channels directly: no adapter to learn, and
    at step 0 a projected student's first block already matches. Teacher
    activations further than `mask_k` standard deviations from the layer
    mean ("massive activations") are masked out, and each layer's squared
    error is divided by the variance of the kept teacher activations
    (recomputed without the outliers, which would otherwise inflate it), so
    that no single layer or outlier channel dominates and the weight means the
    same at every depth and model size.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"feature_loss: expected equal, non-zero numbers of student and teacher features, "
            f"found {len(student)}, {len(teacher)}"
        )
    losses = []
    for s, t in zip(student, teacher):
        t = t.float().index_select(-1, channels.to(t.device))
        if t.shape != s.shape:
            raise ValueError(f"feature_loss: teacher features on the kept channels are {tuple(t.shape)}, "
                             f"student features {tuple(s.shape)}")  # fmt: skip
        mask = ((t - t.mean()).abs() <= mask_k * t.std()).float()
        kept = mask.sum().clamp_min(1.0)
        mean = (t * mask).sum() / kept
        var = ((t - mean).pow(2) * mask).sum() / kept
        err = (s.float() - t).pow(2) * mask
        losses.append(err.sum() / kept / var.clamp_min(1e-12))
    return torch.stack(losses).mean()


@dataclass(frozen=True)
class FeatureMap:
    """Which teacher block each student block came from, and the residual channels it kept (projection report)."""

    teacher_layers: list[int]
    channels: torch.Tensor

    @classmethod
    def from_report(cls, report: dict, source: str, student_layers: int, teacher: tuple[int, int]) -> FeatureMap:
        """Read `selection.layers` / `selection.channel_indices`; `teacher` is (num_layers, dim)."""
        selection = report.get("selection") or {}
        layers, channels = selection.get("layers"), selection.get("channel_indices")
        if not isinstance(layers, list) or not isinstance(channels, list):
            raise ValueError(
                f"{source}: expected selection.layers and selection.channel_indices (a projection report "
                "written by this version of `wanlite project`), found none"
            )
        if len(layers) != student_layers or not all(0 <= i < teacher[0] for i in layers):
            raise ValueError(
                f"{source}: selection.layers {layers} do not map {student_layers} student blocks onto "
                f"{teacher[0]} teacher blocks"
            )
        if not all(0 <= c < teacher[1] for c in channels):
            raise ValueError(f"{source}: selection.channel_indices exceed the teacher's dim {teacher[1]}")
        return cls(list(layers), torch.tensor(channels, dtype=torch.long))


@contextmanager
def capture_blocks(model: nn.Module, layers: Sequence[int]) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of `model.blocks[i]` for i in layers during the enclosed forward, in that order."""
    captured: list[torch.Tensor] = []
    by_layer: dict[int, torch.Tensor] = {}
    hooks = [
        model.blocks[i].register_forward_hook(lambda _m, _a, out, i=i: by_layer.__setitem__(i, out)) for i in layers
    ]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()
    captured.extend(by_layer[i] for i in layers if i in by_layer)
