"""Each projection fix on its own, on the planted test teacher: block-input scale and held-out error. Not a test.

The planted teacher (tests/fixtures/student.py: dim 512, 4 layers, four massive
residual channels) is projected onto dim 256 (all 4 blocks) with importance
selection, with `norm_ratios` and `rank_embedding_units` each on and off. For
each student it prints the least-squares k in `student ~ k x teacher` on the kept
channels at block 0's self-attn, cross-attn and FFN inputs and at the head's
input (1.0: the student sees the teacher's values), and the relative output
error against the routed teacher on held-out inputs of both ranges.

    .venv/bin/python benchmarks/projection_fixes.py [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.student import PROJ_TEACHER, write_teacher  # noqa: E402
from wanlite.checkpoint.reader import TeacherReader  # noqa: E402
from wanlite.config import EXPERTS  # noqa: E402
from wanlite.projection import project_student  # noqa: E402
from wanlite.student import WanLiteStudent  # noqa: E402

HIGH, LOW = EXPERTS
STUDENT = PROJ_TEACHER.replace(dim=256, ffn_dim=512, num_heads=2)


def held_out() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000)
    return torch.randn(4, 16, 8, 8, generator=gen), torch.tensor([990.0, 900.0, 600.0, 150.0]), torch.randn(
        4, 512, 4096, generator=gen
    )


def site_inputs(model, latents, timesteps, context) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    block = model.blocks[0]
    sites = {"norm1": block.attn1, "norm3": block.attn2, "norm2": block.ffn, "head": model.proj_out}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, k=k: captured.__setitem__(k, a[0].float())) for k, m in sites.items()
    ]
    with torch.no_grad():
        model(latents.unsqueeze(2), timesteps, context)
    for hook in hooks:
        hook.remove()
    return captured


def routed_teacher(reader: TeacherReader, latents, timesteps, context) -> torch.Tensor:
    out = torch.empty_like(latents)
    for expert in EXPERTS:
        rows = (timesteps >= 875) if expert == HIGH else (timesteps < 875)
        model = reader.load_expert(expert)
        with torch.no_grad():
            out[rows] = model(latents[rows].unsqueeze(2), timesteps[rows], context[rows]).sample[:, :, 0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="wanlite-fixes-")))
    work = parser.parse_args().work
    teacher = write_teacher(work / "teacher", PROJ_TEACHER, seed=0)
    reader = TeacherReader(teacher)
    latents, timesteps, context = held_out()
    low = slice(2, 4)  # block-input scales on the low-noise inputs (the seeding expert's range)
    reference = site_inputs(reader.load_expert(LOW), latents[low], timesteps[low], context[low])
    target = routed_teacher(reader, latents, timesteps, context)
    print("| norm_ratios | rank_embedding_units | norm1 | norm3 | norm2 | head | held-out rel. error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for norm_ratios in (False, True):
        for ranking in (False, True):
            out = work / f"student-{norm_ratios}-{ranking}"
            report = project_student(teacher, STUDENT, out_dir=out, calib_samples=4, calib_random=True,
                                     norm_ratios=norm_ratios, rank_embedding_units=ranking)  # fmt: skip
            kept = torch.tensor(report["selection"]["channel_indices"])
            student = WanLiteStudent.from_pretrained(out).eval()
            got = site_inputs(student, latents[low], timesteps[low], context[low])
            ref = {k: v[..., kept] for k, v in reference.items()}
            scale = {k: float((got[k] * ref[k]).sum() / ref[k].pow(2).sum()) for k in got}
            with torch.no_grad():
                pred = student.forward_image(latents, timesteps, context)
            error = float((pred - target).norm() / target.norm())
            on = {True: "on", False: "off"}
            scales = " | ".join(f"{scale[k]:.3f}" for k in ("norm1", "norm3", "norm2", "head"))
            print(f"| {on[norm_ratios]} | {on[ranking]} | {scales} | {error:.3f} |")


if __name__ == "__main__":
    main()
