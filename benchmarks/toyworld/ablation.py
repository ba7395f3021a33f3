"""Each projection fix's effect on the step-0 held-out MSE, and the evaluation gate's verdicts, on the toy world.

    python -m benchmarks.toyworld.ablation                                   # the ablation table
    python -m benchmarks.toyworld.ablation --distilled-uri file:///…/final   # and the gate table

Uses the study's cached preparation (teacher, data, held-out targets; see
`benchmarks.toyworld.study`). The ablation projects each init with every fix
on (the default), each one off alone, and all off (projection as it was before
issue 12), and scores the unchanged projected student on the held-out set.
The gate table runs `wanlite evaluate`'s default gate (margin over the zero
predictor and over the projected init) on a zero-velocity, a random, the
projected and a distilled student.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.toyworld.study import PRESET, Prepared, StudyConfig, make_init, prepare
from benchmarks.toyworld.world import prompts
from wanlite.config import get_preset
from wanlite.distill.data import EmbeddingSet
from wanlite.evaluate import evaluate
from wanlite.pipeline import local_path
from wanlite.student import WanLiteStudent

VARIANTS: dict[str, dict[str, bool]] = {
    "all fixes (default)": {},
    "without norm ratios": {"norm_ratios": False},
    "without embedding-unit ranking": {"rank_embedding_units": False},
    "random calibration inputs": {"calib_random": True},
    "none (projection before issue 12)": {"norm_ratios": False, "rank_embedding_units": False, "calib_random": True},
}
INITS = ("importance-low", "importance-high", "uniform-low", "uniform-high")
GATE_PROMPTS, GATE_SEEDS = 8, (0, 1)


def ablation(prep: Prepared, cfg: StudyConfig) -> dict[str, dict[str, float]]:
    """{variant: {init: step-0 held-out MSE}}."""
    emb = EmbeddingSet.load(prep.embeddings)
    return {name: {init: prep.heldout.mse(WanLiteStudent.from_pretrained(make_init(prep, cfg, init, **v)).eval(), emb)
                   for init in INITS} for name, v in VARIANTS.items()}  # fmt: skip


def gate(prep: Prepared, cfg: StudyConfig, distilled_uri: str | None, work: Path) -> dict[str, dict[str, Any]]:
    """The default gate's verdict and velocity errors for zero, random, projected and (optionally) distilled."""
    init = Path(make_init(prep, cfg, "importance-low"))
    torch.manual_seed(0)
    random = WanLiteStudent.from_arch(get_preset(PRESET).arch)
    random.save_pretrained(work / "random")
    dead = WanLiteStudent.from_pretrained(init)
    with torch.no_grad():
        dead.proj_out.weight.zero_()
        dead.proj_out.bias.zero_()
    dead.save_pretrained(work / "zero")
    students = {"zero velocity": work / "zero", "random init": work / "random", "projected init": init}
    if distilled_uri:
        students["distilled (study run)"] = local_path(distilled_uri)
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(prompts()[:: len(prompts()) // GATE_PROMPTS][:GATE_PROMPTS]) + "\n")
    table = {}
    for name, folder in students.items():
        report = evaluate(folder, prep.teacher, out_dir=work / name.replace(" ", "-"), prompts=prompt_file,
                          seeds=GATE_SEEDS, size=cfg.latent_size * 8, baseline=init, device="cpu")  # fmt: skip
        table[name] = {"passed": report["passed"], "failures": report["gate"]["failures"],
                       **{k: report["metrics"][k] for k in ("velocity_rel_mse_high", "velocity_rel_mse_low")}}  # fmt: skip
    return table


def markdown(ablate: dict[str, dict[str, float]], verdicts: dict[str, dict[str, Any]] | None) -> str:
    base = ablate["all fixes (default)"]
    lines = ["| projection | " + " | ".join(INITS) + " |", "|---|" + "---:|" * len(INITS)]
    for name, row in ablate.items():
        cells = [f"{row[i]:.3f}" + ("" if row is base else f" ({100 * (row[i] / base[i] - 1):+.1f} %)") for i in INITS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if verdicts:
        lines += ["", "| student | velocity rel. MSE high / low | default gate |", "|---|---|---|"]
        for name, v in verdicts.items():
            verdict = "passes" if v["passed"] else "fails: " + "; ".join(v["failures"])
            lines.append(f"| {name} | {v['velocity_rel_mse_high']:.3f} / {v['velocity_rel_mse_low']:.3f} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.toyworld.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=StudyConfig.work, help="the study's work directory")
    parser.add_argument("--distilled-uri", help="a distilled student (a study run's student_uri) for the gate table")
    parser.add_argument("--no-gate", action="store_true", help="only the ablation table")
    args = parser.parse_args(argv)
    cfg = StudyConfig(work=args.work)
    torch.set_num_threads(cfg.threads)
    prep = prepare(cfg)
    ablate = ablation(prep, cfg)
    verdicts = None
    if not args.no_gate:
        with tempfile.TemporaryDirectory(prefix="wanlite-gate-") as tmp:
            verdicts = gate(prep, cfg, args.distilled_uri, Path(tmp))
    (cfg.work / "ablation.json").write_text(json.dumps({"ablation": ablate, "gate": verdicts}, indent=1))
    print(markdown(ablate, verdicts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
