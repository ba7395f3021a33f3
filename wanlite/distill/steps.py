"""Few-step, CFG-free students by distribution matching (DMD2 in flow-matching terms).

The generator G (the student being trained) samples in K Euler steps at fixed
sigmas (`steps_options.schedule`), at guidance 1. Three models take part:

- the real score: the frozen teacher, expert-routed (t >= 875: high-noise) and
  CFG-guided (4.0 / 3.0 with Wan's negative prompt), so G learns guided samples;
- the fake score: a critic with the student's architecture, initialised from the
  student, trained to track the distribution of G's current samples;
- the generator itself.

One training step (one generator update) is `critic_updates` critic updates
followed by one generator update (DMD2's two time-scale rule). Every update
first runs G from pure noise: a step index k is drawn, steps 0..k-1 run without
gradient (backward simulation: the input of step k is what inference feeds it)
and step k's clean estimate `x0_g = x - sigma_k v` is the sample.

- critic: flow-matching loss `|v_fake(x_t) - (eps - x0_g)|^2` on x_t = (1 - s) x0_g + s eps;
- generator: with x0 estimates `x0_* = x_t - s v_*(x_t)` of both scores, the
  distribution-matching gradient is `(x0_fake - x0_real) / mean|x0_g - x0_real|`
  per sample, applied as the MSE between x0_g and the stop-gradient target
  `x0_g - grad` (loss = mean(grad^2) / 2).

Sampling is deterministic: diffusers' `FlowMatchEulerDiscreteScheduler` (shift 1)
on the explicit sigmas, `x <- x + (sigma_next - sigma) v`, ending at sigma 0 with
`x0 = x - sigma_last v`. Training simulates exactly that update
(`test_steps.py` checks the two agree).

Same machinery as `distill`: models placed by `parallel` (the generator and the
critic under FSDP2, per block; the frozen teacher built sharded from the rows
each rank reads when there is more than one rank; HSDP when the job spans
several nodes), bf16 autocast on CUDA, checkpoints written, uploaded, verified
and read by `checkpointing.CheckpointManager` (exact resume; one optimizer over
both models: a model without gradients is skipped by AdamW, so one state dict
holds both), MLflow on rank 0, a progress bar. Whether a teacher expert runs
in an update is decided from the whole batch (`parallel.experts_to_run`), so
every rank enters every sharded expert's forward.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from wanlite.config import SAMPLE_SHIFT, ConfigError, WanArch
from wanlite.distill import checkpointing, objective, parallel
from wanlite.distill.data import BatchOrder, EmbeddingSet
from wanlite.distill.options import add_arguments, config_from_args
from wanlite.distill.steps_options import REQUIRED, StepsConfig, default_run_name, fingerprint, validate
from wanlite.distill.tracking import Tracker, image_grid
from wanlite.distill.train import (
    STUDENT_WEIGHTS,
    Dist,
    final_result,
    init_distributed,
    load_teacher,
    lr_lambda,
    scalar,
)
from wanlite.text_padding import compact_text_padding

log = logging.getLogger(__name__)

MODULE = "wanlite.distill.steps"
"""What torchrun runs on every rank (`python -m wanlite.distill.steps <flags>`)."""


class NonFiniteError(ValueError):
    """A loss (or the final weights) came out NaN or infinite: the run stops and publishes nothing."""


# --- the few-step sampler ----------------------------------------------------------------


def make_scheduler(sigmas: tuple[float, ...], device: torch.device | str = "cpu") -> Any:
    """diffusers' flow Euler scheduler at shift 1 set to exactly `sigmas` (+ the terminal 0 it appends)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from wanlite.config import NUM_TRAIN_TIMESTEPS

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
    scheduler.set_timesteps(sigmas=list(sigmas), device=device)
    return scheduler


@torch.no_grad()
def sample(model: nn.Module, sigmas: tuple[float, ...], noise: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """K-step, CFG-free sample from pure noise [B, C, 1, h, w] (float32 latents), with diffusers' scheduler."""
    scheduler = make_scheduler(sigmas, noise.device)
    dtype = next(model.parameters()).dtype  # the model's input dtype, as WanPipeline casts; updates stay fp32
    x = noise.float()
    for t in scheduler.timesteps:
        v = objective.predict(model, x.to(dtype), t.expand(x.shape[0]), context.to(dtype))
        x = scheduler.step(v.float(), t, x, return_dict=False)[0]
    return x


def generator_x0(
    generator: nn.Module, sigmas: torch.Tensor, noise: torch.Tensor, context: torch.Tensor, stop: int
) -> torch.Tensor:
    """G's clean estimate at step `stop`, its input made by G's own steps 0..stop-1 (no gradient through those).

    The same Euler update as `sample`, so step `stop` sees what inference feeds
    it; gradients (when enabled) flow through the last forward only.
    """
    x = noise.float()
    with torch.no_grad():
        for k in range(stop):
            v = objective.predict(generator, x, objective.to_timestep(sigmas[k]).expand(x.shape[0]), context)
            x = x + (sigmas[k + 1] - sigmas[k]) * v.float()
    sigma = sigmas[stop]
    v = objective.predict(generator, x, objective.to_timestep(sigma).expand(x.shape[0]), context)
    return x - sigma * v.float()


def x0_estimate(x_t: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A velocity model's clean estimate `x_t - sigma v`, one sigma per sample."""
    return x_t - sigma.view(-1, *([1] * (x_t.ndim - 1))) * v.float()


def dmd_target(x0_g: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(stop-gradient target for x0_g, per-sample mean squared DMD gradient).

    grad = (x0_fake - x0_real) / mean|x0_g - x0_real| (per sample; DMD's
    normalisation makes the step size independent of how far off G is).
    """
    norm = (x0_g.detach() - x0_real).abs().flatten(1).mean(1).clamp_min(1e-8)
    grad = (x0_fake - x0_real) / norm.view(-1, *([1] * (x0_g.ndim - 1)))
    return (x0_g.detach() - grad).detach(), grad.pow(2).flatten(1).mean(1)


# --- the models ----------------------------------------------------------------------------


class Pair(nn.Module):
    """What the optimizer updates and a checkpoint holds: the generator (shipped) and the critic (not)."""

    def __init__(self, generator: nn.Module, critic: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.critic = critic


def load_model(location: str) -> nn.Module:
    """A student folder or URI as fp32 master weights, with compact text padding."""
    from wanlite.pipeline import local_path
    from wanlite.student import WanLiteStudent

    return compact_text_padding(WanLiteStudent.from_pretrained(local_path(location), torch_dtype=torch.float32))


def check_same_architecture(student: nn.Module, critic: nn.Module, cfg: StepsConfig) -> None:
    """The critic must be the generator's architecture: it scores the generator's samples in its place."""
    a = WanArch.from_diffusers_config(dict(student.config), f"{cfg.student} config.json")
    b = WanArch.from_diffusers_config(dict(critic.config), f"{cfg.critic} config.json")
    if a != b:
        differ = [f"{k}: student {v!r}, critic {getattr(b, k)!r}" for k, v in vars(a).items() if getattr(b, k) != v]
        raise ConfigError(
            f"critic {cfg.critic}: expected the architecture of student {cfg.student}; differs in {'; '.join(differ)}"
        )


@dataclass
class _Parts:
    generator: nn.Module
    critic: nn.Module
    pair: Pair
    high: objective.Expert
    low: objective.Expert
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: checkpointing.EMA
    noise: torch.Generator


# --- the run -------------------------------------------------------------------------------


def train_steps(cfg: StepsConfig) -> dict[str, Any]:
    """Run (or resume) one few-step distillation; every rank returns the same result manifest."""
    sigmas = validate(cfg)
    ctx = init_distributed()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            return _Run(cfg, sigmas, ctx).execute()
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


class _Run:
    """One few-step run on one rank. Read `execute` top to bottom."""

    def __init__(self, cfg: StepsConfig, sigmas: tuple[float, ...], ctx: Dist) -> None:
        from wanlite.storage import Store

        self.cfg, self.ctx, self.schedule = cfg, ctx, sigmas
        self.sigmas = torch.tensor([*sigmas, 0.0], dtype=torch.float32, device=ctx.device)
        self.store = Store.from_env(cfg.out)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else contextlib.nullcontext()
        )

    def execute(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        emb = EmbeddingSet.load(cfg.embeddings)
        # Each generator update draws critic_updates + 1 batches of prompts, in a fixed order.
        self.order = BatchOrder(len(emb.prompts), cfg.batch_size, ctx.world_size, cfg.seed)
        self.fp = fingerprint(cfg, ctx.world_size, emb.digest)
        self.run_name = cfg.run_name or default_run_name(cfg, self.fp)
        self.run_key = f"runs/{self.run_name}"
        finished = final_result(self.store, self.run_key)
        ckpt = checkpointing.open_run(self.store, self.run_key, self.run_name, self.fp, resume=self.cfg.resume,
                                      staging_dir=self.cfg.staging_dir, finished=finished is not None)  # fmt: skip
        if ckpt is None:  # --resume of a run that already published its student
            log.info("run %s is already finished: %s", self.run_name, finished["student_uri"])
            return finished
        try:
            return self._train(ckpt, emb)
        finally:
            ckpt.close()

    def _train(self, ckpt: checkpointing.CheckpointManager, emb: EmbeddingSet) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        restored = checkpointing.resume_point(ckpt, self.fp, resume=self.cfg.resume)
        start = restored.step if restored else 0
        p = self._build()
        log_state: dict[str, Any] = {"history": {"step": [], "loss_generator": [], "loss_critic": []},
                                     "metrics": {}, "mlflow_run_id": None}  # fmt: skip
        if restored:
            ckpt.load(restored, model=p.pair, optimizer=p.optimizer, ema=p.ema, noise=p.noise)
            p.scheduler.load_state_dict(restored.trainer_state["scheduler"])
            log_state = {k: restored.trainer_state[k] for k in log_state}
            log.info("resumed %s from step %d", self.run_name, start)

        tracker = Tracker(ctx.is_main, cfg.mlflow_uri, cfg.experiment)
        params = {**dataclasses.asdict(cfg), "schedule": list(self.schedule), "world_size": ctx.world_size}
        log_state["mlflow_run_id"] = tracker.start(self.run_name, params, log_state["mlflow_run_id"])
        latent_shape = (p.generator.config.in_channels, 1, cfg.image_size // 8, cfg.image_size // 8)
        grid = _Grid(cfg, self.schedule, emb, latent_shape, p, tracker, ctx) if cfg.grid_every else None

        status = "FAILED"
        try:
            bar = tqdm(total=cfg.steps, initial=start, desc=self.run_name, disable=not (ctx.is_main and cfg.progress))
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                lr = p.scheduler.get_last_lr()[0]
                critic = [self._critic_update(step, j, emb, latent_shape, p) for j in range(cfg.critic_updates)]
                gen, dmd_sq, gen_norm = self._generator_update(step, emb, latent_shape, p)
                p.scheduler.step()
                p.ema.update(p.generator, step)
                done = step + 1
                metrics = {
                    "loss_generator": gen,
                    "dmd_grad_sq": dmd_sq,
                    "loss_critic": sum(c[0] for c in critic) / len(critic),
                    "lr": lr,
                    "samples_per_s": cfg.batch_size * (cfg.critic_updates + 1) / (time.perf_counter() - t0),
                }
                if cfg.grad_clip:
                    metrics["grad_norm_generator"] = gen_norm
                    metrics["grad_norm_critic"] = sum(c[1] for c in critic) / len(critic)
                log_state["metrics"] = metrics
                bar.update(1)
                bar.set_postfix(gen=f"{gen:.4g}", critic=f"{metrics['loss_critic']:.4g}")
                if done % cfg.log_every == 0 or done == cfg.steps:
                    log_state["history"]["step"].append(done)
                    log_state["history"]["loss_generator"].append(gen)
                    log_state["history"]["loss_critic"].append(metrics["loss_critic"])
                    tracker.log_metrics(metrics, step=done)
                if grid is not None and (done % cfg.grid_every == 0 or done == cfg.steps):
                    grid.log(done)
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    ckpt.save(
                        done, model=p.pair, optimizer=p.optimizer, ema=p.ema, noise=p.noise,
                        trainer_state={"step": done, "scheduler": p.scheduler.state_dict(), "fingerprint": self.fp,
                                       **log_state},
                    )  # fmt: skip
            bar.close()
            result = self._publish(p, log_state, tracker)
            status = "FINISHED"
            return result
        finally:
            tracker.finish(status)

    def _build(self) -> _Parts:
        """Generator and critic under FSDP2, the frozen teacher sharded (one rank: whole), optimizer, EMA, noise."""
        cfg, ctx = self.cfg, self.ctx
        mesh = parallel.build_mesh(ctx.device.type, ctx.world_size, ctx.local_world_size, hsdp=cfg.hsdp)
        generator = load_model(cfg.student).to(ctx.device)
        critic = load_model(cfg.critic or cfg.student).to(ctx.device)
        check_same_architecture(generator, critic, cfg)
        # load_teacher reads cfg.teacher only
        high, low = load_teacher(cfg, ctx.device, mesh if ctx.world_size > 1 else None)  # type: ignore[arg-type]
        parallel.shard_trained(generator, generator.blocks, mesh)
        parallel.shard_trained(critic, critic.blocks, mesh)
        ema = checkpointing.EMA(generator, cfg.ema_decay)
        optimizer = torch.optim.AdamW(
            [{"params": list(generator.parameters()), "lr": cfg.lr},
             {"params": list(critic.parameters()), "lr": cfg.critic_lr}],
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
        return _Parts(
            generator=generator,
            critic=critic,
            pair=Pair(generator, critic),
            high=objective.Expert(high, cfg.guidance_high),
            low=objective.Expert(low, cfg.guidance_low),
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg)),  # type: ignore[arg-type]
            ema=ema,
            noise=torch.Generator().manual_seed(cfg.seed + 2),
        )

    # --- one update ------------------------------------------------------------------------

    def _draw(self, batch_index: int, emb: EmbeddingSet, latent_shape: tuple[int, ...], p: _Parts) -> dict[str, Any]:
        """This rank's share of one update's randomness, drawn for the whole global batch (world-size free)."""
        cfg, ctx, dev = self.cfg, self.ctx, self.ctx.device
        b = cfg.batch_size
        stop = int(torch.randint(cfg.sample_steps, (1,), generator=p.noise))
        noise = torch.randn((b, *latent_shape), generator=p.noise)
        sigma = objective.sample_sigmas(b, shift=cfg.shift, generator=p.noise)
        eps = torch.randn((b, *latent_shape), generator=p.noise)
        mine = self.order.rank_slice(ctx.rank)
        rows = self.order.global_indices(batch_index)[mine]
        context, negative = emb.compact(rows, with_negative=True)
        run_high, run_low = parallel.experts_to_run(objective.to_timestep(sigma), objective.routes_high)
        return {
            "stop": stop, "noise": noise[mine].to(dev), "sigma": sigma[mine].to(dev), "eps": eps[mine].to(dev),
            "context": context.to(dev), "negative": negative.to(dev),
            "run_high": run_high, "run_low": run_low,  # the whole batch decides
        }  # fmt: skip

    def _critic_update(
        self, step: int, j: int, emb: EmbeddingSet, latent_shape: tuple[int, ...], p: _Parts
    ) -> tuple[float, float]:
        """One flow-matching update of the critic on fresh generator samples; returns (loss, grad norm)."""
        d = self._draw(step * (self.cfg.critic_updates + 1) + j, emb, latent_shape, p)
        with self.autocast:
            with torch.no_grad():
                x0 = generator_x0(p.generator, self.sigmas, d["noise"], d["context"], d["stop"])
            x_t = objective.add_noise(x0, d["eps"], d["sigma"])
            v = objective.predict(p.critic, x_t, objective.to_timestep(d["sigma"]), d["context"])
        per_sample = objective.mse_per_sample(v, objective.flow_velocity(x0, d["eps"]))
        per_sample.mean().backward()
        loss = self._global_mean(per_sample, step, "critic loss")
        return loss, self._apply(p, p.critic)

    def _generator_update(
        self, step: int, emb: EmbeddingSet, latent_shape: tuple[int, ...], p: _Parts
    ) -> tuple[float, float, float]:
        """One distribution-matching update of the generator; returns (loss, mean grad^2, grad norm)."""
        d = self._draw(step * (self.cfg.critic_updates + 1) + self.cfg.critic_updates, emb, latent_shape, p)
        with self.autocast:
            x0_g = generator_x0(p.generator, self.sigmas, d["noise"], d["context"], d["stop"])
            x_t = objective.add_noise(x0_g.detach(), d["eps"], d["sigma"])
            t = objective.to_timestep(d["sigma"])
            with torch.no_grad():
                real = objective.teacher_targets(
                    p.high, p.low, x_t, t, d["context"], d["negative"], run_high=d["run_high"], run_low=d["run_low"]
                ).velocity
                fake = objective.predict(p.critic, x_t, t, d["context"])
        target, grad_sq = dmd_target(x0_g, x0_estimate(x_t, d["sigma"], real), x0_estimate(x_t, d["sigma"], fake))
        per_sample = 0.5 * objective.mse_per_sample(x0_g, target)
        per_sample.mean().backward()
        loss = self._global_mean(per_sample, step, "generator loss")
        stats = torch.stack([grad_sq.detach().sum()]).float()
        dist.all_reduce(stats)
        return loss, float(stats[0]) / self.cfg.batch_size, self._apply(p, p.generator)

    def _global_mean(self, per_sample: torch.Tensor, step: int, what: str) -> float:
        """The loss over the global batch; a non-finite one stops every rank before any update is applied."""
        total = per_sample.detach().float().sum().reshape(1)
        dist.all_reduce(total)
        value = float(total) / self.cfg.batch_size
        if not math.isfinite(value):
            raise NonFiniteError(
                f"run {self.run_name}, step {step + 1}: the {what} is {value}; stopped before updating, "
                f"nothing was published (the last complete checkpoint under {self.store.uri(self.run_key)} is intact)"
            )
        return value

    def _apply(self, p: _Parts, model: nn.Module) -> float:
        """Clip this model's gradients, step the optimizer (only models with gradients move), clear them."""
        norm = 0.0
        if self.cfg.grad_clip:  # the norm before clipping, over every rank's gradients
            norm = scalar(torch.nn.utils.clip_grad_norm_(list(model.parameters()), self.cfg.grad_clip))
        p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        return norm

    # --- publishing ------------------------------------------------------------------------

    def _publish(self, p: _Parts, log_state: dict[str, Any], tracker: Tracker) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        use_ema = self.cfg.ema_decay > 0
        if use_ema:
            weights = p.ema.full_state_dict(keep=self.ctx.is_main)
        else:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(p.generator, options=options)
        # The last update's loss was finite, its step may still not be: check what would ship (all ranks agree).
        bad: list[Any] = [[n for n, v in weights.items() if not torch.isfinite(v).all()] if self.ctx.is_main else None]
        dist.broadcast_object_list(bad, src=0)
        if bad[0]:
            raise NonFiniteError(
                f"run {self.run_name}: the final generator weights are not finite ({', '.join(bad[0][:5])}); "
                "nothing was published"
            )
        result: list[Any] = [None]
        if self.ctx.is_main:
            result[0] = self._save_final(p.generator, weights, "ema" if use_ema else "raw", log_state, tracker.uri)
        dist.broadcast_object_list(result, src=0)
        return result[0]

    def _save_final(
        self, generator: nn.Module, weights: dict[str, torch.Tensor], kind: str, log_state: dict[str, Any],
        tracking_uri: str | None,
    ) -> dict[str, Any]:  # fmt: skip
        from wanlite.sampling import save_sampling
        from wanlite.storage import join_key
        from wanlite.student import WanLiteStudent

        final_key = join_key(self.run_key, "final")
        shipped = WanLiteStudent.with_weights(generator.config, weights)
        sampling = few_step_sampling(self.cfg, self.schedule)
        with tempfile.TemporaryDirectory(prefix="wanlite-final-") as tmp:
            shipped.save_pretrained(tmp)
            save_sampling(tmp, sampling)
            metrics = log_state["metrics"]
            Path(tmp, "metrics.json").write_text(json.dumps({"final": metrics, "history": log_state["history"]}))
            result = {
                "run": self.run_name,
                "student_uri": self.store.uri(final_key),
                "checkpoint_uri": self.store.uri(checkpointing.checkpoint_key(self.run_key, self.cfg.steps)),
                "weights": kind,
                "steps": self.cfg.steps,
                "sampling": sampling.to_dict(),
                "metrics": metrics,
                "mlflow_run_id": log_state["mlflow_run_id"],
                "mlflow_tracking_uri": tracking_uri,
            }
            manifest = self.store.put_dir(tmp, final_key, meta={"kind": "wanlite-student", "result": result},
                                          progress=False)  # fmt: skip
        result["sha256"] = manifest.files[STUDENT_WEIGHTS].sha256
        result["manifest_digest"] = manifest.digest
        return result


def few_step_sampling(cfg: StepsConfig, sigmas: tuple[float, ...]) -> Any:
    """The record that travels with the few-step student: K Euler steps at `sigmas`, guidance 1, no negative."""
    from wanlite.sampling import Sampling

    shift = cfg.schedule_shift if cfg.sigmas is None else 1.0
    return Sampling(steps=len(sigmas), shift=shift, guidance=1.0, negative_prompt=False, sampler="euler",
                    sigmas=tuple(sigmas))  # fmt: skip


class _Grid:
    """Guided 40-step teacher row vs the generator's K-step row at fixed seeds, logged as PNG by rank 0."""

    def __init__(
        self,
        cfg: StepsConfig,
        sigmas: tuple[float, ...],
        emb: EmbeddingSet,
        latent_shape: tuple[int, ...],
        p: _Parts,
        tracker: Tracker,
        ctx: Dist,
    ) -> None:
        from wanlite.pipeline import build_pipeline, load_vae, local_path

        self.cfg, self.sigmas, self.p, self.tracker, self.ctx = cfg, sigmas, p, tracker, ctx
        n = min(cfg.grid_prompts, len(emb.prompts))
        self.context = emb.context(torch.arange(n)).to(ctx.device)
        self.negative = emb.negative_context(n).to(ctx.device)
        self.noise = torch.cat(
            [torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(cfg.seed + i)) for i in range(n)]
        ).to(ctx.device)
        self.vae = load_vae(local_path(cfg.teacher)) if ctx.is_main else None
        self.teacher_pipe = build_pipeline(cfg.teacher, p.high.model, p.low.model, shift=SAMPLE_SHIFT,
                                           with_text_encoder=False, with_vae=False)  # fmt: skip
        self.teacher_pipe.set_progress_bar_config(disable=True)
        self.teacher_images: torch.Tensor | None = None

    def log(self, step: int) -> None:
        """Collective (the models are sharded): every rank samples; rank 0 decodes and logs."""
        from wanlite.pipeline import decode_latents

        cfg = self.cfg
        if self.teacher_images is None:
            latents = self.teacher_pipe(
                prompt_embeds=self.context, negative_prompt_embeds=self.negative, height=cfg.image_size,
                width=cfg.image_size, num_frames=1, num_inference_steps=cfg.grid_teacher_steps,
                guidance_scale=cfg.guidance_high, guidance_scale_2=cfg.guidance_low, latents=self.noise,
                output_type="latent",
            ).frames  # fmt: skip
            self.teacher_images = decode_latents(self.vae, latents) if self.ctx.is_main else latents
        latents = sample(self.p.generator, self.sigmas, self.noise, self.context)
        if self.ctx.is_main:
            grid = image_grid([self.teacher_images, decode_latents(self.vae, latents)])
            self.tracker.log_image(grid, f"grids/step-{step:08d}.png")


# --- launching -------------------------------------------------------------------------------


def torchrun_command(cfg: StepsConfig, nproc: int, *, nnodes: int = 1, rendezvous: str | None = None) -> list[str]:
    """`launch.torchrun_command` for this module: one node `--standalone`, several through a c10d `rendezvous`."""
    from wanlite.distill.launch import torchrun_command as command

    return command(cfg, nproc, nnodes=nnodes, rendezvous=rendezvous, module=MODULE)


def distill_steps(cfg: StepsConfig, *, nproc: int = 1) -> dict[str, Any]:
    """Train (or resume) a K-step student; returns the result manifest (URIs, sha256, sampling, metrics)."""
    from wanlite.distill.launch import in_process, run_torchrun

    validate(cfg)
    if in_process(nproc, cfg.batch_size):
        return train_steps(cfg)
    if cfg.run_name is None:  # the ranks derive the same name; we need it to find their result
        from wanlite.distill.data import artifact_digest

        cfg = dataclasses.replace(cfg, run_name=run_name(cfg, nproc, artifact_digest(cfg.embeddings)))
    return run_torchrun(cfg, nproc, MODULE, "distill-steps")


def run_name(cfg: StepsConfig, world_size: int, embeddings_digest: str) -> str:
    """The name the ranks derive for cfg when --run-name is not given."""
    return cfg.run_name or default_run_name(cfg, fingerprint(cfg, world_size, embeddings_digest))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m wanlite.distill.steps` (one process per rank under torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m wanlite.distill.steps", description=__doc__.split("\n")[0])
    add_arguments(parser, StepsConfig, REQUIRED)
    cfg = config_from_args(parser.parse_args(argv), StepsConfig)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        train_steps(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"wanlite distill-steps: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
