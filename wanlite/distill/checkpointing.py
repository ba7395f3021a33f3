"""Training checkpoints: who writes, who uploads, who reads (`CheckpointManager`), plus the EMA they carry.

A checkpoint holds everything a step depends on: the model and optimizer
state through `torch.distributed.checkpoint` (DCP; FSDP2's DTensors saved
sharded, each rank writing only its own shards), the EMA, one RNG file per
rank, and the trainer state (step, LR schedule, loss history, config
fingerprint). In the store it is one flat folder,
`runs/<run>/checkpoints/step-NNNNNNNN/`, published by its manifest.

Write: every rank writes into its OWN staging folder,
  `<staging root>/<run>/<launch>/rank-RRRRR/step-NNNNNNNN/`, on its own node's
  disk; `<launch>` is unique per start of a job, so two launches (of one run
  or of two) never share a folder.
Upload: every rank uploads the files it wrote (its DCP shards and RNG state;
  rank 0 also DCP's metadata and the trainer state), hashing as it streams;
  then a barrier; then rank 0 writes the manifest listing every rank's files,
  LAST. A job killed before that leaves no manifest and the checkpoint is not
  there for `--resume`.
Read: every rank downloads the whole checkpoint into its own folder, every
  file's size and sha256 verified against the manifest, so ranks need share
  no filesystem (and DCP may read any rank's shards). A checkpoint that fails
  verification on any rank is quarantined (moved under `runs/<run>/quarantine/`
  with the reason beside it) and the next older one is tried: a re-run
  proceeds from the last good checkpoint and rewrites the damaged step.

A checkpoint resumes only on the world size that wrote it: each rank restores
its own RNG state, and the config fingerprint records the world size.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from wanlite.config import ConfigError
from wanlite.storage import FileEntry, Manifest, Store, StoreError, join_key

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
QUARANTINE_REASON = "_QUARANTINE_REASON.txt"
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

    def full_state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Unsharded CPU copies; a collective: every rank must call it.

        `keep=False` (ranks that only take part in the gathers) drops each
        gathered tensor at once and returns {}, as `get_model_state_dict` with
        `full_state_dict` and `cpu_offload` leaves ranks other than 0: only
        the rank that writes the student holds a whole copy.
        """
        full = {}
        for name, tensor in self.shadow.items():
            gathered = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()
            if keep:
                full[name] = gathered
        return full


def checkpoint_key(run_key: str, step: int) -> str:
    return join_key(run_key, "checkpoints", f"step-{step:08d}")


def checkpoint_steps(store: Store, run_key: str) -> list[int]:
    """Steps that have a checkpoint folder (complete or not), newest first."""
    prefix = join_key(run_key, "checkpoints")
    if not store.exists(prefix):
        return []
    steps = {int(m.group(1)) for key in store.list(prefix) if (m := _STEP_DIR.match(key[len(prefix) + 1 :].split("/")[0]))}
    return sorted(steps, reverse=True)


def latest_checkpoint(store: Store, run_key: str) -> tuple[int, str] | None:
    """(step, key) of the newest published checkpoint (a manifest with every file at its size), or None.

    Cheap (a listing, no download, no hashing): what progress reporting and the
    "already exists" check need. `CheckpointManager.restore` verifies contents.
    """
    for step in checkpoint_steps(store, run_key):
        if store.read_manifest(checkpoint_key(run_key, step)) is not None:
            return step, checkpoint_key(run_key, step)
    return None


def read_trainer_state(store: Store, key: str) -> dict[str, Any]:
    """The trainer state of a published checkpoint, read straight from the store (not verified)."""
    return json.loads(store.get_bytes(join_key(key, TRAINER_STATE)))


def new_launch_id() -> str:
    """A name for one start of a job: the time (sortable, readable) and a random suffix (unique)."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


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


@dataclass(frozen=True)
class Restored:
    """A checkpoint every rank has downloaded and verified: its step, this rank's copy, its trainer state."""

    step: int
    key: str
    directory: Path
    trainer_state: dict[str, Any]


class CheckpointManager:
    """A run's checkpoints in the store; every method is a collective (all ranks call it, in the same order).

    `staging` is this launch's folder on this rank's node (see `staging_folder`).
    """

    def __init__(self, store: Store, run_key: str, staging: Path) -> None:
        self.store, self.run_key = store, run_key
        self.rank = dist.get_rank()
        self.folder = staging / f"rank-{self.rank:05d}"

    # --- write + upload ------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: EMA,
        noise: torch.Generator,
        trainer_state: dict[str, Any],
    ) -> None:
        """Every rank writes and uploads its files; rank 0 publishes the manifest listing all of them."""
        key = checkpoint_key(self.run_key, step)
        local = self.folder / f"step-{step:08d}"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()},
                 storage_writer=dcp.FileSystemWriter(str(local)))  # fmt: skip
        torch.save(rng_state(noise), local / _rng_file(self.rank))
        if self.rank == 0:
            (local / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
        mine = {}
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            with open(path, "rb") as fh:
                mine[rel] = self.store.put_stream(join_key(key, rel), fh)
        everyone: list[dict[str, FileEntry] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)  # also the barrier: every rank's files are in the store
        if self.rank == 0:
            files: dict[str, FileEntry] = {}
            for rank, entries in enumerate(everyone):
                clash = set(files) & set(entries or {})
                if clash:
                    raise StoreError(f"{self.store.uri(key)}: rank {rank} wrote {sorted(clash)[0]} too")
                files.update(entries or {})
            self.store.write_manifest(key, Manifest(files=files, meta={"kind": "wanlite-checkpoint", "step": step}))
            log.info("checkpoint step %d -> %s (%d files from %d ranks)", step, self.store.uri(key), len(files),
                     len(everyone))  # fmt: skip
        shutil.rmtree(local, ignore_errors=True)
        dist.barrier()  # nobody moves on (or exits) before the checkpoint is published

    # --- read ----------------------------------------------------------------------------

    def restore(self) -> Restored | None:
        """Download and verify the newest good checkpoint on every rank; quarantine damaged ones on the way.

        Returns None when the run has no usable checkpoint. Load it into the
        models with `load`.
        """
        candidates: list[Any] = [None]
        if self.rank == 0:  # one view of the store for every rank, so all take the same branches below
            candidates[0] = [(step, *self.store.inspect(checkpoint_key(self.run_key, step))[::-1])
                             for step in checkpoint_steps(self.store, self.run_key)]  # fmt: skip
        dist.broadcast_object_list(candidates, src=0)
        for step, why, manifest in candidates[0]:
            key = checkpoint_key(self.run_key, step)
            if manifest is None and why.startswith("no "):  # never published: not damaged, just absent
                log.warning("%s: %s: skipped", self.store.uri(key), why)
                continue
            directory = self.folder / f"restore-step-{step:08d}"
            shutil.rmtree(directory, ignore_errors=True)
            if manifest is not None:
                try:  # every file's size and sha256 checked against the manifest
                    self.store.get_dir(key, directory, progress=False)
                except StoreError as err:
                    why = str(err)
            problems: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(problems, why)
            damaged = "; ".join(sorted({p for p in problems if p}))
            if damaged:
                shutil.rmtree(directory, ignore_errors=True)
                self._quarantine(key, damaged)
                continue
            return Restored(step, key, directory, json.loads((directory / TRAINER_STATE).read_text()))
        return None

    def _quarantine(self, key: str, reason: str) -> None:
        """Move a damaged checkpoint aside (with the reason) so that step can be written again."""
        if self.rank == 0:
            target = join_key(self.run_key, "quarantine", f"{key.rsplit('/', 1)[-1]}-{new_launch_id()}")
            log.warning("%s is damaged: %s; moved to %s, resuming from an older checkpoint", self.store.uri(key),
                        reason, self.store.uri(target))  # fmt: skip
            self.store.put_bytes(join_key(target, QUARANTINE_REASON), (reason + "\n").encode())
            self.store.move(key, target)
        dist.barrier()

    def load(
        self,
        restored: Restored,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: EMA,
        noise: torch.Generator,
    ) -> None:
        """Load a restored checkpoint into the (sharded) models, EMA and this rank's RNG; removes the copy."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict()}
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(restored.directory)))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        with torch.no_grad():
            for name, value in state["ema"].items():
                if value is not ema.shadow[name]:
                    ema.shadow[name].copy_(value)
        rng_path = restored.directory / _rng_file(self.rank)
        if not rng_path.is_file():
            raise FileNotFoundError(f"{self.store.uri(restored.key)}: no RNG state for rank {self.rank}")
        set_rng_state(noise, torch.load(rng_path, weights_only=True))
        shutil.rmtree(restored.directory, ignore_errors=True)

    def close(self) -> None:
        """Remove this rank's staging folder (what a killed launch leaves behind is documented in the README)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()  # the launch folder, once every rank on this node has left it
        except OSError:
            pass


def staging_folder(root: Path, run_name: str) -> Path:
    """This launch's staging folder under `root`: `<root>/<run>/<launch id>`, the id agreed by every rank."""
    launch = [new_launch_id() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(launch, src=0)
    return root / run_name / str(launch[0])


def open_run(
    store: Store, run_key: str, run_name: str, fp: dict[str, Any], *, resume: bool, staging_dir: str | None,
    finished: bool,
) -> CheckpointManager | None:
    """The run's checkpoint manager; None when the run has already published its result.

    Without `resume`, a run that has written anything is an error (nothing is
    overwritten). A finished run found with `resume` must have been written by
    this config (`fp`), else that is an error too. Staging goes under
    `staging_dir` (node-local; default the system temp folder), one folder per launch.
    """
    from wanlite.distill.options import check_resumable

    steps = checkpoint_steps(store, run_key)
    if steps and not resume:
        raise ConfigError(
            f"run {run_name}: {store.uri(checkpoint_key(run_key, steps[0]))} already exists; pass --resume to "
            "continue (or to fetch the result of) that run, or choose another --run-name (nothing was overwritten)"
        )
    if finished:
        latest = latest_checkpoint(store, run_key)
        if latest is not None:
            check_resumable(fp, read_trainer_state(store, latest[1])["fingerprint"], store.uri(latest[1]))
        return None
    root = Path(staging_dir) if staging_dir else Path(tempfile.gettempdir()) / "wanlite-staging"
    return CheckpointManager(store, run_key, staging_folder(root, run_name))


def resume_point(ckpt: CheckpointManager, fp: dict[str, Any], *, resume: bool) -> Restored | None:
    """With `resume`, the newest good checkpoint (verified on every rank, written by this config `fp`), else None."""
    from wanlite.distill.options import check_resumable

    if not resume:
        return None
    restored = ckpt.restore()
    if restored is None:
        log.info("--resume: nothing to resume under %s yet; starting at step 0", ckpt.store.uri(ckpt.run_key))
        return None
    check_resumable(fp, restored.trainer_state["fingerprint"], ckpt.store.uri(restored.key))
    return restored
