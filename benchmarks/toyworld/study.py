"""The convergence study: every init x seed through the real wanlite steps, then the table and the plot.

Stages are cached in the work directory (teacher, decoder, embeddings, latent
sets and projections by content; training runs by name, resumed with
`--resume`), so an interrupted study re-runs only what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.toyworld import decoder as decoder_mod
from benchmarks.toyworld import teacher as teacher_mod
from benchmarks.toyworld.decoder import DEFAULT_STEPS
from benchmarks.toyworld.evaluate import HeldOut, sample_student, score_samples, student_from_checkpoint
from benchmarks.toyworld.world import MAP_SEED, World, prompts
from wanlite.checkpoint.reader import TeacherReader
from wanlite.checkpoint.synth import synth_teacher
from wanlite.config import get_preset
from wanlite.distill.data import EmbeddingSet, LatentSet
from wanlite.distill.encode import encode_prompts
from wanlite.distill.options import TrainConfig
from wanlite.distill.teacher_data import teacher_data
from wanlite.distill.train import train
from wanlite.pipeline import local_path
from wanlite.projection import project_student
from wanlite.storage import Store
from wanlite.student import WanLiteStudent

log = logging.getLogger(__name__)

PRESET = "tiny"
INITS = ("random", "uniform-low", "uniform-high", "uniform-mix", "importance-low", "importance-high", "importance-mix")
HELDOUT_SEED = 1_000_000


@dataclass
class StudyConfig:
    """Every knob of the study; the defaults are the full-length run recorded in BENCHMARKS.md."""

    work: Path = Path(".wanlite/toyworld")
    latent_size: int = 16
    world_seed: int = MAP_SEED
    teacher_steps: int = 0
    decoder_steps: int = DEFAULT_STEPS
    samples_per_prompt: int = 4
    heldout_per_prompt: int = 1
    sample_steps: int = 20
    heldout_sigmas: int = 4
    distill_steps: int = 200
    distill_batch: int = 16
    lr: float = 5e-4
    eval_every: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    inits: tuple[str, ...] = INITS
    calib_samples: int = 16
    threads: int = 2


@dataclass
class Prepared:
    """What every run shares: the world, the teacher, the data, the held-out targets, the decoder."""

    world: World
    teacher: Path
    store_uri: str
    embeddings: str
    train_data: str
    heldout_data: str
    heldout: HeldOut
    decoder: decoder_mod.AttributeDecoder
    timings: dict[str, float]


def prepare(cfg: StudyConfig) -> Prepared:
    """Teacher, embeddings, teacher-data (train and held-out), held-out targets and decoder; each cached."""
    cfg.work.mkdir(parents=True, exist_ok=True)
    world = World(cfg.latent_size, seed=cfg.world_seed)
    store_uri = (cfg.work / "store").resolve().as_uri()
    base = cfg.work / "teacher-base"
    if not base.exists():
        synth_teacher(base, size="tiny", seed=0)
    emb_uri = encode_prompts(base, prompts(), out=store_uri, progress=False)["uri"]  # same T5 as the final teacher
    emb = EmbeddingSet.load(emb_uri)
    teacher, timings = _teacher(cfg, base, world, emb)
    common = {"image_size": cfg.latent_size * 8, "steps": cfg.sample_steps, "batch_size": 32, "progress": False}
    train_uri = teacher_data(teacher, emb_uri, store_uri, samples_per_prompt=cfg.samples_per_prompt, seed=0,
                             **common)["uri"]  # fmt: skip
    heldout_uri = teacher_data(teacher, emb_uri, store_uri, samples_per_prompt=cfg.heldout_per_prompt,
                               seed=HELDOUT_SEED, **common)["uri"]  # fmt: skip
    heldout_path = cfg.work / f"heldout-{_tag(heldout_uri, cfg.heldout_sigmas)}.pt"
    if not heldout_path.is_file():
        reader = TeacherReader(teacher)
        high, low = (reader.load_expert(name).eval() for name in teacher_mod.EXPERT_DIRS)
        HeldOut.build(LatentSet.load(heldout_uri), emb, high, low, cfg.heldout_sigmas, seed=1).save(heldout_path)
    decoder_path = cfg.work / f"decoder-{_tag(cfg.latent_size, cfg.decoder_steps)}.pt"
    decoder = decoder_mod.load_or_train(decoder_path, world, steps=cfg.decoder_steps)
    return Prepared(world, teacher, store_uri, emb_uri, train_uri, heldout_uri, HeldOut.load(heldout_path), decoder,
                    timings)  # fmt: skip


def _teacher(cfg: StudyConfig, base: Path, world: World, emb: EmbeddingSet) -> tuple[Path, dict[str, Any]]:
    """The shipped toy teacher (seconds), or with `--teacher-steps N` one trained here for this world."""
    if not cfg.teacher_steps:
        record = json.loads((teacher_mod.SHIPPED / teacher_mod.RECORD).read_text())
        if record["world_seed"] != cfg.world_seed or record["latent_size"] != cfg.latent_size:
            raise SystemExit(f"the shipped teacher models world {record['world_seed']} at latent size "
                             f"{record['latent_size']}; pass --teacher-steps N to train one for world "
                             f"{cfg.world_seed} at {cfg.latent_size}")  # fmt: skip
        return teacher_mod.assemble(base, cfg.work / "teacher-shipped"), {"teacher": "shipped", **record["final"]}
    recipe = teacher_mod.Recipe(steps=cfg.teacher_steps)
    tag = _tag(cfg.latent_size, cfg.world_seed, asdict(recipe))
    teacher, timing_file = cfg.work / f"teacher-{tag}", cfg.work / f"teacher-{tag}.json"
    if not teacher.exists():
        started = time.perf_counter()
        _, experts, _ = teacher_mod.train_experts(world, emb, recipe, checkpoint=cfg.work / f"teacher-{tag}.ckpt")
        timing_file.write_text(json.dumps({"teacher_train_s": time.perf_counter() - started,
                                           "threads": torch.get_num_threads()}))  # fmt: skip
        teacher_mod.save_teacher(base, teacher, experts)
    return teacher, json.loads(timing_file.read_text())


def make_init(prep: Prepared, cfg: StudyConfig, init: str, **fixes: bool) -> str | None:
    """The student folder an init starts from (None: the trainer's own random init of the preset).

    `fixes`: projection switches (`norm_ratios`, `rank_embedding_units`, `calib_random`) for the ablation;
    none given is the default projection, calibrated on the study's own teacher data.
    """
    if init == "random":
        return None
    method, expert = init.split("-")
    out = cfg.work / "inits" / f"{init}-{_tag(prep.train_data, cfg.calib_samples, *sorted(fixes.items()))}"
    calib: dict[str, Any] = {"calib_samples": cfg.calib_samples}
    if not fixes.get("calib_random"):
        data, emb = LatentSet.load(prep.train_data), EmbeddingSet.load(prep.embeddings)
        rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: cfg.calib_samples]  # all prompts
        calib = {"calib_latents": data.take(rows)[:, :, 0], "calib_context": emb.context(data.prompt_index[rows])}
    project_student(prep.teacher, PRESET, out_dir=out, method=method, expert=expert, image_size=cfg.latent_size * 8,
                    **calib, **fixes)  # fmt: skip
    return str(out)


def run_one(prep: Prepared, cfg: StudyConfig, init: str, init_dir: str | None, seed: int) -> dict[str, Any]:
    """One distillation with the real trainer, then its held-out curve from the checkpoints it wrote."""
    knobs = (prep.train_data, init_dir, cfg.distill_steps, cfg.distill_batch, cfg.lr, cfg.eval_every)
    name = f"{init}-s{seed}-{_tag(*knobs)}"
    result = train(TrainConfig(
        teacher=str(prep.teacher), data=prep.train_data, embeddings=prep.embeddings, init=init_dir, preset=PRESET,
        out=prep.store_uri, run_name=name, steps=cfg.distill_steps, batch_size=cfg.distill_batch, lr=cfg.lr,
        warmup_steps=max(1, cfg.distill_steps // 20), ema_decay=0.0, checkpoint_every=cfg.eval_every,
        log_every=cfg.eval_every, seed=seed, mlflow_uri=f"sqlite:///{(cfg.work / 'mlflow.db').resolve()}",
        experiment="toyworld", resume=True, progress=False,
    ))  # fmt: skip
    return {"init": init, "seed": seed, "run": name, "student_uri": result["student_uri"],
            "curve": heldout_curve(prep, cfg, name, init_dir, seed)}  # fmt: skip


def heldout_curve(prep: Prepared, cfg: StudyConfig, name: str, init_dir: str | None, seed: int) -> dict[int, float]:
    """Held-out MSE of the init and of every checkpoint; cached, then all but the last checkpoint are pruned.

    A checkpoint carries the optimizer state (3x the student), so 40 of them per
    run x 21 runs would fill a laptop disk; the last one stays because
    `--resume` finds the finished run through it.
    """
    cache = cfg.work / "curves" / f"{name}.json"
    if cache.is_file():
        return {int(k): v for k, v in json.loads(cache.read_text()).items()}
    emb = EmbeddingSet.load(prep.embeddings)
    start = WanLiteStudent.from_pretrained(init_dir) if init_dir else _random_student(seed)
    curve = {0: prep.heldout.mse(start.eval(), emb)}
    store = Store.from_env(prep.store_uri)
    evaluated = []
    for step in range(cfg.eval_every, cfg.distill_steps + 1, cfg.eval_every):
        ckpt = store.local_dir(f"runs/{name}/checkpoints/step-{step:08d}", progress=False)
        curve[step] = prep.heldout.mse(student_from_checkpoint(ckpt), emb)
        evaluated.append(ckpt)
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps(curve))
    for ckpt in evaluated[:-1]:  # manifest first: a half-deleted checkpoint is never taken for a complete one
        (ckpt / "_MANIFEST.json").unlink()
        shutil.rmtree(ckpt)
    return curve


def _random_student(seed: int) -> WanLiteStudent:
    """The trainer's random init for this seed (it seeds torch with the run seed before building)."""
    torch.manual_seed(seed)
    return WanLiteStudent.from_arch(get_preset(PRESET).arch)


def score_run(prep: Prepared, cfg: StudyConfig, run: dict[str, Any]) -> dict[str, float]:
    """Sample the final student for the held-out prompts and seeds; score against the teacher's samples."""
    data, emb = LatentSet.load(prep.heldout_data), EmbeddingSet.load(prep.embeddings)
    student = WanLiteStudent.from_pretrained(local_path(run["student_uri"])).eval()
    seeds = [HELDOUT_SEED + i for i in range(len(data))]  # teacher-data's rule: sample i uses seed + i
    samples = sample_student(prep.teacher, student, emb, data.prompt_index, seeds, cfg.latent_size, cfg.sample_steps)
    return score_samples(prep.decoder, samples, data.prompt_index, data.latents)


def summarise(cfg: StudyConfig, prep: Prepared, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and spreads per init; steps to reach the random init's final held-out loss."""
    data, train_data = LatentSet.load(prep.heldout_data), LatentSet.load(prep.train_data)
    n = min(len(data), len(train_data))  # teacher vs teacher (other seeds): the Fréchet noise floor
    teacher_scores = score_samples(prep.decoder, train_data.take(torch.arange(n)), train_data.prompt_index[:n],
                                   data.latents)  # fmt: skip
    truth, truth_rows = prep.world.sample(len(data), torch.Generator().manual_seed(7))
    world_scores = score_samples(prep.decoder, truth, truth_rows, data.latents)
    random_final = [r["curve"][cfg.distill_steps] for r in runs if r["init"] == "random"]
    bar = statistics.median(random_final) if random_final else None
    table = {}
    for init in cfg.inits:
        mine = [r for r in runs if r["init"] == init]
        if not mine:
            continue
        reach = [_first_step_below(r["curve"], bar) for r in mine] if bar is not None else []
        reach_known = [s for s in reach if s is not None]
        row = {"final_mse": _spread([r["curve"][cfg.distill_steps] for r in mine]),
               "init_mse": _spread([r["curve"][0] for r in mine]),
               "steps_to_random_final": reach,
               "steps_to_random_final_median": statistics.median(reach_known) if reach and len(reach_known) == len(reach)
               else None}  # fmt: skip
        for key in mine[0]["scores"]:
            row[key] = _spread([r["scores"][key] for r in mine])
        table[init] = row
    return {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "timings": prep.timings, "teacher_samples": teacher_scores, "world_samples": world_scores,
            "random_final_mse": bar,
            "inits": table, "runs": runs}  # fmt: skip


def _tag(*values: Any) -> str:
    """A short content tag for a cached stage: change a knob and the stage is recomputed, not reused."""
    return hashlib.sha256(json.dumps([str(v) for v in values]).encode()).hexdigest()[:10]


def _first_step_below(curve: dict[int, float], bar: float) -> int | None:
    return next((step for step, mse in sorted(curve.items()) if mse <= bar), None)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def markdown_table(summary: dict[str, Any]) -> str:
    """Medians over seeds ([min, max] where there are several); attribute accuracy as colour/shape/size/all."""
    steps = summary["config"]["distill_steps"]
    header = (
        f"| init | held-out MSE at step 0 | at step {steps} | steps to random's final (per seed) "
        "| Fréchet to teacher | accuracy colour / shape / size / all |"
    )
    lines = [header, "|---|---:|---:|---|---:|---|"]
    for init, row in summary["inits"].items():
        reach = ["never" if r is None else str(r) for r in row["steps_to_random_final"]]
        median = row["steps_to_random_final_median"]
        lines.append(
            f"| {init} | {_cell(row['init_mse'])} | {_cell(row['final_mse'])} | "
            f"{'— (no random run)' if not reach else 'not all seeds' if median is None else median} {'[' + ', '.join(reach) + ']' if len(reach) > 1 else ''} | "
            f"{_cell(row['frechet'], '.0f')} | {_accuracy(row, 'median')} |"
        )
    t, w = summary["teacher_samples"], summary["world_samples"]
    lines.append(f"| teacher samples | | | | {t['frechet']:.0f} (other seeds) | {_accuracy(t)} |")
    lines.append(f"| rendered world | | | | {w['frechet']:.0f} | {_accuracy(w)} |")
    return "\n".join(lines)


def _cell(spread: dict[str, float], fmt: str = ".3f") -> str:
    if spread["min"] == spread["max"]:
        return format(spread["median"], fmt)
    return f"{spread['median']:{fmt}} [{spread['min']:{fmt}}, {spread['max']:{fmt}}]"


def _accuracy(scores: dict[str, Any], key: str | None = None) -> str:
    """'95 / 56 / 31 / 16' (per cent) from flat scores or from spreads (their `key`)."""
    names = ("acc_colour", "acc_shape", "acc_size", "acc_all")
    return " / ".join(f"{100 * (scores[n][key] if key else scores[n]):.0f}" for n in names)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Held-out velocity MSE against steps: median over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for init in summary["inits"]:
        curves = [r["curve"] for r in summary["runs"] if r["init"] == init]
        steps = sorted(int(s) for s in curves[0])
        values = torch.tensor([[c[s] for s in steps] for c in curves])
        ax.plot(steps, values.median(0).values, label=init, ls="--" if init == "random" else "-")
        ax.fill_between(steps, values.min(0).values, values.max(0).values, alpha=0.15)
    ax.set(xlabel="distillation step", ylabel="held-out velocity MSE", yscale="log", title="toyworld: init vs steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    prep = prepare(cfg)
    runs = []
    for init in cfg.inits:
        init_dir = make_init(prep, cfg, init)
        for seed in cfg.seeds:
            started = time.perf_counter()
            run = run_one(prep, cfg, init, init_dir, seed)
            run["scores"] = score_run(prep, cfg, run)
            run["wall_s"] = time.perf_counter() - started  # 0-ish for a run found finished
            log.info("%s: held-out MSE %s, scores %s", run["run"], run["curve"], run["scores"])
            runs.append(run)
    summary = summarise(cfg, prep, runs)
    (cfg.work / "results.json").write_text(json.dumps(summary, indent=1))
    (cfg.work / "results.md").write_text(markdown_table(summary) + "\n")
    plot(summary, cfg.work / "convergence.png")
    return summary


def parse_args(argv: list[str] | None = None) -> StudyConfig:
    defaults = StudyConfig()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.toyworld", description=__doc__.split("\n")[0])
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            kind = int if name == "seeds" else str
            parser.add_argument(
                flag, nargs="+", type=kind, default=value, help=f"(default: {' '.join(map(str, value))})"
            )
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"(default: {value})")
    args = vars(parser.parse_args(argv))
    bad = [i for i in args["inits"] if i not in INITS]
    if bad:
        parser.error(f"--inits: unknown {', '.join(bad)}; choose from {', '.join(INITS)}")
    return StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    summary = run_study(cfg)
    print(markdown_table(summary))
    print(f"results: {cfg.work / 'results.json'}, plot: {cfg.work / 'convergence.png'}")
    return 0
