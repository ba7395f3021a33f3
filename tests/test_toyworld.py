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
    """The bar of issue 12: the shipped toy teacher's own samples are right on all three attributes >= 85 %."""
    from benchmarks.toyworld import teacher as teacher_mod
    from wanlite.checkpoint.synth import synth_teacher
    from wanlite.checkpoint.validate import validate_teacher

    record = json.loads((teacher_mod.SHIPPED / teacher_mod.RECORD).read_text())
    assert record["final"]["acc_all"] >= 0.85, record["final"]
    assert record["final"]["step"] == record["history"][-1]["step"] and record["commands"]
    assert record["world_seed"] == MAP_SEED
    teacher = teacher_mod.assemble(synth_teacher(tmp_path / "base", size="tiny", seed=0), tmp_path / "teacher")
    report = validate_teacher(teacher)
    assert report.ok and report.layout == "native", "\n".join(map(str, report.problems))


def test_the_teachers_ema_copy_computes_what_a_loaded_expert_computes_on_compact_contexts() -> None:
    """The EMA experts are what gets measured and shipped: with a deep copy they attended to compact text as
    if it were unpadded (its padding hook drove the original's processor), and measured 18 points too low."""
    from benchmarks.toyworld import teacher as teacher_mod
    from wanlite.text_padding import compact_text_padding

    trainer = teacher_mod._Trainer(teacher_mod.Recipe(steps=1, batch_size=2))
    ema = trainer.ema[teacher_mod.HIGH]
    loaded = compact_text_padding(teacher_mod.WanTransformer3DModel.from_config(ema.config)).eval()
    loaded.load_state_dict(ema.state_dict())
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 16, 1, 8, 8, generator=gen), torch.randn(1, 7, ema.config.text_dim, generator=gen)
    with torch.no_grad():
        a, b = (m(x, torch.tensor([900.0]), context, return_dict=False)[0] for m in (ema, loaded))
    torch.testing.assert_close(a, b)
