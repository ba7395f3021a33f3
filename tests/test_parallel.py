"""`parallel`: a teacher sharded from the rows each rank reads equals the whole one; the collective invariant holds.

The two ranks are real gloo processes. Rank 0's sample routes to the
high-noise expert and rank 1's to the low-noise one: only because the
decision to run an expert comes from the whole batch (`experts_to_run`) does
each rank enter both experts' forwards, and the step completes instead of
deadlocking (the group's timeout turns a deadlock into an error).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wanlite.checkpoint.reader import TeacherReader
from wanlite.distill import objective, parallel

EXPERTS = ("high_noise_model", "low_noise_model")
T_GLOBAL = torch.tensor([950.0, 100.0])  # sample 0 -> high-noise expert (rank 0), sample 1 -> low (rank 1)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn((2, 16, 1, 4, 4), generator=g), torch.randn((2, 8, 4096), generator=g)


def _targets(high: torch.nn.Module, low: torch.nn.Module, rows: slice, run: tuple[bool, bool]) -> torch.Tensor:
    x_t, context = _inputs()
    out = objective.teacher_targets(
        objective.Expert(high, 1.0), objective.Expert(low, 1.0), x_t[rows], T_GLOBAL[rows], context[rows], None,
        run_high=run[0], run_low=run[1],
    )  # fmt: skip
    return out.velocity


def _rank(rank: int, world: int, init_file: str, teacher: str, local_world: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        mesh = parallel.build_mesh("cpu", world, local_world)
        reader = TeacherReader(teacher)
        high, low = (parallel.sharded_expert(reader, e, mesh, torch.device("cpu"), torch.float32) for e in EXPERTS)
        local = sum(p.to_local().numel() for m in (high, low) for p in m.parameters())
        run = parallel.experts_to_run(T_GLOBAL, objective.routes_high)
        velocity = _targets(high, low, slice(rank, rank + 1), run)
        torch.save({"velocity": velocity, "local": local, "mesh": mesh.mesh_dim_names}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("local_world", [2, 1], ids=["fsdp-one-node", "hsdp-two-nodes"])
def test_a_teacher_sharded_from_its_rows_equals_the_whole_one(
    tiny_teacher: Path, tmp_path: Path, local_world: int
) -> None:
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tiny_teacher), local_world, str(tmp_path)), nprocs=2)
    reader = TeacherReader(tiny_teacher)
    whole = [reader.load_expert(e) for e in EXPERTS]
    reference = _targets(*whole, slice(0, 2), (True, True))
    total = sum(p.numel() for m in whole for p in m.parameters())
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["velocity"], reference[rank : rank + 1], rtol=1e-5, atol=1e-5)
        if local_world == 2:  # one node: each rank holds about half of each tensor's rows
            assert got["mesh"] == ("shard",)
            assert 0.45 * total < got["local"] < 0.6 * total
        else:  # two "nodes" of one rank: HSDP replicates across nodes, so each rank holds everything
            assert got["mesh"] == ("replicate", "shard")
            assert got["local"] == total


def test_the_run_decision_comes_from_the_whole_batch() -> None:
    # Rank 1 of T_GLOBAL holds only a low-noise sample, yet must run the high-noise expert too.
    assert parallel.experts_to_run(T_GLOBAL, objective.routes_high) == (True, True)
    assert parallel.experts_to_run(T_GLOBAL[1:], objective.routes_high) == (False, True)



def test_every_launch_stages_in_its_own_folder(tmp_path: Path) -> None:
    """Two launches of one run on one machine (issue 15) never share a staging folder."""
    from wanlite.distill.checkpointing import staging_folder

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        first, second = (staging_folder(tmp_path, "run") for _ in range(2))
    finally:
        dist.destroy_process_group()
    assert first != second and first.parent == second.parent == tmp_path / "run"


def _unit_bytes(unit: torch.nn.Module, units: list[torch.nn.Module]) -> int:
    """Bytes of the parameters FSDP gathers with `unit`: its own, less those of the units inside it."""
    inner = {id(p) for other in units if other is not unit and other in set(unit.modules()) for p in other.parameters()}
    return sum(p.numel() * p.element_size() for p in unit.parameters() if id(p) not in inner)


def test_no_frozen_unit_at_a14b_width_is_larger_than_an_ffn_matrix() -> None:
    """What bounds a rank's transient memory in a teacher forward: the largest unit, gathered whole (issue 14)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from wanlite.config import A14B

    with init_empty_weights():
        model = WanTransformer3DModel.from_config(A14B.replace(num_layers=2).diffusers_config())
    time_projection = sum(p.numel() * 4 for p in model.condition_embedder.time_proj.parameters())
    parallel.split_time_projection(model)
    units = parallel.frozen_units(model)
    largest = max(_unit_bytes(u, units) for u in units)
    ffn_matrix = A14B.dim * A14B.ffn_dim * 4 + A14B.ffn_dim * 4  # weight and bias of the FFN's first Linear
    assert largest == ffn_matrix < time_projection
    held = {id(p) for u in units for p in u.parameters()}
    assert {n for n, p in model.named_parameters() if id(p) not in held} <= {  # the root's own: small
        "patch_embedding.weight", "patch_embedding.bias", "proj_out.weight", "proj_out.bias", "scale_shift_table"}
