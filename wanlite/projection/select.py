"""Which teacher blocks, residual channels, heads and FFN neurons the student keeps.

Pure functions from calibration statistics (or from shapes alone, for the
uniform baseline) to one `Selection`, which slicing.py then applies to every
tensor. All index lists are sorted ascending: order carries no information in a
selection, and keeping the teacher's order makes "select everything" the
identity, which is what proves the slicing exact.

Depth uses the keep-first-and-last, uniform-between baseline for both methods.
A calibrated choice by immediate loss is what TinyFusion found *worst* for DiTs
(DISTILLATION_ANCHORS.md §2.2); their better, learned choice needs training, so
it belongs to distillation, not to this one-shot initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wanlite.config import HEAD_DIM, WanArch
from wanlite.projection.calibrate import Statistics

OUTLIER_RATIO = 100.0
"""A channel whose residual energy is >= 100x the median channel's (RMS 10x) is a massive
activation. Trained DiTs show a few channels 100-1000x larger than the rest; LayerNorm's
statistics, hence every block's input, depend on them, so they are always kept."""

ATTENTIONS = ("self_attn", "cross_attn")
QK_NORMS = tuple(f"{a}.{n}" for a in ATTENTIONS for n in ("norm_q", "norm_k"))


@dataclass(frozen=True)
class Selection:
    """One consistent choice of teacher units, indexed by student layer where per-layer."""

    method: str
    layers: tuple[int, ...]  # teacher block feeding each student block
    channels: torch.Tensor  # residual channels, shared by every tensor that touches the stream
    heads: dict[str, tuple[tuple[int, ...], ...]]  # "self_attn"/"cross_attn" -> heads per student layer
    neurons: tuple[torch.Tensor, ...]  # FFN neurons per student layer
    qk_scale: dict[str, tuple[float, ...]]  # "self_attn.norm_q", ... -> RMSNorm weight factor per student layer
    outliers: tuple[int, ...] = ()  # massive-activation channels forced into `channels`
    embedding_units: dict[str, torch.Tensor] | None = None  # "text_embedding"/"time_embedding" -> hidden units
    # kept; None: the residual channel set, the uniform baseline's (and the pre-ranking) choice

    def embedding_hidden(self, mlp: str) -> torch.Tensor:
        """Hidden units kept in an embedding MLP (text_embedding.0 -> .2, time_embedding.0 -> .2)."""
        return self.channels if self.embedding_units is None else self.embedding_units[mlp]

    def head_channels(self, attn: str, layer: int) -> torch.Tensor:
        """Rows of q/k/v (and columns of o) belonging to the kept heads: whole 128-wide heads."""
        return torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in self.heads[attn][layer]])

    def summary(self) -> dict:
        return {
            "method": self.method,
            "depth": "uniform: first and last block kept, the rest evenly spaced",
            "layers": list(self.layers),
            "channels": len(self.channels),
            "channel_indices": self.channels.tolist(),
            "outlier_channels": list(self.outliers),
            "heads": {a: [list(h) for h in hs] for a, hs in self.heads.items()},
            "neurons_per_layer": [len(n) for n in self.neurons],
            "qk_scale": {k: list(v) for k, v in self.qk_scale.items()},
            "embedding_hidden_units": "the residual channel set" if self.embedding_units is None
            else "ranked by their own activations (energy written through the MLP's second layer)",
            "embedding_units": {k: self.embedding_hidden(k).tolist() for k in ("text_embedding", "time_embedding")},
        }  # fmt: skip


def uniform_layers(teacher_layers: int, student_layers: int) -> tuple[int, ...]:
    """First and last block, evenly spaced between (a single student block takes block 0)."""
    if student_layers == 1:
        return (0,)
    return tuple(round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers))


def uniform_selection(teacher: WanArch, student: WanArch) -> Selection:
    """The naive baseline: first-k channels, heads and neurons; RMSNorm weights unscaled."""
    layers = uniform_layers(teacher.num_layers, student.num_layers)
    first_heads = tuple(range(student.num_heads))
    return Selection(
        method="uniform",
        layers=layers,
        channels=torch.arange(student.dim),
        heads={a: (first_heads,) * len(layers) for a in ATTENTIONS},
        neurons=(torch.arange(student.ffn_dim),) * len(layers),
        qk_scale={k: (1.0,) * len(layers) for k in QK_NORMS},
    )


def importance_selection(
    stats: Statistics,
    teacher: WanArch,
    student: WanArch,
    outlier_ratio: float = OUTLIER_RATIO,
    *,
    rank_embedding_units: bool = True,
) -> Selection:
    """Minitron-style selection from calibration statistics (see calibrate.py for what they measure).

    `rank_embedding_units=False` keeps the embedding MLPs' hidden units at the
    residual channel indices (the behaviour before they were ranked on their own).
    """
    layers = uniform_layers(teacher.num_layers, student.num_layers)
    outliers = massive_channels(stats.residual_energy, outlier_ratio)
    channels = select_channels(channel_scores(stats.site_energy, layers), student.dim, outliers)
    heads = {a: tuple(top_k(stats.head_energy[a][layer], student.num_heads) for layer in layers) for a in ATTENTIONS}
    neurons = tuple(torch.tensor(top_k(stats.neuron_energy[layer], student.ffn_dim)) for layer in layers)
    provisional = Selection("importance", layers, channels, heads, neurons, {})
    qk_scale = {
        name: tuple(
            rms_ratio(stats.qk_energy[name][layer], provisional.head_channels(name.split(".")[0], j))
            for j, layer in enumerate(layers)
        )
        for name in QK_NORMS
    }
    kept_outliers = tuple(c for c in outliers if c in set(channels.tolist()))
    units = None
    if rank_embedding_units:
        units = {k: torch.tensor(top_k(e, student.dim)) for k, e in stats.embedding_energy.items()}
    return Selection("importance", layers, channels, heads, neurons, qk_scale, kept_outliers, units)


def channel_scores(site_energy: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
    """Sum over the kept blocks' input sites (and the head's) of per-channel energy, each site scaled to mean 1.

    Per-site normalisation stops the deepest blocks, whose residual stream is
    largest, from deciding alone; dropped blocks do not vote.
    """
    rows = [3 * layer + site for layer in layers for site in range(3)] + [site_energy.shape[0] - 1]
    sites = site_energy[rows]
    return (sites / sites.mean(1, keepdim=True).clamp_min(1e-30)).sum(0)


def massive_channels(residual_energy: torch.Tensor, ratio: float = OUTLIER_RATIO) -> tuple[int, ...]:
    """Channels whose residual energy reaches `ratio` x the median channel at any depth, largest first."""
    median = residual_energy.median(dim=1, keepdim=True).values.clamp_min(1e-30)
    peak = (residual_energy / median).max(0).values
    found = torch.nonzero(peak >= ratio).flatten()
    return tuple(found[torch.argsort(peak[found], descending=True, stable=True)].tolist())


def select_channels(scores: torch.Tensor, k: int, forced: tuple[int, ...] = ()) -> torch.Tensor:
    """`forced` channels first (as many as fit), then the highest-scoring others; sorted."""
    chosen = list(forced[:k])
    taken = set(chosen)
    for c in torch.argsort(scores, descending=True, stable=True).tolist():
        if len(chosen) == k:
            break
        if c not in taken:
            chosen.append(c)
    return torch.tensor(sorted(chosen))


def top_k(scores: torch.Tensor, k: int) -> tuple[int, ...]:
    """Indices of the k largest scores (ties to the lower index), sorted ascending."""
    return tuple(sorted(torch.argsort(scores, descending=True, stable=True)[:k].tolist()))


def rms_ratio(energy: torch.Tensor, kept: torch.Tensor) -> float:
    """sqrt(mean_sq over kept channels / mean_sq over all): rescales an RMSNorm weight whose span shrinks.

    The teacher normalises q by its RMS over all heads; the student sees only
    the kept heads' channels. Multiplying the kept weights by this ratio makes
    the student's normalised channels match the teacher's on calibration data.
    """
    total = float(energy.mean())
    return 1.0 if total <= 0 else float((energy[kept].mean() / total).sqrt())
