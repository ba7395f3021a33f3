"""Training checkpoints: FSDP2-aware DCP state, EMA, per-rank RNG, trainer state; published to the store.

A checkpoint is written by every rank into a local staging directory with
`torch.distributed.checkpoint` (each rank writes only its own shards; the
state dicts come from `get_state_dict`, so FSDP2's DTensors are saved sharded
and can be loaded on another world size), plus one RNG file per rank and the
trainer state (step, LR schedule, loss history, config fingerprint). Rank 0
then uploads the directory with `Store.put_dir`, which writes the manifest
LAST: a run killed mid-upload leaves no manifest and the checkpoint is simply
not there for `--resume`. The staging directory must be visible to rank 0
(node-local disk on one node; a shared volume across nodes).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from wanlite.storage import Store, join_key

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class EMA:
    """Exponential moving average of a module's parameters (kept as DTensors when the module is sharded)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """shadow <- d shadow + (1 - d) param, with d warmed up as (1+step)/(10+step) so early steps count."""
        d = min(self.decay, (1 + step) / (10 + step))
        for name, p in module.named_parameters():
            self.shadow[name].lerp_(p.detach(), 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU copies; a collective: every rank must call it."""
        return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu() for n, t in self.shadow.items()}


def checkpoint_key(run_key: str, step: int) -> str:
    return join_key(run_key, "checkpoints", f"step-{step:08d}")


def latest_checkpoint(store: Store, run_key: str) -> tuple[int, str] | None:
    """(step, key) of the newest COMPLETE checkpoint of a run; half-written ones are skipped."""
    prefix = join_key(run_key, "checkpoints")
    if not store.exists(prefix):
        return None
    steps = set()
    for key in store.list(prefix):
        match = _STEP_DIR.match(key[len(prefix) + 1 :].split("/")[0])
        if match:
            steps.add(int(match.group(1)))
    for step in sorted(steps, reverse=True):
        key = checkpoint_key(run_key, step)
        if store.read_manifest(key) is not None:
            return step, key
        log.warning("%s has no manifest (interrupted upload): skipped", store.uri(key))
    return None


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def rng_state(noise: torch.Generator) -> dict[str, torch.Tensor]:
    """This rank's random state: the training-noise generator and torch's global CPU/CUDA generators."""
    state = {"noise": noise.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(noise: torch.Generator, state: dict[str, torch.Tensor]) -> None:
    noise.set_state(state["noise"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    *,
    store: Store,
    key: str,
    staging: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    noise: torch.Generator,
    trainer_state: dict[str, Any],
) -> None:
    """Collective: every rank writes its shards and RNG; rank 0 publishes (manifest last)."""
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed attempt must not be uploaded
        staging.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}, checkpoint_id=str(staging))
    torch.save(rng_state(noise), staging / _rng_file(rank))
    if rank == 0:
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
    dist.barrier()
    if rank == 0:
        store.put_dir(staging, key, meta={"kind": "wanlite-checkpoint", "step": trainer_state["step"]}, progress=False)
        shutil.rmtree(staging, ignore_errors=True)
        log.info("checkpoint step %d -> %s", trainer_state["step"], store.uri(key))
    dist.barrier()


def read_trainer_state(store: Store, key: str) -> dict[str, Any]:
    return json.loads(store.get_bytes(join_key(key, TRAINER_STATE)))


def load_checkpoint(
    *,
    store: Store,
    key: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    noise: torch.Generator,
) -> dict[str, Any]:
    """Collective: restore everything `save_checkpoint` wrote; returns the trainer state."""
    rank = dist.get_rank()
    where = [str(store.local_dir(key, progress=False)) if rank == 0 else None]
    dist.broadcast_object_list(where, src=0)
    directory = Path(where[0])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with torch.no_grad():
        for name, value in state["ema"].items():
            if value is not ema.shadow[name]:
                ema.shadow[name].copy_(value)
    rng_path = directory / _rng_file(rank)
    if not rng_path.is_file():
        raise FileNotFoundError(f"{rng_path}: no RNG state for rank {rank} in {store.uri(key)}")
    set_rng_state(noise, torch.load(rng_path, weights_only=True))
    return json.loads((directory / TRAINER_STATE).read_text())
