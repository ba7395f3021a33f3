"""The toy world of benchmarks/toyworld: every prompt names a distinct, fully visible, reproducible sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.toyworld.world import MAP_SEED, SIZES, World, all_attributes, prompts


def test_prompts_are_distinct_and_name_every_attribute() -> None:
    names = prompts()
    assert len(names) == len(set(names)) == 48
    assert names[0] == "a small red square"


def test_shapes_fit_the_canvas_and_grow_with_size() -> None:
    world, gen = World(16), torch.Generator().manual_seed(0)
    for attrs in all_attributes():
        areas = {int(world.canvas(attrs, gen)[3].sum()) for _ in range(8)}
        assert len(areas) == 1, f"{attrs.prompt}: clipped by the border at some places ({areas})"
    square = [a for a in all_attributes() if a.shape == 0 and a.colour == 0]
    areas = [int(world.canvas(a, gen)[3].sum()) for a in square]
    assert areas == [(2 * r + 1) ** 2 for r in SIZES.values()]


def test_rendering_is_a_function_of_the_generator() -> None:
    world = World(16)
    a, rows_a = world.sample(4, torch.Generator().manual_seed(3))
    b, rows_b = world.sample(4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(rows_a, rows_b)
    assert a.shape == (4, 16, 1, 16, 16)


def test_world_seed_draws_another_world_with_the_same_prompts() -> None:
    rows = torch.arange(8)
    a = World(16, seed=1).render_rows(rows, torch.Generator().manual_seed(0))
    b = World(16, seed=2).render_rows(rows, torch.Generator().manual_seed(0))
    assert a.shape == b.shape and not torch.allclose(a, b)
    assert torch.equal(a, World(16, seed=1).render_rows(rows, torch.Generator().manual_seed(0)))



@pytest.mark.slow
def test_teacher_run_extends_only_when_asked_and_records_each_schedule(tmp_path: Path) -> None:
    from benchmarks.toyworld import teacher as teacher_mod
    from wanlite.distill.data import EmbeddingSet

    _, emb_uri = teacher_mod.base_teacher(tmp_path)
    world, emb, ckpt = World(16), EmbeddingSet.load(emb_uri), tmp_path / "checkpoint.pt"
    short, longer = teacher_mod.Recipe(steps=2, batch_size=2), teacher_mod.Recipe(steps=3, batch_size=2)
    step, _, segments = teacher_mod.train_experts(world, emb, short, checkpoint=ckpt, every=1)
    assert (step, segments) == (2, [{"schedule_steps": 2, "until": 2}])
    with pytest.raises(ValueError, match="--extend"):  # another recipe is not silently resumed
        teacher_mod.train_experts(world, emb, longer, checkpoint=ckpt, every=1)
    step, _, segments = teacher_mod.train_experts(world, emb, longer, checkpoint=ckpt, every=1, extend=True)
    assert (step, segments) == (3, [{"schedule_steps": 2, "until": 2}, {"schedule_steps": 3, "until": 3}])
    with pytest.raises(ValueError, match="trained with"):  # extending never shortens or changes another knob
        teacher_mod.train_experts(world, emb, teacher_mod.Recipe(steps=3, batch_size=4), checkpoint=ckpt, extend=True)


def test_shipped_teacher_models_its_world_and_is_a_valid_native_wan_checkpoint(tmp_path: Path) -> None:
    """The shipped toy teacher's own samples are right on all three attributes >= 75 % of the time.

    Issue 12 asks for 85 %; the teacher shipped reaches 78 % (BENCHMARKS.md, the toy-teacher section), so
    this holds it to what it measured, and a worse teacher cannot be shipped in its place unnoticed.
    """
    from benchmarks.toyworld import teacher as teacher_mod
    from wanlite.checkpoint.synth import synth_teacher
    from wanlite.checkpoint.validate import validate_teacher

    record = json.loads((teacher_mod.SHIPPED / teacher_mod.RECORD).read_text())
    assert record["final"]["acc_all"] >= 0.75, record["final"]
    assert record["final"] == record["history"][-1] and record["commands"] and record["world_seed"] == MAP_SEED
    teacher = teacher_mod.assemble(synth_teacher(tmp_path / "base", size="tiny", seed=0), tmp_path / "teacher")
    report = validate_teacher(teacher)
    assert report.ok and report.layout == "native", "\n".join(map(str, report.problems))
