"""The distillation trainer: one process per rank (torchrun), FSDP2, exact resume, MLflow on rank 0.

Run as `python -m wanlite.distill.train ...` under torchrun, or call `train(cfg)`
in-process (a one-rank process group is created). Each step:

  1. the global batch's samples come from `BatchOrder` (a function of the step);
  2. sigma (shifted like the sampler) and eps are drawn for the WHOLE global
     batch from one generator that every rank advances identically, and each
     rank takes its slice: the samples a step sees do not depend on the world
     size, so 1 and N processes follow the same curve;
  3. x_t = (1 - sigma) x0 + sigma eps, t = 1000 sigma; the teacher expert that
     owns t (t >= 875: high-noise) gives the (CFG-guided) velocity target;
  4. loss = velocity MSE [+ ground-truth flow term] [+ masked feature loss];
  5. AdamW, warmup + cosine LR, gradient clipping, EMA.

Models are placed by `parallel`: the student under FSDP2 (per block), the
frozen teacher built sharded from the rows each rank reads when there is more
than one rank, HSDP when the job spans several nodes. Checkpoints are written,
uploaded and read by `checkpointing.CheckpointManager`; they hold everything
a step depends on, so a killed run resumed with `--resume` ends exactly where
an uninterrupted one would.
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
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from wanlite.config import ConfigError, get_preset
from wanlite.distill import checkpointing, objective, parallel
from wanlite.distill.data import BatchOrder, EmbeddingSet, LatentSet
from wanlite.distill.options import (
    TrainConfig,
    add_arguments,
    config_from_args,
    default_run_name,
    fingerprint,
    shipped_sampling,
    validate,
)
from wanlite.distill.tracking import Tracker, image_grid, peak_flops, viewable, wan_forward_flops
from wanlite.mlflow_uri import TrackingError, redact_text, redact_uri, redacting_logs
from wanlite.pipeline import TEXT_LEN
from wanlite.sampling import save_sampling
from wanlite.storage import StoreError
from wanlite.text_padding import compact_text_padding

log = logging.getLogger(__name__)

HIGH_EXPERT, LOW_EXPERT = "high_noise_model", "low_noise_model"
STUDENT_WEIGHTS = "diffusion_pytorch_model.safetensors"


# --- distributed -------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join torchrun's process group, or make a one-rank group so one code path serves both."""
    cuda = torch.cuda.is_available()
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    return Dist(dist.get_rank(), dist.get_world_size(), local_world_size, device, owns)


def scalar(value: torch.Tensor) -> float:
    return float(value.full_tensor() if isinstance(value, DTensor) else value)


class NonFiniteError(ValueError):
    """A step produced a NaN or infinite loss or gradient norm; the run stops before it can save or publish one."""


def stop_if_non_finite(step: int, loss: float, grad_norm: torch.Tensor | None, model: nn.Module) -> None:
    """Raise NonFiniteError BEFORE the optimizer steps when the loss or the gradient norm is not finite.

    Every rank sees the same values (the loss is all-reduced, the norm is over
    all ranks' gradients), so all ranks stop together: the weights, the
    checkpoints and the store keep only finite, earlier states; the MLflow run
    is marked FAILED by `execute`. grad_norm None (no clipping): the norm is
    computed here, with an infinite clip bound, which changes no gradient.
    """
    if grad_norm is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    norm = scalar(grad_norm)
    bad = [f"{name} = {value}" for name, value in (("loss", loss), ("grad_norm", norm)) if not math.isfinite(value)]
    if bad:
        raise NonFiniteError(
            f"step {step}: non-finite {' and '.join(bad)}; stopped before the optimizer step: no checkpoint of it "
            "was written and nothing was published (lower --lr, raise --warmup-steps, or check the data)"
        )


# --- the models ----------------------------------------------------------------------------


class Trainable(nn.Module):
    """What the optimizer updates and checkpoints hold: the student (under `student.`).

    The feature loss compares on the projection's kept channels, so nothing else is trained.
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student


@dataclass
class _Parts:
    """Everything a step touches, built once per run."""

    student: nn.Module
    high: nn.Module
    low: nn.Module
    model: Trainable
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: checkpointing.EMA
    noise: torch.Generator
    experts: tuple[objective.Expert, objective.Expert]
    student_layers: list[int]
    teacher_layers: list[int]
    feature_channels: torch.Tensor | None


def load_student(cfg: TrainConfig) -> nn.Module:
    from wanlite.pipeline import local_path
    from wanlite.student import WanLiteStudent

    if cfg.init:  # fp32 master weights whatever the init was saved in
        return compact_text_padding(WanLiteStudent.from_pretrained(local_path(cfg.init), torch_dtype=torch.float32))
    torch.manual_seed(cfg.seed)  # identical random init on every rank
    return compact_text_padding(WanLiteStudent.from_arch(get_preset(cfg.preset).arch))


def feature_map(cfg: TrainConfig, student_layers: int, teacher: nn.Module) -> objective.FeatureMap:
    """The projection's block and channel choice, from the init's projection report."""
    from wanlite.pipeline import local_path
    from wanlite.projection.project import REPORT_JSON

    path = local_path(cfg.init) / REPORT_JSON
    if not path.is_file():
        raise ConfigError(f"feature_weight: expected {path} (the init's projection report), found none")
    dims = (len(teacher.blocks), teacher.config.num_attention_heads * teacher.config.attention_head_dim)
    try:
        return objective.FeatureMap.from_report(json.loads(path.read_text()), str(path), student_layers, dims)
    except ValueError as err:
        raise ConfigError(f"feature_weight: {err}") from None


def load_teacher(cfg: TrainConfig, device: torch.device, mesh: Any) -> tuple[nn.Module, nn.Module]:
    """(high, low) experts, frozen and sharded over `mesh` (None: whole); bf16 on CUDA, fp32 on CPU.

    Each rank reads only the rows it owns (`parallel.sharded_expert`); diffusers'
    fp32 modules stay fp32.
    """
    from wanlite.checkpoint.reader import TeacherReader
    from wanlite.pipeline import local_path

    reader = TeacherReader(local_path(cfg.teacher))
    missing = [e for e in (HIGH_EXPERT, LOW_EXPERT) if e not in reader.expert_names]
    if missing:
        raise ValueError(f"{cfg.teacher}: expected both experts, missing {', '.join(missing)}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    high, low = (compact_text_padding(parallel.sharded_expert(reader, name, mesh, device, dtype))
                 for name in (HIGH_EXPERT, LOW_EXPERT))  # fmt: skip
    return high, low


def lr_lambda(cfg: TrainConfig) -> Any:
    """Linear warmup to 1, then cosine to min_lr_ratio at the last step."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# --- the run -------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one distillation; every rank returns the same result manifest."""
    validate(cfg)
    ctx = init_distributed()
    try:
        with warnings.catch_warnings():
            # We never modify a model output in place, the only case this FSDP2 warning is about.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            return _Run(cfg, ctx).execute()
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


class _Run:
    """One training run on one rank. Read `execute` top to bottom."""

    def __init__(self, cfg: TrainConfig, ctx: Dist) -> None:
        from wanlite.storage import Store

        self.cfg, self.ctx = cfg, ctx
        self.store = Store.from_env(cfg.out)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else contextlib.nullcontext()
        )

    def execute(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        data = LatentSet.load(cfg.data)
        emb = EmbeddingSet.load(cfg.embeddings)
        data.check_embeddings(emb)
        order = BatchOrder(len(data), cfg.batch_size, ctx.world_size, cfg.seed)

        self.fp = fingerprint(cfg, ctx.world_size, data.digest, emb.digest)
        self.run_name = cfg.run_name or default_run_name(cfg, self.fp)
        self.run_key = f"runs/{self.run_name}"
        finished = final_result(self.store, self.run_key)
        ckpt = checkpointing.open_run(self.store, self.run_key, self.run_name, self.fp, resume=self.cfg.resume,
                                      staging_dir=self.cfg.staging_dir, finished=finished is not None)  # fmt: skip
        if ckpt is None:  # --resume of a run that already published its student
            log.info("run %s is already finished: %s", self.run_name, finished["student_uri"])
            return finished
        try:
            return self._train(ckpt, data, emb, order)
        finally:
            ckpt.close()

    def _train(
        self, ckpt: checkpointing.CheckpointManager, data: LatentSet, emb: EmbeddingSet, order: BatchOrder
    ) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        restored = checkpointing.resume_point(ckpt, self.fp, resume=self.cfg.resume)
        start = restored.step if restored else 0
        p = self._build()
        log_state: dict[str, Any] = {"history": {"step": [], "loss": []}, "metrics": {}, "mlflow_run_id": None}
        if restored:
            ckpt.load(restored, model=p.model, optimizer=p.optimizer, ema=p.ema, noise=p.noise)
            p.scheduler.load_state_dict(restored.trainer_state["scheduler"])
            log_state = {k: restored.trainer_state[k] for k in log_state}
            log.info("resumed %s from step %d", self.run_name, start)

        tracker = Tracker(ctx.is_main, cfg.mlflow_uri, cfg.experiment)
        params = {**dataclasses.asdict(cfg), "world_size": ctx.world_size, "student_params": _count(p.student)}
        log_state["mlflow_run_id"] = tracker.start(self.run_name, params, log_state["mlflow_run_id"])
        grid = _Grid(cfg, emb, data.latent_shape, p.student, p.high, p.low, tracker, ctx) if cfg.grid_every else None
        tokens = data.latent_shape[2] // 2 * (data.latent_shape[3] // 2)
        teacher_passes = 2 if cfg.cfg else 1
        text_len = min(TEXT_LEN, emb.longest() + 1)  # what a trimmed batch costs at most (compact_text_padding)
        student_flops, teacher_flops = (wan_forward_flops(_arch(m), tokens, text_len) for m in (p.student, p.high))
        flops = 3 * student_flops + teacher_passes * teacher_flops  # per sample: student fwd+bwd, teacher fwd
        peak = peak_flops(ctx.device, cfg.peak_tflops)

        status = "FAILED"
        try:
            bar = tqdm(total=cfg.steps, initial=start, desc=self.run_name, disable=not (ctx.is_main and cfg.progress))
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                stats = self._step(step, data, emb, order, p)
                grad_norm = None
                if cfg.grad_clip:
                    grad_norm = torch.nn.utils.clip_grad_norm_(p.model.parameters(), cfg.grad_clip)
                stop_if_non_finite(step + 1, float(stats[0]) / cfg.batch_size, grad_norm, p.model)
                lr = p.scheduler.get_last_lr()[0]  # the rate this step used
                p.optimizer.step()
                p.scheduler.step()
                p.optimizer.zero_grad(set_to_none=True)
                p.ema.update(p.student, step)
                metrics = self._metrics(stats, grad_norm, lr, time.perf_counter() - t0, tokens, flops, peak)
                log_state["metrics"] = metrics
                done = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}")
                if done % cfg.log_every == 0 or done == cfg.steps:
                    log_state["history"]["step"].append(done)
                    log_state["history"]["loss"].append(metrics["loss"])
                    tracker.log_metrics(metrics, step=done)
                if grid is not None and (done % cfg.grid_every == 0 or done == cfg.steps):
                    grid.log(done)
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    ckpt.save(
                        done, model=p.model, optimizer=p.optimizer, ema=p.ema, noise=p.noise,
                        trainer_state={"step": done, "scheduler": p.scheduler.state_dict(), "fingerprint": self.fp,
                                       **log_state},
                    )  # fmt: skip
            bar.close()
            result = self._publish(p.student, p.ema, log_state, tracker)
            status = "FINISHED"
            return result
        finally:
            tracker.finish(status)

    def _build(self) -> _Parts:
        """Student under FSDP2, the frozen teacher (+ the feature map), optimizer, LR schedule, EMA, noise."""
        cfg, ctx = self.cfg, self.ctx
        mesh = parallel.build_mesh(ctx.device.type, ctx.world_size, ctx.local_world_size, hsdp=cfg.hsdp)
        student = load_student(cfg).to(ctx.device)
        if cfg.grad_checkpointing:
            student.enable_gradient_checkpointing()
        high, low = load_teacher(cfg, ctx.device, mesh if ctx.world_size > 1 else None)
        features = feature_map(cfg, len(student.blocks), high) if cfg.feature_weight else None
        s_layers = list(range(len(student.blocks))) if features else []
        parallel.shard_trained(student, student.blocks, mesh)
        model = Trainable(student)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return _Parts(
            student=student,
            high=high,
            low=low,
            model=model,
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg)),
            ema=checkpointing.EMA(student, cfg.ema_decay),
            noise=torch.Generator().manual_seed(cfg.seed + 2),
            experts=(objective.Expert(high, cfg.guidance_high if cfg.cfg else 1.0),
                     objective.Expert(low, cfg.guidance_low if cfg.cfg else 1.0)),  # fmt: skip
            student_layers=s_layers,
            teacher_layers=features.teacher_layers if features else [],
            feature_channels=features.channels.to(ctx.device) if features else None,
        )

    # --- pieces of execute ---------------------------------------------------------------

    def _step(self, step: int, data: LatentSet, emb: EmbeddingSet, order: BatchOrder, p: _Parts) -> torch.Tensor:
        """Forward and backward of one step; returns this rank's loss sums for logging (all-reduced)."""
        cfg, ctx, dev = self.cfg, self.ctx, self.ctx.device
        sigma_all = objective.sample_sigmas(cfg.batch_size, shift=cfg.shift, generator=p.noise)
        eps_all = torch.randn((cfg.batch_size, *data.latent_shape), generator=p.noise)
        t_all = objective.to_timestep(sigma_all)
        run_high, run_low = parallel.experts_to_run(t_all, objective.routes_high)  # the whole batch decides
        mine = order.rank_slice(ctx.rank)
        rows = order.global_indices(step)[mine]
        x0 = data.take(rows).to(dev)
        eps, sigma = eps_all[mine].to(dev), sigma_all[mine].to(dev)
        context, negative = emb.compact(data.prompt_index[rows], with_negative=cfg.cfg)  # compact_text_padding
        context, negative = context.to(dev), negative.to(dev) if negative is not None else None
        x_t, t = objective.add_noise(x0, eps, sigma), objective.to_timestep(sigma)

        with self.autocast:
            target = objective.teacher_targets(
                *p.experts, x_t, t, context, negative,
                run_high=run_high, run_low=run_low, feature_layers=p.teacher_layers,
            )  # fmt: skip
            with objective.capture_blocks(p.student, p.student_layers) as s_feats:
                v = objective.predict(p.student, x_t, t, context)
        kd = objective.mse_per_sample(v, target.velocity)
        gt = objective.mse_per_sample(v, objective.flow_velocity(x0, eps)) if cfg.gt_weight else torch.zeros_like(kd)
        loss = (1 - cfg.gt_weight) * kd.mean() + cfg.gt_weight * gt.mean()
        feat = torch.zeros((), device=dev)
        if cfg.feature_weight:
            feat = objective.feature_loss(s_feats, target.features, p.feature_channels, cfg.feature_mask_k)
            loss = loss + cfg.feature_weight * feat
        loss.backward()
        high = target.high.float()
        n = float(len(rows))
        stats = torch.stack([
            loss.detach() * n, kd.detach().sum(), gt.detach().sum(), feat.detach() * n,
            (kd.detach() * high).sum(), high.sum(), (kd.detach() * (1 - high)).sum(), (1 - high).sum(),
        ]).float()  # fmt: skip
        dist.all_reduce(stats)
        return stats.cpu()

    def _metrics(
        self,
        stats: torch.Tensor,
        grad_norm: torch.Tensor | None,
        lr: float,
        seconds: float,
        tokens: int,
        flops_per_sample: float,
        peak: float | None,
    ) -> dict[str, float]:
        b = float(self.cfg.batch_size)
        loss, kd, gt, feat, hi_sum, hi_n, lo_sum, lo_n = stats.tolist()
        metrics = {
            "loss": loss / b,
            "loss_kd": kd / b,
            "lr": lr,
            "samples_per_s": b / seconds,
            "tokens_per_s": b * tokens / seconds,
        }
        if grad_norm is not None:  # the norm before clipping, over every rank's gradients
            metrics["grad_norm"] = scalar(grad_norm)
        if self.cfg.gt_weight:
            metrics["loss_gt"] = gt / b
        if self.cfg.feature_weight:
            metrics["loss_feature"] = feat / b
        if hi_n:
            metrics["loss_high"] = hi_sum / hi_n
        if lo_n:
            metrics["loss_low"] = lo_sum / lo_n
        if peak:
            metrics["mfu"] = b * flops_per_sample / seconds / (peak * self.ctx.world_size)
        return metrics

    def _publish(
        self, student: nn.Module, ema: checkpointing.EMA, log_state: dict[str, Any], tracker: Tracker
    ) -> dict[str, Any]:
        """Save the shipped weights with `save_pretrained` + manifest; every rank returns the result."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        use_ema = self.cfg.ema_decay > 0
        if use_ema:
            weights = ema.full_state_dict(keep=self.ctx.is_main)
        else:
            weights = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        result: list[Any] = [None]
        if self.ctx.is_main:
            result[0] = self._save_final(student, weights, "ema" if use_ema else "raw", log_state, tracker.uri)
        dist.broadcast_object_list(result, src=0)
        return result[0]

    def _save_final(
        self, student: nn.Module, weights: dict[str, torch.Tensor], kind: str, log_state: dict[str, Any],
        tracking_uri: str | None,
    ) -> dict[str, Any]:  # fmt: skip
        from wanlite.storage import join_key
        from wanlite.student import WanLiteStudent

        final_key = join_key(self.run_key, "final")
        shipped = WanLiteStudent.with_weights(student.config, weights)
        with tempfile.TemporaryDirectory(prefix="wanlite-final-") as tmp:
            shipped.save_pretrained(tmp)
            save_sampling(tmp, shipped_sampling(self.cfg))
            metrics = log_state["metrics"]
            Path(tmp, "metrics.json").write_text(json.dumps({"final": metrics, "history": log_state["history"]}))
            result = {
                "run": self.run_name,
                "student_uri": self.store.uri(final_key),
                "checkpoint_uri": self.store.uri(checkpointing.checkpoint_key(self.run_key, self.cfg.steps)),
                "weights": kind,
                "steps": self.cfg.steps,
                "metrics": metrics,
                "mlflow_run_id": log_state["mlflow_run_id"],
                "mlflow_tracking_uri": redact_uri(tracking_uri),
            }
            manifest = self.store.put_dir(tmp, final_key, meta={"kind": "wanlite-student", "result": result},
                                          progress=False)  # fmt: skip
        return _with_hashes(result, manifest)


def final_result(store: Any, run_key: str) -> dict[str, Any] | None:
    """The result manifest of a finished run (its published student), or None."""
    from wanlite.storage import join_key

    manifest = store.read_manifest(join_key(run_key, "final"))
    return None if manifest is None else _with_hashes(dict(manifest.meta["result"]), manifest)


def _with_hashes(result: dict[str, Any], manifest: Any) -> dict[str, Any]:
    result["sha256"] = manifest.files[STUDENT_WEIGHTS].sha256
    result["manifest_digest"] = manifest.digest
    return result


class _Grid:
    """Teacher-vs-student images at fixed seeds and prompts, sampled with `WanPipeline`, logged as PNG."""

    def __init__(
        self,
        cfg: TrainConfig,
        emb: EmbeddingSet,
        latent_shape: tuple[int, ...],
        student: nn.Module,
        high: nn.Module,
        low: nn.Module,
        tracker: Tracker,
        ctx: Dist,
    ) -> None:
        from wanlite.pipeline import build_pipeline, load_vae

        self.cfg, self.tracker, self.ctx = cfg, tracker, ctx
        n = min(cfg.grid_prompts, len(emb.prompts))
        self.context = emb.context(torch.arange(n)).to(ctx.device)
        self.negative = emb.negative_context(n).to(ctx.device)
        self.size = (latent_shape[2] * 8, latent_shape[3] * 8)
        self.vae = load_vae(_local(cfg.teacher)) if ctx.is_main else None
        self.teacher_pipe = build_pipeline(cfg.teacher, high, low, shift=cfg.shift, with_text_encoder=False,
                                           with_vae=False)  # fmt: skip
        self.sampling = shipped_sampling(cfg)
        self.student_pipe = build_pipeline(cfg.teacher, student, sampling=self.sampling, with_text_encoder=False,
                                           with_vae=False)  # fmt: skip
        for pipe in (self.teacher_pipe, self.student_pipe):
            pipe.set_progress_bar_config(disable=True)
        self.teacher_images: torch.Tensor | None = None

    def _sample(self, pipe: Any, guidance: float, guidance_2: float | None, steps: int) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(self.cfg.seed + i) for i in range(self.context.shape[0])]
        return pipe(
            prompt_embeds=self.context,
            negative_prompt_embeds=self.negative if guidance > 1 else None,
            height=self.size[0],
            width=self.size[1],
            num_frames=1,
            num_inference_steps=steps,
            guidance_scale=guidance,
            guidance_scale_2=guidance_2,
            generator=generators,
            output_type="latent",
        ).frames

    def log(self, step: int) -> None:
        """Collective (the models are sharded): every rank samples; rank 0 decodes and logs."""
        from wanlite.pipeline import decode_latents

        cfg = self.cfg
        if self.teacher_images is None:
            latents = self._sample(self.teacher_pipe, cfg.guidance_high, cfg.guidance_low, cfg.grid_steps)
            self.teacher_images = decode_latents(self.vae, latents) if self.ctx.is_main else latents
        # The student samples the way it will ship (its recorded settings), not the teacher's way.
        latents = self._sample(self.student_pipe, self.sampling.guidance, None, self.sampling.steps)
        if self.ctx.is_main:
            grid = viewable(image_grid([self.teacher_images, decode_latents(self.vae, latents)]))
            self.tracker.log_image(grid, f"grids/step-{step:08d}.png")


def _local(location: str) -> Path:
    from wanlite.pipeline import local_path

    return local_path(location)


def _arch(model: nn.Module) -> Any:
    from wanlite.config import WanArch

    return WanArch.from_diffusers_config(dict(model.config), "model config")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m wanlite.distill.train` (one process per rank under torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m wanlite.distill.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    rank = os.environ.get("RANK", "0")
    redacting_logs(logging.INFO, f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        train(cfg)
    except (ConfigError, FileNotFoundError, ValueError, StoreError, TrackingError) as err:
        print(f"wanlite distill: error: [rank{rank}] {redact_text(str(err))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
