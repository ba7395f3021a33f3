"""Where every model of a run lives: the device mesh, FSDP2 sharding, and teachers built shard by shard.

One module for every model a trainer holds (the student, the frozen teacher
experts, a critic), so the distillation and few-step trainers shard alike:

- `build_mesh`: a 1-D ``("shard",)`` mesh on one node; a 2-D
  ``("replicate", "shard")`` mesh (HSDP: parameters sharded within a node,
  replicated across nodes, so the per-step all-gathers stay on the node's fast
  links) by default when the job spans several nodes.
- `shard_trained`: FSDP2 (`fully_shard`) per transformer block, then the root.
  Precision stays with `torch.autocast` in the trainer rather than FSDP2's
  `MixedPrecisionPolicy`: autocast runs the teacher, the student and the
  objective in bf16 alike and keeps the modules diffusers holds in fp32 (norms,
  time embedding) computing in fp32, while the fp32 master weights stay what
  the optimizer and the checkpoints see.
- `sharded_expert`: a frozen Wan expert built on the meta device, sharded, and
  filled by reading from the safetensors only the rows this rank owns. No rank
  ever holds a whole expert, in host RAM or on its device.

Invariant (collectives): a sharded model's forward all-gathers its parameters,
so EVERY rank must enter EVERY forward of a sharded model, the same number of
times, in the same order, or the job deadlocks. Whether a teacher expert runs
in a step must therefore depend on the global batch, never on the samples a
rank happens to hold: `experts_to_run` is that decision, and the trainer takes
it from the whole batch's timesteps, which every rank draws identically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

if TYPE_CHECKING:
    from wanlite.checkpoint.reader import TeacherReader

SHARD, REPLICATE = "shard", "replicate"

RowReader = Callable[[str, int, int], torch.Tensor]
"""`read(name, start, stop)`: rows [start, stop) of the checkpoint tensor behind parameter `name`."""


def build_mesh(device_type: str, world_size: int, local_world_size: int, *, hsdp: bool | None = None) -> DeviceMesh:
    """The job's mesh: 1-D (shard over every rank) or 2-D HSDP (replicate over nodes, shard within one).

    `hsdp=None` picks HSDP exactly when the job spans more than one node
    (`world_size > local_world_size`). HSDP needs whole nodes of equal size.
    """
    if world_size % local_world_size:
        raise ValueError(f"world size {world_size} is not a whole number of nodes of {local_world_size} ranks")
    nodes = world_size // local_world_size
    if hsdp is None:
        hsdp = nodes > 1
    if hsdp:
        return init_device_mesh(device_type, (nodes, local_world_size), mesh_dim_names=(REPLICATE, SHARD))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=(SHARD,))


def shard_trained(model: nn.Module, blocks: Iterable[nn.Module], mesh: DeviceMesh) -> None:
    """FSDP2 for a model that trains: each block is one unit (gathered for forward and backward), the rest the root."""
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


class RowSplitLinear(nn.Module):
    """A Linear computed as `parts` Linears over consecutive blocks of its output rows: the same map, smaller units.

    Wan's time projection (dim -> 6 x dim, the six modulation vectors) is an
    expert's largest matrix, 629 MB in fp32 at A14B width against an FFN
    matrix's 283 MB; split into its six chunks, no frozen unit is larger than
    an FFN matrix. `checkpoint_rows` maps each part's parameters back to the
    rows of the checkpoint tensor they hold.
    """

    def __init__(self, linear: nn.Linear, parts: int) -> None:
        super().__init__()
        if linear.out_features % parts:
            raise ValueError(f"RowSplitLinear: {linear.out_features} output rows do not split into {parts} parts")
        self.rows = linear.out_features // parts
        w = linear.weight
        self.parts = nn.ModuleList(
            nn.Linear(linear.in_features, self.rows, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
            for _ in range(parts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def split_time_projection(model: nn.Module) -> None:
    """Replace a Wan transformer's time projection by its six dim-sized chunks (`RowSplitLinear`)."""
    projection = model.condition_embedder.time_proj
    model.condition_embedder.time_proj = RowSplitLinear(projection, projection.out_features // projection.in_features)


def checkpoint_rows(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Parameter name -> (its name in the unsplit model, the first checkpoint row it holds), for split Linears."""
    sources: dict[str, tuple[str, int]] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, RowSplitLinear):
            for i, part in enumerate(module.parts):
                for leaf, _ in part.named_parameters():
                    sources[f"{prefix}.parts.{i}.{leaf}"] = (f"{prefix}.{leaf}", i * module.rows)
    return sources


def frozen_units(model: nn.Module) -> list[nn.Module]:
    """FSDP units of a frozen Wan transformer, children before parents.

    Every Linear is its own unit; what else a block's child holds (the
    attention's q/k norms, the cross-attention norm) is one unit with that
    child, a block's modulation table one with the block, and the root keeps
    the patch embedding and output head. A forward-only model gathers one unit
    at a time and frees it right after, so what a rank holds unsharded at once
    is bounded by its largest unit, an FFN matrix once the time projection is
    split (`split_time_projection`); while a unit is gathered its all-gather
    buffer and unsharded copy coexist, about twice its bytes. Measured with
    `distill --nproc 2` on a 2-layer A14B-width teacher (BENCHMARKS.md): each
    rank's peak RSS fell by about 660 MB (rank 0: 5,726 -> 5,065 MB) from one
    unit per attention, FFN and time projection to these. The price is more,
    smaller all-gathers (14 per block instead of 5).
    """
    units: list[nn.Module] = []
    for parent in (*model.blocks, model.condition_embedder):
        mine: list[nn.Module] = []
        for child in parent.children():
            linears = [m for m in child.modules() if isinstance(m, nn.Linear)]
            mine += linears
            if _holds_more(child, linears):
                mine.append(child)
        units += mine
        if _holds_more(parent, mine):
            units.append(parent)
    return units


def _holds_more(module: nn.Module, units: list[nn.Module]) -> bool:
    """Whether `module` has a parameter that none of `units` holds."""
    held = {id(p) for unit in units for p in unit.parameters()}
    return any(id(p) not in held for p in module.parameters())


def shard_frozen(model: nn.Module, units: Iterable[nn.Module], mesh: DeviceMesh) -> None:
    """FSDP2 for a forward-only model: each unit is gathered just before it runs and freed just after."""
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)


def owned_rows(param: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of dim 0 this rank holds of a parameter (all rows when it is not sharded).

    FSDP2 shards dim 0 like `torch.chunk`: ranks hold ceil(n / shards) rows each
    in shard-mesh order, the last ones fewer or none.
    """
    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.dim() else 1
    mesh = param.device_mesh
    shard_dim = mesh.mesh_dim_names.index(SHARD) if mesh.mesh_dim_names else mesh.ndim - 1
    shards, index = mesh.size(shard_dim), mesh.get_local_rank(shard_dim)
    n = param.shape[0]
    chunk = -(-n // shards)
    start = min(n, index * chunk)
    return start, min(n, start + chunk)


@torch.no_grad()
def materialise(model: nn.Module, device: torch.device, read: RowReader) -> None:
    """Give a (sharded) meta-device model real parameters on `device`, reading only the rows each rank owns.

    Buffers that already hold values (computed at construction, like RoPE
    tables) keep them; every parameter is filled from `read`, cast to the
    dtype the model gave it.
    """
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    for name, value in buffers.items():
        model.get_buffer(name).copy_(value)
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param.data
        start, stop = owned_rows(param)
        if local.dim() and local.shape[0] != stop - start:
            raise AssertionError(f"{name}: rank holds {local.shape[0]} rows, expected [{start}, {stop})")
        if local.numel():
            value = read(name, start, stop)
            local.copy_(value.reshape(local.shape))


def experts_to_run(t_global: torch.Tensor, routes_high: Callable[[torch.Tensor], torch.Tensor]) -> tuple[bool, bool]:
    """(run the high-noise expert, run the low-noise expert) this step, from the WHOLE batch's timesteps.

    The module invariant: every rank must enter every sharded expert's forward,
    so the decision is taken from `t_global`, identical on every rank, and a
    rank whose own samples all route to one expert still runs the other.
    """
    high = routes_high(t_global)
    return bool(high.any()), bool((~high).any())


def sharded_expert(
    reader: TeacherReader, expert: str, mesh: DeviceMesh | None, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """One frozen teacher expert, sharded over `mesh` (None: whole, for one rank), built without ever being whole.

    Built on the meta device, sharded (`frozen_units`), then each rank reads
    from the safetensors just the rows of every tensor it owns: a rank holds
    the expert's bytes / shard-group size, plus about twice its largest unit
    while that unit runs (`frozen_units`).
    """
    from wanlite.checkpoint.transformer_keys import diffusers_to_native_names

    model = reader.empty_expert(expert, dtype)
    split_time_projection(model)  # on one rank too: the same arithmetic whatever the world size
    if mesh is not None:
        shard_frozen(model, frozen_units(model), mesh)
    to_native = diffusers_to_native_names(reader.arch)
    split = checkpoint_rows(model)

    def read(name: str, start: int, stop: int) -> torch.Tensor:
        source, first = split.get(name, (name, 0))
        return reader.rows(expert, to_native[source], first + start, first + stop)

    materialise(model, device, read)
    return model.eval().requires_grad_(False)
