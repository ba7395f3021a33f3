"""`wanlite distill-steps` on CPU: the sampler and the DMD maths, a tracked published run, exact resume (one node,
two nodes without a shared disk, past a damaged checkpoint), bad input."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import WanTransformer3DModel
from mlflow.tracking import MlflowClient

from wanlite.cli import main as cli
from wanlite.config import ConfigError, get_preset
from wanlite.distill.checkpointing import checkpoint_key, latest_checkpoint, read_trainer_state
from wanlite.distill.launch import child_env
from wanlite.distill.steps import (
    NonFiniteError,
    distill_steps,
    dmd_target,
    generator_x0,
    make_scheduler,
    sample,
    torchrun_command,
)
from wanlite.distill.steps_options import StepsConfig, schedule
from wanlite.distill.train import final_result
from wanlite.sampling import load_sampling
from wanlite.storage import Store
from wanlite.student import WanLiteStudent

from tests.fixtures.distill import read_run, run_config
from tests.test_distill import _launch_folders, _logs, _rank_pid, _stop

RESUMABLE = dict(steps=4, checkpoint_every=2)
"""Long enough that a kill after the first checkpoint lands mid-run."""


# --- the maths -------------------------------------------------------------------------------


def _cfg(**changes: Any) -> StepsConfig:
    return StepsConfig(teacher="t", student="s", embeddings="e", **changes)


def test_the_default_four_step_schedule_is_lightnings() -> None:
    sigmas = schedule(_cfg())
    torch.testing.assert_close(torch.tensor(sigmas) * 1000, torch.tensor([1000, 937.5, 833.3333, 625]))
    assert schedule(_cfg(sample_steps=1)) == (1.0,)
    assert schedule(_cfg(sample_steps=2, sigmas="1,0.5")) == (1.0, 0.5)
    scheduler = make_scheduler(sigmas)  # diffusers runs exactly these levels, then 0
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([*sigmas, 0.0]))
    torch.testing.assert_close(scheduler.timesteps, torch.tensor(sigmas) * 1000)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(sample_steps=3), r"sample_steps: expected one of 1, 2, 4, found 3"),
        (dict(sample_steps=2, sigmas="1,0.8,0.5"), r"sigmas: expected 2 values for sample_steps 2, found 3"),
        (dict(sample_steps=2, sigmas="0.9,0.5"), r"sigmas: expected decreasing values in \(0, 1\] starting at 1.0"),
        (dict(sample_steps=2, sigmas="1,x"), r"sigmas: expected comma-separated numbers"),
        (dict(schedule_shift=0.0), r"schedule_shift: expected a positive number"),
    ],
)
def test_schedules_the_sampler_cannot_run_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        schedule(_cfg(**changes))


@torch.no_grad()
def test_training_simulates_exactly_what_the_diffusers_sampler_runs() -> None:
    torch.manual_seed(0)
    model = WanLiteStudent.from_arch(get_preset("tiny").arch).eval()
    sigmas = schedule(_cfg())
    noise = torch.randn(2, 16, 1, 4, 4)
    context = torch.randn(2, 7, model.config.text_dim)
    final = generator_x0(model, torch.tensor([*sigmas, 0.0]), noise, context, stop=len(sigmas) - 1)
    torch.testing.assert_close(final, sample(model, sigmas, noise, context), rtol=1e-5, atol=1e-5)
    # and the first step alone is the one-step sample
    one = generator_x0(model, torch.tensor([1.0, 0.0]), noise, context, stop=0)
    torch.testing.assert_close(one, sample(model, (1.0,), noise, context), rtol=1e-5, atol=1e-5)


def test_the_generator_loss_pushes_samples_along_the_score_difference() -> None:
    g = torch.Generator().manual_seed(0)
    x0_g = torch.randn(3, 4, 1, 2, 2, generator=g, requires_grad=True)
    real, fake = torch.randn(3, 4, 1, 2, 2, generator=g), torch.randn(3, 4, 1, 2, 2, generator=g)
    target, grad_sq = dmd_target(x0_g, real, fake)
    (0.5 * (x0_g - target).pow(2).flatten(1).mean(1)).mean().backward()
    norm = (x0_g.detach() - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
    expected = (fake - real) / norm / (3 * 16)  # mean over 3 samples x 16 elements
    torch.testing.assert_close(x0_g.grad, expected)
    torch.testing.assert_close(grad_sq, ((fake - real) / norm).pow(2).flatten(1).mean(1))
    # when the fake score agrees with the real one there is nothing to match
    target, grad_sq = dmd_target(x0_g, real, real)
    torch.testing.assert_close(target, x0_g.detach())
    assert float(grad_sq.max()) == 0.0


# --- runs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_run(tiny_steps_base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted 2-process run: the reference of the resume test."""
    cfg = run_config(tiny_steps_base, tmp_path_factory.mktemp("steps-two"), run_name="straight", **RESUMABLE)
    return distill_steps(cfg, nproc=2)


def test_a_run_publishes_a_stock_few_step_student_with_its_schedule_and_is_tracked(
    tiny_steps_base: Any, tmp_path: Path, mlflow_server: str
) -> None:
    cfg = run_config(tiny_steps_base, tmp_path, grid_every=2, grid_prompts=1, grid_teacher_steps=2, ema_decay=0.0)
    result = distill_steps(cfg)
    run = read_run(result)
    assert run.metrics["history"]["step"] == [1, 2]
    sampling = load_sampling(run.folder)
    assert (sampling.steps, sampling.guidance, sampling.negative_prompt, sampling.sampler) == (4, 1.0, False, "euler")
    assert sampling.sigmas == schedule(cfg) and result["sampling"] == sampling.to_dict()
    stock = WanTransformer3DModel.from_pretrained(run.folder)  # stock diffusers loads the few-step student
    start = WanLiteStudent.from_pretrained(cfg.student).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in stock.state_dict().items()), "the generator never moved"

    client = MlflowClient(mlflow_server)
    tracked = client.get_run(result["mlflow_run_id"])
    assert {"loss_generator", "loss_critic", "dmd_grad_sq", "grad_norm_generator", "grad_norm_critic", "lr"} <= set(
        tracked.data.metrics
    )
    assert tracked.data.params["sample_steps"] == "4" and tracked.data.params["critic_updates"] == "2"
    assert [a.path for a in client.list_artifacts(result["mlflow_run_id"], "grids")] == ["grids/step-00000002.png"]


@pytest.mark.slow
def test_a_sigkilled_run_resumes_to_the_same_weights(
    two_process_run: dict[str, Any], tiny_steps_base: Any, tmp_path: Path
) -> None:
    cfg = run_config(tiny_steps_base, tmp_path, run_name="killed", **RESUMABLE)
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

    resumed = distill_steps(dataclasses.replace(cfg, resume=True), nproc=2)
    ours, reference = read_run(resumed), read_run(two_process_run)
    assert ours.metrics["history"] == reference.metrics["history"]
    for name, value in ours.weights.items():
        torch.testing.assert_close(value, reference.weights[name], rtol=0, atol=1e-6, msg=name)
    assert resumed["mlflow_run_id"] == killed_mlflow_run, "a resumed run continues its MLflow run"


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_checkpoint_every_rank_and_resume_after_a_kill(
    two_process_run: dict[str, Any], tiny_steps_base: Any, tmp_path: Path
) -> None:
    """Two torchrun "nodes" on loopback (HSDP, the multi-node default), each staging in its own folder."""
    cfg = run_config(tiny_steps_base, tmp_path, run_name="two-nodes", **RESUMABLE)
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

    killed_launches = _launch_folders(tmp_path)
    nodes = _start_nodes(dataclasses.replace(cfg, resume=True), tmp_path, "resume")
    try:
        assert [n.wait(timeout=600) for n in nodes] == [0, 0], _logs(tmp_path, "resume")
    finally:
        _stop(nodes)
    result = final_result(store, "runs/two-nodes")
    assert result is not None
    ours, reference = read_run(result), read_run(two_process_run)
    # HSDP reduces gradients in another order than the reference's one-node FSDP: the losses agree to float32
    # rounding and Adam turns the rounding into weight differences of a small fraction of one step (lr = 1e-3;
    # measured: 5e-6). Exactness of the resume itself is the one-node test's (there the weights are equal).
    history, expected = ours.metrics["history"], reference.metrics["history"]
    assert history["step"] == expected["step"]
    for key in ("loss_generator", "loss_critic"):
        assert history[key] == pytest.approx(expected[key], rel=1e-5), key
    for name, value in ours.weights.items():
        torch.testing.assert_close(value, reference.weights[name], rtol=0, atol=0.05 * cfg.lr, msg=name)
    assert _launch_folders(tmp_path) == killed_launches, "the resumed launch removed its staging folders"


def _start_nodes(cfg: StepsConfig, tmp_path: Path, phase: str) -> list[subprocess.Popen]:
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


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_checkpoint_is_quarantined_and_the_run_resumes_from_the_last_good_one(
    tiny_steps_base: Any, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = run_config(tiny_steps_base, tmp_path, run_name="damaged", steps=2, critic_updates=1, checkpoint_every=1)
    reference = read_run(distill_steps(cfg))
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
        resumed = read_run(distill_steps(dataclasses.replace(cfg, resume=True)))
    assert reason in caplog.text and "resuming from an older checkpoint" in caplog.text
    quarantined = store.list("runs/damaged/quarantine")
    assert any(k.endswith("/__0_0.distcp") for k in quarantined)
    assert any(reason in store.get_bytes(k).decode() for k in quarantined if k.endswith("_QUARANTINE_REASON.txt"))
    assert store.read_manifest(checkpoint_key("runs/damaged", 2)) is not None, "step 2 written again"
    assert resumed.metrics["history"] == reference.metrics["history"]
    for name, value in resumed.weights.items():
        torch.testing.assert_close(value, reference.weights[name], rtol=0, atol=1e-6, msg=name)


# --- bad input -----------------------------------------------------------------------------------


def test_an_unsupported_k_is_refused_before_anything_is_written(
    tiny_steps_base: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tiny_steps_base
    status = cli(["distill-steps", "--sample-steps", "3", "--teacher", base.teacher, "--student", base.student,
                  "--embeddings", base.embeddings, "--out", (tmp_path / "store").as_uri()])  # fmt: skip
    assert status == 2
    assert "sample_steps: expected one of 1, 2, 4, found 3" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_a_run_spec_with_an_unsupported_k_is_refused_before_any_step() -> None:
    from wanlite import dag

    with pytest.raises(ConfigError, match=r"few_steps: expected one of 1, 2, 4, found 3"):
        dag.RunSpec(few_steps=3).resolved()


def test_a_critic_of_another_architecture_is_refused(tiny_steps_base: Any, tmp_path: Path) -> None:
    other = tmp_path / "critic"
    WanLiteStudent.from_arch(get_preset("tiny").arch.replace(num_layers=3)).save_pretrained(other)
    cfg = run_config(tiny_steps_base, tmp_path, critic=str(other))
    with pytest.raises(ConfigError, match=r"critic .*critic: expected the architecture of student .*num_layers: "
                                          r"student 2, critic 3"):  # fmt: skip
        distill_steps(cfg)
    assert not Store(cfg.out).exists("runs")


def test_resume_with_another_k_or_schedule_is_refused_and_overwrites_nothing(
    tiny_steps_base: Any, tmp_path: Path
) -> None:
    cfg = run_config(tiny_steps_base, tmp_path, run_name="once", steps=1)
    result = distill_steps(cfg)
    store = Store(cfg.out)
    before = {key: store.get_bytes(key) for key in store.list("runs/once") if key.endswith("_MANIFEST.json")}

    differ = r"\(sample_steps: checkpoint 4, now 2; schedule: checkpoint \[1.0, "
    with pytest.raises(ConfigError, match=r"--resume: .*step-00000001 was written by another config " + differ):
        distill_steps(dataclasses.replace(cfg, resume=True, sample_steps=2))
    with pytest.raises(ConfigError, match=r"another config \(schedule: checkpoint \[1.0, 0.9375, .*now \[1.0, 0.9, "):
        distill_steps(dataclasses.replace(cfg, resume=True, sigmas="1,0.9,0.8,0.7"))
    assert distill_steps(dataclasses.replace(cfg, resume=True)) == result  # a finished run reports its result
    after = {key: store.get_bytes(key) for key in store.list("runs/once") if key.endswith("_MANIFEST.json")}
    assert after == before


def test_a_non_finite_loss_stops_the_run_and_publishes_nothing(tiny_steps_base: Any, tmp_path: Path) -> None:
    # A learning rate this large overflows the weights on the first update: the next loss is not finite.
    cfg = run_config(tiny_steps_base, tmp_path, run_name="diverged", steps=2, checkpoint_every=2, lr=1e30,
                     critic_lr=1e30, grad_clip=0.0)  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"run diverged, step 1: the (critic|generator) loss is (nan|inf)"):
        distill_steps(cfg)
    store = Store(cfg.out)
    assert latest_checkpoint(store, "runs/diverged") is None and store.read_manifest("runs/diverged/final") is None


def test_non_finite_final_weights_are_not_published(
    tiny_steps_base: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last generator step overflows (its loss, computed before the step, was finite): simulated by
    # poisoning one generator weight right after that step is applied.
    from wanlite.distill import steps as steps_module

    apply = steps_module._Run._apply

    def overflowing(self: Any, p: Any, model: torch.nn.Module) -> float:
        norm = apply(self, p, model)
        if model is p.generator:
            with torch.no_grad():
                next(iter(model.parameters())).fill_(float("inf"))
        return norm

    monkeypatch.setattr(steps_module._Run, "_apply", overflowing)
    cfg = run_config(tiny_steps_base, tmp_path, run_name="overflow", steps=1, critic_updates=1, ema_decay=0.0)
    with pytest.raises(NonFiniteError, match=r"run overflow: the final generator weights are not finite \("):
        distill_steps(cfg)
    assert Store(cfg.out).read_manifest("runs/overflow/final") is None


def test_the_command_documents_the_stage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli(["distill-steps", "--help"])
    text = capsys.readouterr().out
    assert "DMD2" in text and "--sample-steps" in text and "--critic-updates" in text and "--sigmas" in text


# --- the DAG -------------------------------------------------------------------------------------


def test_the_dag_trains_and_exports_the_few_step_student_under_its_own_names(
    tiny_teacher: Path, tiny_student_init: Path, tiny_embeddings: dict[str, Any], mlflow_server: str, tmp_path: Path
) -> None:
    from wanlite import dag

    store = (tmp_path / "store").as_uri()
    result = dag.distill_steps(
        teacher_uri=str(tiny_teacher), student_uri=str(tiny_student_init), embeddings_uri=tiny_embeddings["uri"],
        store=store, tracking_uri=mlflow_server, preset="tiny", few_steps=2, steps=1, critic_updates=1,
        batch_size=2, lr=1e-5, checkpoint_every=1, nproc=1,
    )  # fmt: skip
    assert result["sampling"]["steps"] == 2 and result["sampling"]["guidance"] == 1.0
    again = dag.distill_steps(
        teacher_uri=str(tiny_teacher), student_uri=str(tiny_student_init), embeddings_uri=tiny_embeddings["uri"],
        store=store, tracking_uri=mlflow_server, preset="tiny", few_steps=2, steps=1, critic_updates=1,
        batch_size=2, lr=1e-5, checkpoint_every=1, nproc=1,
    )  # fmt: skip
    assert again == result, "a finished few-step run is found, not retrained"
    exported = dag.export(result["student_uri"], store)
    assert exported["file"] == "wanlite-tiny-2step.safetensors"  # beside wanlite-tiny.safetensors in ComfyUI

    spec = dag.RunSpec(store=store, tracking_uri=mlflow_server, few_steps=2).resolved()
    outputs = {
        "fetch": {"uri": "t", "teacher_sha256": "s"},
        "encode-prompts": {"uri": "e"},
        "teacher-data": {"uri": "d", "digest": "d"},
        "train": {"student_uri": "the 40-step student"},
        **{k: {"uri": k} for k in ("evaluate-few-step", "round-trip-few-step", "export-few-step")},
        "distill-steps": result,
    }
    wired = dag.wire("register-few-step", spec, outputs)
    assert wired["name"] == "wanlite-tiny-2step" and wired["student_uri"] == result["student_uri"]
    assert (wired["export_uri"], wired["eval_uri"]) == ("export-few-step", "evaluate-few-step")
