"""The trainer on CPU: it learns, 1 and 2 processes agree, a SIGKILLed run resumes exactly, bad input is refused.

Two-process runs are real `torchrun` jobs (gloo); the killed run loses a rank
to SIGKILL after its first checkpoint, as a preempted node would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from diffusers import WanTransformer3DModel
from mlflow.tracking import MlflowClient
from PIL import Image

from wanlite.checkpoint.reader import TeacherReader
from wanlite.cli import main as cli
from wanlite.config import ConfigError
from wanlite.distill import objective
from wanlite.distill.checkpointing import checkpoint_key, latest_checkpoint, read_trainer_state
from wanlite.distill.data import EmbeddingSet, LatentSet
from wanlite.distill.launch import child_env, distill, torchrun_command
from wanlite.sampling import load_sampling, student_sampling
from wanlite.storage import Store
from wanlite.student import WanLiteStudent

from tests.fixtures.distill import read_run, run_config

RESUMABLE = dict(steps=4, checkpoint_every=2, batch_size=2)
"""Small enough for 2 cores, long enough that a kill after the first checkpoint lands mid-run."""


@pytest.fixture(scope="module")
def two_process_run(tiny_train_base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted 2-process torchrun run: the reference for both the 1-process and the resume tests."""
    cfg = run_config(tiny_train_base, tmp_path_factory.mktemp("two"), run_name="straight", **RESUMABLE)
    return distill(cfg, nproc=2)


@pytest.mark.slow
def test_loss_falls_and_the_run_is_published_and_tracked(
    tiny_train_base: Any, tiny_student_init: Path, tmp_path: Path, mlflow_server: str
) -> None:
    cfg = run_config(tiny_train_base, tmp_path, init=str(tiny_student_init), cfg=False, steps=12, batch_size=4,
                     lr=3e-3, warmup_steps=2, ema_decay=0.0, checkpoint_every=12, grid_every=12, grid_steps=2,
                     grid_prompts=1)  # fmt: skip
    result = distill(cfg)
    run = read_run(result)
    assert run.metrics["history"]["step"] == list(range(1, 13))
    losses = run.metrics["history"]["loss"]
    assert sum(losses[-4:]) < sum(losses[:4]), f"training loss did not fall: {losses}"
    before = _probe_loss(WanLiteStudent.from_pretrained(tiny_student_init), cfg)
    after = _probe_loss(WanLiteStudent.from_pretrained(run.folder), cfg)
    assert after < 0.8 * before, f"distillation loss on a fixed probe batch: {before:.4f} -> {after:.4f}"

    weights = run.folder / "diffusion_pytorch_model.safetensors"
    assert result["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert result["weights"] == "raw" and result["student_uri"].endswith(f"runs/{result['run']}/final")
    WanTransformer3DModel.from_pretrained(run.folder)  # stock diffusers loads the student too
    # --no-cfg: conditional targets, so the student records CFG; its steps are the grid's.
    assert load_sampling(run.folder) == student_sampling(guided=False, steps=2)

    client = MlflowClient(mlflow_server)
    tracked = client.get_run(result["mlflow_run_id"])
    assert {"loss", "loss_high", "loss_low", "lr", "grad_norm", "samples_per_s", "tokens_per_s"} <= set(
        tracked.data.metrics
    )
    assert tracked.data.params["lr"] == "0.003" and tracked.data.params["world_size"] == "1"
    assert len(client.get_metric_history(result["mlflow_run_id"], "loss")) == 12
    grids = [a.path for a in client.list_artifacts(result["mlflow_run_id"], "grids")]
    assert grids == ["grids/step-00000012.png"]
    local = Path(client.download_artifacts(result["mlflow_run_id"], grids[0], str(tmp_path)))
    with Image.open(local) as grid:
        assert grid.width >= 512, "large enough for a person to judge"


@torch.no_grad()
def _probe_loss(student: torch.nn.Module, cfg: Any) -> float:
    """Unguided distillation loss on 32 fixed (x0, sigma, eps) draws: what training should reduce."""
    reader = TeacherReader(cfg.teacher)
    high, low = (objective.Expert(reader.load_expert(e), 1.0) for e in ("high_noise_model", "low_noise_model"))
    data, emb = LatentSet.load(cfg.data), EmbeddingSet.load(cfg.embeddings)
    g = torch.Generator().manual_seed(123)
    rows = torch.randint(len(data), (32,), generator=g)
    sigma = objective.sample_sigmas(32, shift=cfg.shift, generator=g)
    x0, eps = data.latents[rows], torch.randn((32, *data.latent_shape), generator=g)
    x_t, t = objective.add_noise(x0, eps, sigma), objective.to_timestep(sigma)
    context = emb.context(data.prompt_index[rows])
    target = objective.teacher_targets(high, low, x_t, t, context, None, run_high=True, run_low=True)
    return float(objective.mse_per_sample(objective.predict(student, x_t, t, context), target.velocity).mean())


def test_a_teacher_equal_to_the_student_starts_at_zero_loss(
    tiny_train_base: Any, self_teacher: Path, tiny_student_init: Path, tmp_path: Path
) -> None:
    cfg = run_config(tiny_train_base, tmp_path, teacher=str(self_teacher), init=str(tiny_student_init), cfg=False,
                     steps=1, checkpoint_every=1)  # fmt: skip
    first_loss = read_run(distill(cfg)).metrics["history"]["loss"][0]
    assert first_loss < 1e-10


def test_every_loss_term_runs_under_fsdp_with_gradient_checkpointing(
    tiny_train_base: Any, tiny_projected_init: Path, tmp_path: Path
) -> None:
    cfg = run_config(tiny_train_base, tmp_path, steps=1, checkpoint_every=1, gt_weight=0.1, feature_weight=0.5,
                     grad_checkpointing=True, cfg=False, init=str(tiny_projected_init))  # fmt: skip
    m = distill(cfg)["metrics"]
    assert m["loss_feature"] > 0 and m["loss_gt"] > 0
    assert m["loss"] == pytest.approx(0.9 * m["loss_kd"] + 0.1 * m["loss_gt"] + 0.5 * m["loss_feature"], rel=1e-5)


def test_loss_terms_that_do_not_line_up_are_refused(tiny_train_base: Any, tmp_path: Path) -> None:
    """The ground-truth term is the unguided velocity: mixed into a guided (CFG-folded) objective it pulls the
    student between two targets. Feature KD needs the projection's block and channel map, which a random init
    does not have (and an init without a projection report does not say)."""
    with pytest.raises(ConfigError, match=r"gt_weight: 0.1 with guided targets \(cfg\)"):
        distill(run_config(tiny_train_base, tmp_path, gt_weight=0.1, cfg=True))
    with pytest.raises(ConfigError, match="feature_weight: expected --init, a projected student"):
        distill(run_config(tiny_train_base, tmp_path, feature_weight=0.5))


@pytest.mark.slow
def test_one_and_two_processes_follow_the_same_curve(
    two_process_run: dict[str, Any], tiny_train_base: Any, tmp_path: Path
) -> None:
    single = distill(run_config(tiny_train_base, tmp_path, run_name="single", **RESUMABLE), nproc=1)
    one, two = read_run(single), read_run(two_process_run)
    assert one.metrics["history"]["step"] == two.metrics["history"]["step"] == list(range(1, 5))
    torch.testing.assert_close(
        torch.tensor(one.metrics["history"]["loss"]), torch.tensor(two.metrics["history"]["loss"]), rtol=1e-4, atol=0
    )
    # Reduction order differs (one rank sums 2 samples; two ranks reduce-scatter), and Adam scales every
    # parameter's step to ~lr whatever its gradient's size, so near-zero gradients turn rounding noise into
    # weight differences of a small fraction of one step (lr = 2e-3): compare at that scale.
    for name, value in one.weights.items():
        torch.testing.assert_close(value, two.weights[name], rtol=0, atol=0.05 * tiny_train_base.lr, msg=name)


@pytest.mark.slow
def test_a_sigkilled_run_resumes_to_the_same_weights(
    two_process_run: dict[str, Any], tiny_train_base: Any, tmp_path: Path
) -> None:
    cfg = run_config(tiny_train_base, tmp_path, run_name="killed", **RESUMABLE)
    store = Store(cfg.out)
    first_checkpoint = Path(store._path(checkpoint_key("runs/killed", 2))) / "_MANIFEST.json"
    log_file = tmp_path / "torchrun.log"
    with open(log_file, "wb") as log:
        job = subprocess.Popen(torchrun_command(cfg, 2), env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
        try:
            while not first_checkpoint.exists():
                assert job.poll() is None, f"run ended before its first checkpoint:\n{log_file.read_text()[-3000:]}"
                time.sleep(0.005)
            os.kill(_rank_pid(job.pid, rank=1), signal.SIGKILL)
            assert job.wait(timeout=300) != 0
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    step, key = latest_checkpoint(store, "runs/killed")
    assert 2 <= step < RESUMABLE["steps"], "the kill must land mid-run"
    assert store.read_manifest("runs/killed/final") is None
    killed_mlflow_run = read_trainer_state(store, key)["mlflow_run_id"]

    resumed = distill(dataclasses.replace(cfg, resume=True), nproc=2)
    ours, reference = read_run(resumed), read_run(two_process_run)
    assert ours.metrics["history"] == reference.metrics["history"]
    for name, value in ours.weights.items():
        torch.testing.assert_close(value, reference.weights[name], rtol=0, atol=1e-6, msg=name)
    assert resumed["mlflow_run_id"] == killed_mlflow_run, "a resumed run continues its MLflow run"


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_checkpoint_every_rank_and_resume_after_a_kill(
    two_process_run: dict[str, Any], tiny_train_base: Any, tmp_path: Path
) -> None:
    """Two torchrun "nodes" on loopback (c10d rendezvous), each staging on its own folder; node 2's rank is killed."""
    cfg = run_config(tiny_train_base, tmp_path, run_name="two-nodes", **RESUMABLE)  # HSDP: the multi-node default
    store = Store(cfg.out)
    first = checkpoint_key("runs/two-nodes", 2)
    nodes = _start_nodes(cfg, tmp_path, "first")
    try:
        while store.read_manifest(first) is None:
            assert all(n.poll() is None for n in nodes), f"a node ended early:\n{_logs(tmp_path, 'first')}"
            time.sleep(0.005)
        os.kill(_rank_pid(nodes[1].pid, rank=1), signal.SIGKILL)
        assert all(n.wait(timeout=300) != 0 for n in nodes)
    finally:
        _stop(nodes)
    files = set(store.read_manifest(first).files)
    assert {"rng-rank00000.pt", "rng-rank00001.pt", ".metadata", "trainer_state.json"} <= files
    assert {"__0_0.distcp", "__1_0.distcp"} <= files, "every rank's DCP shards reach the store"
    assert store.read_manifest("runs/two-nodes/final") is None

    killed_launches = _launch_folders(tmp_path)  # what a killed launch leaves behind (documented)
    nodes = _start_nodes(dataclasses.replace(cfg, resume=True), tmp_path, "resume")
    try:
        assert [n.wait(timeout=600) for n in nodes] == [0, 0], _logs(tmp_path, "resume")
    finally:
        _stop(nodes)
    ours, reference = read_run(final_result_of(store, "two-nodes")), read_run(two_process_run)
    assert ours.metrics["history"] == reference.metrics["history"]
    for name, value in ours.weights.items():
        torch.testing.assert_close(value, reference.weights[name], rtol=0, atol=1e-6, msg=name)
    assert _launch_folders(tmp_path) == killed_launches, "the resumed launch removed its staging folders"


def _launch_folders(tmp_path: Path) -> set[Path]:
    return {p for node in (0, 1) for p in (tmp_path / f"node{node}" / "two-nodes").glob("*")}


def final_result_of(store: Store, run: str) -> dict[str, Any]:
    from wanlite.distill.train import final_result

    result = final_result(store, f"runs/{run}")
    assert result is not None
    return result


def _start_nodes(cfg: Any, tmp_path: Path, phase: str) -> list[subprocess.Popen]:
    """One torchrun per "node", each with its own staging folder, meeting at a c10d rendezvous on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for node in (0, 1):
        node_cfg = dataclasses.replace(cfg, staging_dir=str(tmp_path / f"node{node}"))
        command = torchrun_command(node_cfg, 1, nnodes=2, rendezvous=f"127.0.0.1:{port}")
        log = open(tmp_path / f"{phase}-node{node}.log", "wb")  # noqa: SIM115 (closed with the process)
        env = {**child_env(), "OMP_NUM_THREADS": "1"}  # what torchrun gives the 2-process reference's ranks
        nodes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))  # fmt: skip
    return nodes


def _stop(nodes: list[subprocess.Popen]) -> None:
    """Kill what is left of the nodes: torchrun and its workers (which run in sessions of their own)."""
    for node in nodes:
        if node.poll() is None:
            for worker in psutil.Process(node.pid).children(recursive=True):
                worker.kill()
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def _logs(tmp_path: Path, phase: str) -> str:
    return "\n".join((tmp_path / f"{phase}-node{n}.log").read_text()[-3000:] for n in (0, 1))


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_checkpoint_is_quarantined_and_the_run_resumes_from_the_last_good_one(
    tiny_train_base: Any, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = run_config(tiny_train_base, tmp_path, run_name="damaged", steps=2, checkpoint_every=1, cfg=False)
    reference = read_run(distill(cfg))
    store = Store(cfg.out)
    Path(store._path("runs/damaged/final/_MANIFEST.json")).unlink()  # as if killed after its last checkpoint
    victim = Path(store._path(checkpoint_key("runs/damaged", 2))) / "__0_0.distcp"
    good = victim.read_bytes()
    if damage == "truncated":
        victim.write_bytes(good[: len(good) // 2])
        reason = f"__0_0.distcp ({len(good) // 2} bytes, expected {len(good)})"
    else:
        middle = len(good) // 2
        victim.write_bytes(good[:middle] + bytes(b ^ 0xFF for b in good[middle : middle + 8]) + good[middle + 8 :])
        reason = "content does not match the manifest"

    with caplog.at_level(logging.WARNING, logger="wanlite.distill.checkpointing"):
        resumed = read_run(distill(dataclasses.replace(cfg, resume=True)))
    assert reason in caplog.text and "resuming from an older checkpoint" in caplog.text
    assert "interrupted" not in caplog.text
    quarantined = store.list("runs/damaged/quarantine")
    assert any(k.endswith("/__0_0.distcp") for k in quarantined)
    assert any(reason in store.get_bytes(k).decode() for k in quarantined if k.endswith("_QUARANTINE_REASON.txt"))
    assert store.read_manifest(checkpoint_key("runs/damaged", 2)) is not None, "step 2 written again"
    for name, value in resumed.weights.items():
        torch.testing.assert_close(value, reference.weights[name], rtol=0, atol=1e-6, msg=name)


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    """The worker process of one rank, found by the RANK variable torchrun gave it."""
    for child in psutil.Process(torchrun_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank-{rank} worker under torchrun {torchrun_pid}")


def test_resume_refuses_another_config_and_overwrites_nothing(tiny_train_base: Any, tmp_path: Path) -> None:
    cfg = run_config(tiny_train_base, tmp_path, run_name="once", steps=1, checkpoint_every=1, cfg=False)
    result = distill(cfg)
    store = Store(cfg.out)
    before = {key: store.get_bytes(key) for key in store.list("runs/once") if key.endswith("_MANIFEST.json")}

    with pytest.raises(ConfigError, match=r"--resume: .*step-00000001 was written by another config "
                                          r"\(lr: checkpoint 0.002, now 0.001\)"):  # fmt: skip
        distill(dataclasses.replace(cfg, resume=True, lr=1e-3))
    with pytest.raises(ConfigError, match=r"already exists; pass --resume"):
        distill(cfg)
    assert distill(dataclasses.replace(cfg, resume=True)) == result  # a finished run just reports its result
    after = {key: store.get_bytes(key) for key in store.list("runs/once") if key.endswith("_MANIFEST.json")}
    assert after == before


def test_a_batch_the_world_size_does_not_divide_is_refused_before_launch(
    tiny_train_base: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tiny_train_base
    status = cli(["distill", "--nproc", "2", "--batch-size", "3", "--teacher", base.teacher, "--data", base.data,
                  "--embeddings", base.embeddings, "--out", (tmp_path / "store").as_uri()])  # fmt: skip
    assert status == 2
    assert "batch_size: the global batch 3 is not divisible by --nproc 2" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
