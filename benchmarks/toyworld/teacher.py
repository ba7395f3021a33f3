"""The toy teacher: a two-expert Wan 2.2 model trained with flow matching on the toy world.

Architecture and files are the real ones: two diffusers `WanTransformer3DModel`
experts of the `tiny` synthetic teacher's shape (dim 256, 2 heads of 128, 4
layers), the high-noise expert trained on sigma >= 0.875 (t >= 875, the real
boundary) and the low-noise one below it, conditioned on the embeddings of the
synthetic tiny T5 and saved in the native Wan 2.2 layout next to that T5, VAE
and tokenizer. So every wanlite step (teacher-data, project, distill) consumes
it unchanged. Prompts are dropped to Wan's negative prompt 10 % of the time, so
the teacher also models the unconditional distribution that CFG needs.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from tqdm import tqdm

from benchmarks.toyworld.world import World
from wanlite.checkpoint.layout import EXPERT_DIRS
from wanlite.checkpoint.synth import SIZES, write_native_expert
from wanlite.checkpoint.transformer_keys import to_native
from wanlite.config import BOUNDARY_RATIO
from wanlite.distill import objective
from wanlite.distill.data import EmbeddingSet
from wanlite.text_padding import compact_text_padding

log = logging.getLogger(__name__)

HIGH, LOW = EXPERT_DIRS
SIGMA_RANGES = {HIGH: (BOUNDARY_RATIO, 1.0), LOW: (0.0, BOUNDARY_RATIO)}
"""Each expert learns only the noise levels Wan 2.2 routes to it."""
DROP_PROMPT = 0.1
ARCH = SIZES["tiny"].expert
SHARD_BYTES = SIZES["tiny"].max_shard_bytes


def _draw_context(emb: EmbeddingSet, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Compact prompt contexts, with DROP_PROMPT of them replaced by the negative prompt's."""
    dropped = torch.rand(len(rows), generator=gen) < DROP_PROMPT
    context, negative = emb.compact(rows, with_negative=bool(dropped.any()))
    if negative is not None:
        context[dropped] = negative[dropped]
    return context


def flow_matching_loss(
    model: WanTransformer3DModel, world: World, emb: EmbeddingSet, expert: str, batch_size: int, gen: torch.Generator
) -> torch.Tensor:
    """Velocity MSE on a fresh batch of the world at noise levels in this expert's range."""
    x0, rows = world.sample(batch_size, gen)
    lo, hi = SIGMA_RANGES[expert]
    sigma = lo + (hi - lo) * torch.rand(batch_size, generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    v = objective.predict(model, objective.add_noise(x0, eps, sigma), objective.to_timestep(sigma),
                          _draw_context(emb, rows, gen))  # fmt: skip
    return objective.mse_per_sample(v, objective.flow_velocity(x0, eps)).mean()


def train_experts(
    world: World, emb: EmbeddingSet, *, steps: int, batch_size: int, lr: float, seed: int
) -> dict[str, WanTransformer3DModel]:
    """Both experts, trained side by side for `steps` AdamW steps each (warmup, then cosine)."""
    torch.manual_seed(seed)
    models = {name: compact_text_padding(WanTransformer3DModel.from_config(ARCH.diffusers_config())).train()
              for name in EXPERT_DIRS}  # fmt: skip
    optims = {name: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0) for name, m in models.items()}
    scheds = {name: torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps)) for name, opt in optims.items()}
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="toy teacher")
    for _ in bar:
        losses = {}
        for name, model in models.items():
            loss = flow_matching_loss(model, world, emb, name, batch_size, gen)
            optims[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optims[name].step()
            scheds[name].step()
            losses[name] = loss.item()
        bar.set_postfix(high=f"{losses[HIGH]:.3f}", low=f"{losses[LOW]:.3f}")
    return {name: m.eval().requires_grad_(False) for name, m in models.items()}


def _schedule(steps: int) -> Callable[[int], float]:
    """Linear warmup over 5 % of the steps, then cosine down to 10 % of the peak rate."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, step / steps)))

    return factor


def save_teacher(base: Path, out: Path, experts: dict[str, WanTransformer3DModel]) -> Path:
    """`base` (a synthetic teacher: T5, VAE, tokenizer) with its experts replaced by the trained ones.

    Assembled beside `out` and renamed into place when complete: a half-written
    teacher never exists under the final name.
    """
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work, ignore=shutil.ignore_patterns(*EXPERT_DIRS))
    for name, model in experts.items():
        native = {k: v.detach().float().contiguous() for k, v in to_native(model.state_dict(), ARCH).items()}
        write_native_expert(work / name, native, ARCH, max_shard_bytes=SHARD_BYTES)
    work.rename(out)
    return out
