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

import copy
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from tqdm import tqdm

from benchmarks.toyworld.world import World, prompts
from wanlite.checkpoint.layout import EXPERT_DIRS
from wanlite.checkpoint.synth import SIZES, synth_teacher, write_native_expert
from wanlite.checkpoint.transformer_keys import to_native
from wanlite.config import BOUNDARY_RATIO
from wanlite.distill import objective
from wanlite.distill.data import EmbeddingSet
from wanlite.distill.encode import encode_prompts
from wanlite.text_padding import compact_text_padding

log = logging.getLogger(__name__)

HIGH, LOW = EXPERT_DIRS
SIGMA_RANGES = {HIGH: (BOUNDARY_RATIO, 1.0), LOW: (0.0, BOUNDARY_RATIO)}
"""Each expert learns only the noise levels Wan 2.2 routes to it."""
DROP_PROMPT = 0.1
ARCH = SIZES["tiny"].expert
SHARD_BYTES = SIZES["tiny"].max_shard_bytes
SHIPPED = Path(__file__).parent / "teacher"
"""The trained experts shipped in the repository, with `teacher.json` (how they were made, how good they are)."""
RECORD = "teacher.json"


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


@dataclass(frozen=True)
class Recipe:
    """How the toy teacher is trained; recorded beside the shipped experts."""

    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    ema: float = 0.999
    seed: int = 0


class _Trainer:
    """Both experts, their EMA copies, optimisers and schedules: one object to step, save and resume."""

    def __init__(self, recipe: Recipe) -> None:
        torch.manual_seed(recipe.seed)
        self.recipe = recipe
        self.models = {name: compact_text_padding(WanTransformer3DModel.from_config(ARCH.diffusers_config())).train()
                       for name in EXPERT_DIRS}  # fmt: skip
        self.ema = {name: copy.deepcopy(m).eval().requires_grad_(False) for name, m in self.models.items()}
        self.optims = {n: torch.optim.AdamW(m.parameters(), lr=recipe.lr, weight_decay=0.0)
                       for n, m in self.models.items()}  # fmt: skip
        self.scheds = {n: torch.optim.lr_scheduler.LambdaLR(o, _schedule(recipe.steps)) for n, o in self.optims.items()}
        self.gen = torch.Generator().manual_seed(recipe.seed)
        self.step = 0
        self.segments: list[dict[str, int]] = []
        """[{schedule_steps, until}]: the cosine length each earlier stretch of steps ran under (extended runs)."""

    def train_step(self, world: World, emb: EmbeddingSet) -> dict[str, float]:
        losses = {}
        decay = min(self.recipe.ema, (1 + self.step) / (10 + self.step))  # warm EMA: early weights fade fast
        for name, model in self.models.items():
            loss = flow_matching_loss(model, world, emb, name, self.recipe.batch_size, self.gen)
            self.optims[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            self.optims[name].step()
            self.scheds[name].step()
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema[name].parameters()), list(model.parameters()), 1 - decay)
            losses[name] = loss.item()
        self.step += 1
        return losses

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "gen": self.gen.get_state(), "recipe": asdict(self.recipe),
                "segments": self.schedule_segments(),
                **{f"{part}.{n}": obj.state_dict() for part, objs in
                   (("model", self.models), ("ema", self.ema), ("optim", self.optims), ("sched", self.scheds))
                   for n, obj in objs.items()}}  # fmt: skip

    def schedule_segments(self) -> list[dict[str, int]]:
        """Every stretch of steps so far with the cosine length it ran under, this run's included."""
        segments = [dict(s) for s in self.segments]
        if segments and segments[-1]["schedule_steps"] == self.recipe.steps:
            segments[-1]["until"] = self.step
        elif self.step > (segments[-1]["until"] if segments else 0):
            segments.append({"schedule_steps": self.recipe.steps, "until": self.step})
        return segments

    def load(self, state: dict[str, Any], extend: bool = False) -> None:
        """Resume `state`; with `extend`, a checkpoint whose recipe differs only by fewer steps continues here.

        Extending re-stretches the cosine over the longer run (a warm restart at
        the resumed step); the schedules each step ran under are kept in
        `segments`, so the record says how the weights were really made.
        """
        theirs, mine = state["recipe"], asdict(self.recipe)
        longer = extend and {**theirs, "steps": mine["steps"]} == mine and theirs["steps"] <= mine["steps"]
        if theirs != mine and not longer:
            raise ValueError(f"checkpoint was trained with {theirs}, not {mine}"
                             + ("" if extend else " (--extend continues one with fewer steps)"))  # fmt: skip
        self.segments = state.get("segments", [{"schedule_steps": theirs["steps"], "until": state["step"]}])
        for part, objs in (("model", self.models), ("ema", self.ema), ("optim", self.optims), ("sched", self.scheds)):
            for n, obj in objs.items():
                obj.load_state_dict(state[f"{part}.{n}"])
        self.gen.set_state(state["gen"])
        self.step = state["step"]


def train_experts(
    world: World,
    emb: EmbeddingSet,
    recipe: Recipe,
    *,
    checkpoint: Path | None = None,
    every: int = 250,
    stop_at: int | None = None,
    on_checkpoint: Callable[[int, dict[str, WanTransformer3DModel]], None] | None = None,
    extend: bool = False,
) -> tuple[int, dict[str, WanTransformer3DModel], list[dict[str, int]]]:
    """(step reached, both experts' EMA weights, schedule segments) after `recipe.steps` AdamW steps each.

    The schedule is a warmup, then a cosine; `extend` resumes a checkpoint of
    the same recipe with fewer steps and stretches its cosine to `recipe.steps`.

    `stop_at` ends the run early at that step of the same schedule (a later run
    with the same recipe resumes it to the end).

    With `checkpoint`, the full state is saved there every `every` steps (and
    at the end) and a run finds and resumes it: the result is the same as an
    uninterrupted run's. `on_checkpoint(step, ema_experts)` is called at each
    save, e.g. to measure how well the teacher models the world so far.
    """
    trainer = _Trainer(recipe)
    if checkpoint is not None and checkpoint.is_file():
        trainer.load(torch.load(checkpoint, weights_only=False), extend=extend)
        log.info("toy teacher: resumed at step %d from %s", trainer.step, checkpoint)
    end = recipe.steps if stop_at is None else min(stop_at, recipe.steps)
    bar = tqdm(range(trainer.step, end), desc="toy teacher", initial=trainer.step, total=recipe.steps)
    for _ in bar:
        losses = trainer.train_step(world, emb)
        bar.set_postfix(high=f"{losses[HIGH]:.3f}", low=f"{losses[LOW]:.3f}")
        if trainer.step % every == 0 or trainer.step == recipe.steps:
            if checkpoint is not None:
                tmp = checkpoint.with_suffix(".partial")
                torch.save(trainer.state(), tmp)
                tmp.replace(checkpoint)
            if on_checkpoint is not None:
                on_checkpoint(trainer.step, trainer.ema)
    return trainer.step, trainer.ema, trainer.schedule_segments()


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


def base_teacher(work: Path) -> tuple[Path, str]:
    """The synthetic tiny teacher whose T5, VAE and tokenizer the toy teacher uses, and its prompts' embeddings.

    Both are deterministic (synth seed 0, the world's prompts), so the shipped
    experts need only this to become a complete teacher again.
    """
    base = work / "teacher-base"
    if not base.exists():
        synth_teacher(base, size="tiny", seed=0)
    store_uri = (work / "store").resolve().as_uri()
    return base, encode_prompts(base, prompts(), out=store_uri, progress=False)["uri"]


def ship(experts: dict[str, WanTransformer3DModel], out: Path, record: dict[str, Any]) -> None:
    """Write the experts (native layout, fp32) and their record to `out`, replacing what was there."""
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name, model in experts.items():
        native = {k: v.detach().float().contiguous() for k, v in to_native(model.state_dict(), ARCH).items()}
        write_native_expert(work / name, native, ARCH, max_shard_bytes=SHARD_BYTES)
    (work / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)


def assemble(base: Path, out: Path, shipped: Path = SHIPPED) -> Path:
    """A complete native teacher at `out`: `base`'s T5, VAE and tokenizer with the shipped experts."""
    if not (shipped / RECORD).is_file():
        raise FileNotFoundError(f"{shipped}: no shipped toy teacher ({RECORD} missing); "
                                "train it with `python -m benchmarks.toyworld.make_teacher`")  # fmt: skip
    if out.exists():
        return out
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work, ignore=shutil.ignore_patterns(*EXPERT_DIRS))
    for name in EXPERT_DIRS:
        shutil.copytree(shipped / name, work / name)
    work.rename(out)
    return out
