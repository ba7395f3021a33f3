"""Fault suite: bad inputs and injected faults against the real `wanlite` CLI on a tiny synthetic teacher.

Every bad input is one `wanlite` command line (run in this process) fed one
thing a hostile or unlucky user would give it; it is counted as

- rejected cleanly: exit status 1 or 2, the last stderr line says
  `wanlite COMMAND: error: ...` (or `validate` printed its report), no
  traceback, nothing published in the case's store;
- accepted: exit status 0;
- rejected badly: anything else (a traceback, a vague exit, junk published).

Every fault is injected into a working system (a full disk during a fetch, a
bit flipped in the source or in the store, a diverging run, a NaN teacher,
processes racing on a fresh MLflow database, a dead MLflow server) and counts
as survived when the damage is refused or repaired and nothing wrong is
published. At the end every artifact published before the faults is
downloaded again with its sha256 verified: "artifacts lost" counts the ones
that fail. A password planted in the tracking URIs must appear in no output,
log line or store file ("secrets leaked").

    .venv/bin/python benchmarks/faults.py [--workdir DIR] [--json results.json] [--only TEXT ...]

Not a test: the same cases are tests in tests/test_reliability.py and
tests/test_fetch.py; this counts them in one place for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECRET = "hunter2-S3CRET"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Tally:
    inputs: dict[str, str] = field(default_factory=dict)  # case -> clean / accepted / bad: why
    messages: dict[str, str] = field(default_factory=dict)  # case -> the last line the user saw
    faults: dict[str, str] = field(default_factory=dict)  # fault -> survived / failed: why
    lost: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)


def cli(argv: list[str]) -> tuple[int, str, str]:
    """Run `wanlite ARGV` in this process; (status, stdout, stderr)."""
    from wanlite.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exit_:  # argparse
            status = exit_.code if isinstance(exit_.code, int) else 2
        except Exception:  # escaped the CLI: what a user sees as a traceback
            traceback.print_exc()
            status = -1
    return status, out.getvalue(), err.getvalue()


def manifests(root: Path) -> list[Path]:
    return sorted(root.rglob("_MANIFEST.json")) if root.exists() else []


def judge(argv: list[str], store: Path | None, names: str | None) -> tuple[str, str]:
    """(outcome, the last stderr line) of one bad input; `names`: what the message must mention."""
    status, out, err = cli(argv)
    last = ([line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1:] or [""])[0][:300]
    if SECRET in out + err:
        return "bad: the password appears in the output", last
    if status == 0:
        return "accepted", last
    if "Traceback" in err or status not in (1, 2):
        return ("bad: traceback" if "Traceback" in err else f"bad: status {status}"), last
    if store is not None and manifests(store):
        return "bad: published despite the error", last
    if argv[0] != "validate" and not last.startswith(f"wanlite {argv[0]}: error: "):
        return "bad: unclear message", last
    if names is not None and names not in last:
        return f"bad: the message does not name {names}", last
    return "clean", last


NAMED = {
    "fetch: symlink to /etc/passwd": "notes.md",
    "fetch: symlinked folder outside": "extra",
    "teacher-data: corrupt PNG": "a.png",
    "teacher-data: decompression bomb": "a.png",
    "teacher-data: non-UTF-8 caption": "a.txt",
    "project: I32 weight": "blocks.0.ffn.0.weight",
    "project: overlapping offsets": "diffusion_pytorch_model-",
    "project: offsets past the end": "diffusion_pytorch_model-",
    "encode-prompts: no tokenizer": "umt5-xxl",
    "export: NaN weights": "head.head.weight",
    "evaluate: NaN weights": "proj_out",
    "download: MLflow server unreachable": "unreachable",
    "distill: MLflow server unreachable": "unreachable",
}
"""Cases whose message must name the file, tensor or cause (a bare "invalid value" does not say which)."""


def dead_tracking_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://wanlite:{SECRET}@127.0.0.1:{port}"


# --- setup ------------------------------------------------------------------------------------


@dataclass
class World:
    work: Path
    teacher: Path
    store: Path  # the good store: every artifact in it must survive the suite
    embeddings: str
    data: str
    student: Path

    def fresh(self, name: str) -> Path:
        path = self.work / "cases" / name
        path.mkdir(parents=True)
        return path


def build_world(work: Path) -> World:
    from wanlite.checkpoint.fetch import fetch_teacher
    from wanlite.config import get_preset
    from wanlite.distill.encode import encode_prompts
    from wanlite.distill.teacher_data import teacher_data
    from wanlite.storage import Store
    from wanlite.student import WanLiteStudent

    teacher = work / "teacher"
    assert cli(["synth-teacher", str(teacher), "--size", "tiny"])[0] == 0
    store = Store((work / "store").as_uri())
    fetch_teacher(str(teacher), store, progress=False)
    emb = encode_prompts(teacher, ["a red cube", "a blue sphere"], store.root, progress=False)
    data = teacher_data(teacher, emb["uri"], store.root, image_size=32, steps=1, shard_size=2, batch_size=2,
                        progress=False)  # fmt: skip
    student = work / "student"
    WanLiteStudent.from_arch(get_preset("tiny").arch).save_pretrained(student)
    return World(work, teacher, work / "store", emb["uri"], data["uri"], student)


# --- bad inputs ---------------------------------------------------------------------------------


def bad_inputs(w: World) -> dict[str, Callable[[], tuple[list[str], Path | None]]]:
    """case -> a function preparing the bad input and returning (argv, the store that must stay empty)."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file

    def copy_teacher(name: str) -> tuple[Path, Path]:
        case = w.fresh(name)
        return Path(shutil.copytree(w.teacher, case / "teacher")), case

    def fetch_with_link(target: Path, folder: bool) -> Callable[[], tuple[list[str], Path]]:
        def prepare() -> tuple[list[str], Path]:
            root, case = copy_teacher(f"fetch-link-{'dir' if folder else 'file'}")
            (root / ("extra" if folder else "notes.md")).symlink_to(target, target_is_directory=folder)
            return ["fetch", str(root), "--store", (case / "store").as_uri(), "--no-progress"], case / "store"

        return prepare

    def weight_map(name: str, shard: Callable[[Path], str]) -> Callable[[], tuple[list[str], None]]:
        def prepare() -> tuple[list[str], None]:
            root, _ = copy_teacher(name)
            index_path = root / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json"
            index = json.loads(index_path.read_text())
            first = sorted(set(index["weight_map"].values()))[0]
            target = shard(root)  # the real shard is moved there: reading it would "work"
            shutil.move(index_path.parent / first, (index_path.parent / target).resolve())
            index["weight_map"] = {k: target if v == first else v for k, v in index["weight_map"].items()}
            index_path.write_text(json.dumps(index))
            return ["validate", str(root)], None

        return prepare

    def teacher_data_case(name: str, flags: list[str], images: Callable[[Path], None] | None = None):
        def prepare() -> tuple[list[str], Path]:
            case = w.fresh(name)
            argv = ["teacher-data", "--teacher", str(w.teacher), "--embeddings", w.embeddings,
                    "--out", (case / "store").as_uri(), "--image-size", "32", "--steps", "1", *flags]  # fmt: skip
            if images is not None:
                folder = case / "images"
                folder.mkdir()
                Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / "a.png")
                (folder / "a.txt").write_text("a red cube")
                images(folder)
                argv += ["--images", str(folder), "--no-teacher-samples"]
            return argv, case / "store"

        return prepare

    def corrupt_png(folder: Path) -> None:
        data = (folder / "a.png").read_bytes()
        (folder / "a.png").write_bytes(data[:50] + bytes(len(data) - 50))

    def bomb(folder: Path) -> None:
        Image.new("1", (20000, 20000)).save(folder / "a.png")  # 4e8 pixels, about 60 kB on disk

    def latin1(folder: Path) -> None:
        (folder / "a.txt").write_bytes(b"caf\xe9")

    def distill(name: str, flags: list[str]) -> Callable[[], tuple[list[str], Path]]:
        def prepare() -> tuple[list[str], Path]:
            case = w.fresh(name)
            argv = ["distill", "--teacher", str(w.teacher), "--data", w.data, "--embeddings", w.embeddings,
                    "--out", (case / "store").as_uri(), "--steps", "2", "--batch-size", "2", "--no-progress",
                    "--mlflow-uri", f"sqlite:///{case / 'mlflow.db'}", *flags]  # fmt: skip
            return argv, case / "store"

        return prepare

    def project_shard(name: str, damage: str) -> Callable[[], tuple[list[str], Path]]:
        def prepare() -> tuple[list[str], Path]:
            root, case = copy_teacher(name)
            index_file = root / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json"
            index = json.loads(index_file.read_text())
            tensor = "blocks.0.ffn.0.weight"
            shard = root / "high_noise_model" / index["weight_map"][tensor]
            if damage == "int32":
                tensors = load_file(shard)
                tensors[tensor] = tensors[tensor].to(torch.int32)
                save_file(tensors, shard)
            else:
                raw = shard.read_bytes()
                n = int.from_bytes(raw[:8], "little")
                header = json.loads(raw[8 : 8 + n])
                header.pop("__metadata__", None)
                start, end = header[tensor]["data_offsets"]
                header[tensor]["data_offsets"] = [0, end - start] if damage == "overlap" else [start, end + 10**12]
                text = json.dumps(header, separators=(",", ":")).encode()
                shard.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n :])
            out = case / "student"
            return ["project", "--teacher", str(root), "--calib-samples", "1", "--out", str(out)], out

        return prepare

    def nan_student() -> Path:
        folder = w.work / "nan-student"
        if not folder.exists():
            shutil.copytree(w.student, folder)
            weights = folder / "diffusion_pytorch_model.safetensors"
            tensors = load_file(weights)
            tensors["proj_out.weight"][0, 0] = float("nan")
            save_file(tensors, weights)
        return folder

    def simple(argv: Callable[[Path], list[str]], store: bool = False) -> Callable[[], tuple[list[str], Path | None]]:
        def prepare() -> tuple[list[str], Path | None]:
            case = w.fresh(f"simple-{len(list((w.work / 'cases').glob('simple-*')))}")
            return argv(case), (case / "store" if store else None)

        return prepare

    def no_tokenizer() -> tuple[list[str], Path]:
        root, case = copy_teacher("no-tokenizer")
        shutil.rmtree(root / "google" / "umt5-xxl")
        (case / "p.txt").write_text("a red cube\n")
        return ["encode-prompts", "--teacher", str(root), "--prompts", str(case / "p.txt"),
                "--out", (case / "store").as_uri()], case / "store"  # fmt: skip

    return {
        "fetch: symlink to /etc/passwd": fetch_with_link(Path("/etc/passwd"), folder=False),
        "fetch: symlinked folder outside": fetch_with_link(Path("/etc"), folder=True),
        "fetch: no such directory": simple(lambda c: ["fetch", str(c / "absent"), "--store", (c / "store").as_uri()],
                                           store=True),  # fmt: skip
        "validate: weight_map ../": weight_map("wm-parent", lambda root: "../../x.safetensors"),
        "validate: weight_map absolute": weight_map("wm-absolute", lambda root: str(root.parent / "abs.safetensors")),
        "teacher-data: --image-size 0": teacher_data_case("td-size", ["--image-size", "0"]),
        "teacher-data: --image-size 30": teacher_data_case("td-size30", ["--image-size", "30"]),
        "teacher-data: --shift -3": teacher_data_case("td-shift", ["--shift", "-3"]),
        "teacher-data: --guidance-high nan": teacher_data_case("td-guidance", ["--guidance-high", "nan"]),
        "teacher-data: --steps 0": teacher_data_case("td-steps", ["--steps", "0"]),
        "teacher-data: corrupt PNG": teacher_data_case("td-corrupt", [], corrupt_png),
        "teacher-data: decompression bomb": teacher_data_case("td-bomb", [], bomb),
        "teacher-data: non-UTF-8 caption": teacher_data_case("td-latin1", [], latin1),
        "teacher-data: images folder missing": simple(
            lambda c: ["teacher-data", "--teacher", str(w.teacher), "--embeddings", w.embeddings, "--out",
                       (c / "store").as_uri(), "--images", str(c / "absent"), "--image-size", "32"],
            store=True,
        ),
        "distill: --lr nan": distill("d-lr-nan", ["--lr", "nan"]),
        "distill: --lr 0": distill("d-lr0", ["--lr", "0"]),
        "distill: --shift -1": distill("d-shift", ["--shift", "-1"]),
        "distill: --ema-decay 1.5": distill("d-ema", ["--ema-decay", "1.5"]),
        "distill: --min-lr-ratio 2": distill("d-minlr", ["--min-lr-ratio", "2"]),
        "distill: --steps 0": distill("d-steps", ["--steps", "0"]),
        "distill: --guidance-low inf": distill("d-guid", ["--guidance-low", "inf"]),
        "distill: --batch-size 3 --nproc 2": distill("d-nproc", ["--batch-size", "3", "--nproc", "2"]),
        "project: I32 weight": project_shard("p-int", "int32"),
        "project: overlapping offsets": project_shard("p-overlap", "overlap"),
        "project: offsets past the end": project_shard("p-huge", "huge"),
        "project: --calib-data not safetensors": simple(
            lambda c: (c / "calib.safetensors").write_bytes(b"PK\x03\x04zip")
            and ["project", "--teacher", str(w.teacher), "--calib-data", str(c / "calib.safetensors"),
                 "--out", str(c / "store")], store=True),  # fmt: skip
        "encode-prompts: no tokenizer": no_tokenizer,
        "export: NaN weights": simple(lambda c: ["export", str(nan_student()), "--out", (c / "store").as_uri()],
                                      store=True),  # fmt: skip
        "evaluate: NaN weights": simple(
            lambda c: ["evaluate", "--student", str(nan_student()), "--teacher", str(w.teacher),
                       "--out", (c / "store").as_uri(), "--steps", "1", "--num-prompts", "1"], store=True),  # fmt: skip
        "evaluate: --size 0": simple(
            lambda c: ["evaluate", "--student", str(w.student), "--teacher", str(w.teacher),
                       "--out", (c / "store").as_uri(), "--size", "0"], store=True),  # fmt: skip
        "generate: file:// URI without a manifest": simple(
            lambda c: ["generate", f"file://{w.student}", "--teacher", str(w.teacher), "--prompt", "x",
                       "--out", str(c / "x.png")]),  # fmt: skip
        "download: not a models:/ URI": simple(
            lambda c: (c / "ComfyUI" / "models").mkdir(parents=True) or (c / "ComfyUI" / "main.py").touch()
            or ["download", "runs:/abc/model", "--comfyui", str(c / "ComfyUI"), "--tracking-uri", dead_tracking_uri()]),
        "download: MLflow server unreachable": simple(
            lambda c: (c / "ComfyUI" / "models").mkdir(parents=True) or (c / "ComfyUI" / "main.py").touch()
            or ["download", "models:/wanlite-tiny@champion", "--comfyui", str(c / "ComfyUI"),
                "--tracking-uri", dead_tracking_uri()]),  # fmt: skip
        "distill: MLflow server unreachable": distill("d-dead", ["--mlflow-uri", dead_tracking_uri()]),
    }


# --- faults ------------------------------------------------------------------------------------


def _flip(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def faults(w: World) -> dict[str, Callable[[], str]]:
    """fault -> a function injecting it and returning "survived" or "failed: why"."""
    from wanlite.checkpoint.fetch import fetch_teacher
    from wanlite.storage import Store, StoreError

    def disk_full_during_fetch() -> str:
        case = w.fresh("disk-full")
        store = Store((case / "store").as_uri())
        limit = 5 * 2**20  # the tiny teacher's 8 MB shards cross it: EFBIG, as on a full disk

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        child = subprocess.run([sys.executable, "-m", "wanlite.cli", "fetch", str(w.teacher), "--store", store.root,
                                "--no-progress"], preexec_fn=cap, capture_output=True, text=True, cwd=REPO)  # fmt: skip
        if child.returncode == 0:
            return "failed: the capped fetch did not fail (limit too high?)"
        if any(store.read_manifest(k) for k in ("teachers",)) or manifests(case / "store"):
            return "failed: a manifest was published by the interrupted fetch"
        report = fetch_teacher(str(w.teacher), store, progress=False)
        store.get_dir(report["key"], case / "back", progress=False)  # sha256-verified
        return "survived" if report["resumed_files"] > 0 else "survived (nothing to resume)"

    def flipped_source_first() -> str:
        case = w.fresh("flipped-source")
        bad = Path(shutil.copytree(w.teacher, case / "bad"))
        _flip(next(bad.glob("high_noise_model/*.safetensors")))
        store = Store((case / "store").as_uri())
        first = fetch_teacher(str(bad), store, progress=False)
        good = fetch_teacher(str(w.teacher), store, progress=False)
        if first["key"] == good["key"] or good["skipped"]:
            return "failed: the damaged copy shadows the good checkpoint"
        store.get_dir(good["key"], case / "back", progress=False)
        return "survived"

    def flipped_store_object() -> str:
        case = w.fresh("flipped-store")
        store = Store((case / "store").as_uri())
        key = fetch_teacher(str(w.teacher), store, progress=False)["key"]
        _flip(next((case / "store" / key).glob("high_noise_model/*.safetensors")))
        try:
            store.get_dir(key, case / "back", progress=False)
        except StoreError as err:
            return "survived" if "does not match the manifest" in str(err) else f"failed: {err}"
        return "failed: damaged object read back without complaint"

    def diverging_run() -> str:
        case = w.fresh("diverging")
        tracking = f"sqlite:///{case / 'mlflow.db'}"
        status, out, err = cli(["distill", "--teacher", str(w.teacher), "--data", w.data, "--embeddings",
                                w.embeddings, "--out", (case / "store").as_uri(), "--steps", "6", "--batch-size", "2",
                                "--lr", "1e9", "--warmup-steps", "0", "--checkpoint-every", "1", "--no-progress",
                                "--run-name", "boom", "--mlflow-uri", tracking])  # fmt: skip
        if status != 2 or "non-finite" not in err:
            return f"failed: status {status}: {err.strip()[-200:]}"
        bad_step = int(err.split("step ")[1].split(":")[0])
        store = Store((case / "store").as_uri())
        if store.read_manifest("runs/boom/final") is not None:
            return "failed: a final student was published"
        steps = [int(k.split("step-")[1][:8]) for k in store.list("runs/boom") if k.endswith("_MANIFEST.json")]
        if any(s >= bad_step for s in steps):
            return f"failed: a checkpoint of step {max(steps)} >= the failing step {bad_step}"
        from mlflow import MlflowClient

        runs = MlflowClient(tracking).search_runs([MlflowClient(tracking).get_experiment_by_name("wanlite-distill")
                                                   .experiment_id])  # fmt: skip
        return "survived" if [r.info.status for r in runs] == ["FAILED"] else "failed: MLflow run not FAILED"

    def nan_teacher() -> str:
        import torch
        from safetensors.torch import load_file, save_file

        case = w.fresh("nan-teacher")
        root = Path(shutil.copytree(w.teacher, case / "teacher"))
        for expert in ("high_noise_model", "low_noise_model"):
            index = json.loads((root / expert / "diffusion_pytorch_model.safetensors.index.json").read_text())
            shard = root / expert / index["weight_map"]["head.head.weight"]
            tensors = load_file(shard)
            tensors["head.head.weight"] = torch.full_like(tensors["head.head.weight"], float("nan"))
            save_file(tensors, shard)
        status, _, err = cli(["teacher-data", "--teacher", str(root), "--embeddings", w.embeddings,
                              "--out", (case / "store").as_uri(), "--image-size", "32", "--steps", "1"])  # fmt: skip
        if status != 2 or "non-finite" not in err:
            return f"failed: status {status}: {err.strip()[-200:]}"
        return "failed: latents published" if manifests(case / "store") else "survived"

    def racing_demos() -> str:
        case = w.fresh("race")
        racer = (
            "import sys, time\nfrom pathlib import Path\nfrom wanlite.commands.demo import prepare_mlflow\n"
            "d = Path(sys.argv[1]); (d / f'ready-{sys.argv[2]}').touch()\n"
            "while not (d / 'go').exists(): time.sleep(0.01)\n"
            "prepare_mlflow(f'sqlite:///{d / \"mlflow.db\"}', d / 'mlartifacts')\n"
        )
        procs = [subprocess.Popen([sys.executable, "-c", racer, str(case), str(i)], cwd=REPO,
                                  stderr=subprocess.PIPE, text=True) for i in range(3)]  # fmt: skip
        while len(list(case.glob("ready-*"))) < len(procs) and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        (case / "go").touch()
        errors = [p.communicate()[1] for p in procs]
        failed = [e.strip().splitlines()[-1] for p, e in zip(procs, errors, strict=True) if p.returncode != 0]
        return f"failed: {failed[0][:150]}" if failed else "survived"

    def escaping_upload() -> str:
        case = w.fresh("escaping-upload")
        folder = Path(shutil.copytree(w.student, case / "student"))
        key = case / "id_rsa"  # outside the folder, like ~/.ssh/id_rsa
        key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
        (folder / "id_rsa").symlink_to(key)
        store = Store((case / "store").as_uri())
        try:
            store.put_dir(folder, "students/x", progress=False)
        except StoreError:
            return "failed: published" if manifests(case / "store") else "survived"
        return "failed: the link was uploaded"

    return {
        "disk full during fetch, then re-run": disk_full_during_fetch,
        "bit-flipped source fetched before the good one": flipped_source_first,
        "bit flipped in a stored object": flipped_store_object,
        "diverging run (lr 1e9)": diverging_run,
        "teacher with NaN weights": nan_teacher,
        "3 demos racing on a fresh MLflow database": racing_demos,
        "upload of a folder with a link to a private key outside it": escaping_upload,
    }


# --- the suite -------------------------------------------------------------------------------


def verify_store(root: Path, scratch: Path) -> list[str]:
    """Every artifact of the good store downloaded again and sha256-verified; the keys that fail."""
    from wanlite.storage import Store, StoreError

    store = Store(root.as_uri())
    lost = []
    for i, manifest in enumerate(manifests(root)):
        key = manifest.parent.relative_to(root).as_posix()
        try:
            store.get_dir(key, scratch / f"verify-{i}", progress=False)
        except StoreError as err:
            lost.append(f"{key}: {err}")
    return lost


def run_suite(work: Path, only: list[str] | None = None) -> Tally:
    logs = io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(logs))
    logging.getLogger().setLevel(logging.INFO)
    tally = Tally()
    world = build_world(work)
    before = {p: p.read_bytes() for p in manifests(world.store)}
    def chosen(name: str) -> bool:
        return not only or any(part in name for part in only)

    for name, prepare in bad_inputs(world).items():
        if not chosen(name):
            continue
        argv, store = prepare()
        tally.inputs[name], tally.messages[name] = judge(argv, store, NAMED.get(name))
        print(f"input  {tally.inputs[name]:<10.10} {name}", file=sys.stderr)
    for name, inject in faults(world).items():
        if not chosen(name):
            continue
        try:
            tally.faults[name] = inject()
        except Exception as err:  # an unexpected exception is a failed fault, reported, not a crash of the suite
            tally.faults[name] = f"failed: {type(err).__name__}: {err}"[:300]
        print(f"fault  {tally.faults[name]:<10.10} {name}", file=sys.stderr)
    tally.lost = verify_store(world.store, work / "scratch")
    tally.lost += [f"{p}: manifest changed" for p, data in before.items() if p.read_bytes() != data]
    texts = [logs.getvalue()] + [p.read_text(errors="replace") for p in work.rglob("*.json")]
    tally.leaks = [f"{i}" for i, text in enumerate(texts) if SECRET in text]
    return tally


def summary(t: Tally) -> dict[str, Any]:
    inputs = list(t.inputs.values())
    return {
        "bad_inputs_tried": len(inputs),
        "rejected_cleanly": inputs.count("clean"),
        "accepted": inputs.count("accepted"),
        "rejected_badly": sum(v.startswith("bad") for v in inputs),
        "faults_injected": len(t.faults),
        "faults_survived": sum(v.startswith("survived") for v in t.faults.values()),
        "artifacts_lost": len(t.lost),
        "secrets_leaked": len(t.leaks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to build the tiny world (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, help="write counts and every case's outcome here")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only the cases whose name contains TEXT (repeatable; default: all)")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("WANLITE_CACHE", tempfile.mkdtemp(prefix="wanlite-faults-cache-"))
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wanlite-faults-")))
        tally = run_suite(work, args.only)
    counts = summary(tally)
    inputs = {name: {"outcome": outcome, "message": tally.messages[name]} for name, outcome in tally.inputs.items()}
    result = {"counts": counts, "inputs": inputs, "faults": tally.faults, "lost": tally.lost,
              "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
