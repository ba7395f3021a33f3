"""`fetch_teacher` / `wanlite fetch`: local, s3:// and hub sources into both store backends."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.fixtures.storage import TEST_CHUNK
from wanlite.checkpoint.fetch import PARTIAL_NAME, FetchError, fetch_teacher
from wanlite.checkpoint.layout import LayoutError
from wanlite.cli import main
from wanlite.storage import MANIFEST_NAME, Store, StoreError


def _expert_files(dim: int) -> dict[str, bytes]:
    cfg = {"_class_name": "WanModel", "dim": dim, "ffn_dim": 2 * dim, "num_heads": dim // 128, "num_layers": 2}
    index = {"metadata": {"total_size": 4000}, "weight_map": {"head.head.weight": "diffusion_pytorch_model-00001-of-00001.safetensors"}}
    return {
        "config.json": json.dumps(cfg).encode(),
        "diffusion_pytorch_model.safetensors.index.json": json.dumps(index).encode(),
        "diffusion_pytorch_model-00001-of-00001.safetensors": os.urandom(4000),
    }


def native_files(dim: int = 128) -> dict[str, bytes]:
    """A hand-made native-layout checkpoint: the real file names, small random payloads."""
    files = {
        "Wan2.1_VAE.pth": os.urandom(3000),
        "google/umt5-xxl/tokenizer_config.json": b'{"model_max_length": 512}',
        "google/umt5-xxl/spiece.model": os.urandom(500),
        "models_t5_umt5-xxl-enc-bf16.pth": os.urandom(2000),
    }
    for expert in ("high_noise_model", "low_noise_model"):
        files.update({f"{expert}/{rel}": data for rel, data in _expert_files(dim).items()})
    return files


def diffusers_files() -> dict[str, bytes]:
    files = {"model_index.json": b'{"_class_name": "WanPipeline", "boundary_ratio": 0.875}', "vae/config.json": b"{}"}
    for component in ("transformer", "transformer_2"):
        files.update({f"{component}/{rel}": data for rel, data in _expert_files(128).items()})
    return files


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _expected_sha16(files: dict[str, bytes]) -> str:
    """The documented address: sha256 over every file, sorted, as `relpath NUL size NUL sha256-hex NL`."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\0{len(files[rel])}\0{hashlib.sha256(files[rel]).hexdigest()}\n".encode())
    return digest.hexdigest()[:16]


def _upload_raw(endpoint: str, bucket: str, prefix: str, files: dict[str, bytes]) -> str:
    """Put a checkpoint on S3 as a user would (plain objects, no manifest)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)
    return f"s3://{bucket}/{prefix}"


def _assert_stored(store: Store, key: str, files: dict[str, bytes], tmp: Path) -> None:
    store.get_dir(key, tmp, progress=False)  # sha256-verified
    got = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in tmp.rglob("*") if p.is_file()}
    got.pop(MANIFEST_NAME)
    assert got == files


def test_fetch_local_dir_is_content_addressed_and_skipped_the_second_time(store: Store, tmp_path: Path) -> None:
    files = native_files()
    src = _write(tmp_path / "wan", files)
    _write(src, {".cache/huggingface/download/x.lock": b"", ".gitattributes": b"*.pth lfs"})  # not checkpoint data

    report = fetch_teacher(str(src), store, progress=False)
    sha16 = _expected_sha16(files)
    assert report["key"] == f"teachers/{sha16}"
    assert report["uri"] == store.uri(f"teachers/{sha16}")
    assert (report["layout"], report["skipped"], report["copied_files"]) == ("native", False, len(files))

    manifest = store.read_manifest(report["key"])
    assert manifest.meta["source"] == str(src.resolve())
    assert manifest.meta["layout"] == "native" and manifest.meta["content_address"] == sha16
    assert not store.exists(f"{report['key']}/{PARTIAL_NAME}")
    _assert_stored(store, report["key"], files, tmp_path / "back")

    again = fetch_teacher(str(src), store, progress=False)
    assert again["uri"] == report["uri"] and again["skipped"] and again["bytes_copied"] == 0


def test_address_depends_on_every_byte(local_store: Store, tmp_path: Path) -> None:
    files = native_files()
    other_dim = fetch_teacher(str(_write(tmp_path / "two", native_files(dim=256))), local_store, progress=False)

    # A damaged copy (one bit flipped in a weights file, same JSON, same sizes) fetched FIRST gets its own
    # address: it cannot shadow the good checkpoint, which is then copied in full to the right address.
    shard = "high_noise_model/diffusion_pytorch_model-00001-of-00001.safetensors"
    flipped = {**files, shard: bytes([files[shard][0] ^ 1]) + files[shard][1:]}
    bad = fetch_teacher(str(_write(tmp_path / "bad", flipped)), local_store, progress=False)
    good = fetch_teacher(str(_write(tmp_path / "good", files)), local_store, progress=False)
    assert len({bad["sha16"], good["sha16"], other_dim["sha16"]}) == 3
    assert good["sha16"] == _expected_sha16(files) and not good["skipped"]
    _assert_stored(local_store, good["key"], files, tmp_path / "back")


def test_symlink_out_of_the_checkpoint_is_refused(store: Store, tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret")
    src = _write(tmp_path / "wan", native_files())
    (src / "notes.md").symlink_to(secret)
    with pytest.raises(FetchError, match=r"notes\.md: a symlink to .*shadow, outside .*wan; refusing"):
        fetch_teacher(str(src), store, progress=False)
    assert store.list() == []  # nothing copied
    (src / "notes.md").unlink()
    (src / "google" / "leak").symlink_to(tmp_path, target_is_directory=True)  # a folder link out, too
    with pytest.raises(FetchError, match=r"google/leak: a symlink to"):
        fetch_teacher(str(src), store, progress=False)


def test_symlinks_inside_the_checkpoint_and_hub_cache_blobs_are_followed(local_store: Store, tmp_path: Path) -> None:
    files = native_files()
    repo = tmp_path / "hub" / "models--Wan-AI--Wan2.2-T2V-A14B"
    snapshot = repo / "snapshots" / "abc123"
    for rel, data in files.items():  # the hub cache's shape: snapshot files are links to content blobs
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).symlink_to(os.path.relpath(blob, (snapshot / rel).parent))
    report = fetch_teacher(str(snapshot), local_store, progress=False)
    assert report["sha16"] == _expected_sha16(files)
    _assert_stored(local_store, report["key"], files, tmp_path / "back")


def test_cli_symlink_refusal_is_one_line(local_store: Store, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _write(tmp_path / "wan", native_files())
    (src / "notes.md").symlink_to("/etc/passwd")
    assert main(["fetch", str(src), "--store", local_store.root, "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "notes.md: a symlink to /etc/passwd" in err


def test_store_upload_refuses_symlinks_out_of_the_folder(store: Store, tmp_path: Path) -> None:
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "inside.json").symlink_to(folder / "config.json")  # inside: followed
    store.put_dir(folder, "ok", progress=False)
    assert sorted(store.read_manifest("ok").files) == ["config.json", "inside.json"]
    (folder / "key.pem").symlink_to(tmp_path / "elsewhere.pem")
    with pytest.raises(StoreError, match=r"key\.pem: a symlink to .*elsewhere\.pem, outside"):
        store.put_dir(folder, "bad", progress=False)
    assert store.read_manifest("bad") is None


def test_fetch_diffusers_layout(store: Store, tmp_path: Path) -> None:
    files = diffusers_files()
    report = fetch_teacher(str(_write(tmp_path / "wan-diffusers", files)), store, progress=False)
    assert report["layout"] == "diffusers" and report["sha16"] == _expected_sha16(files)
    _assert_stored(store, report["key"], files, tmp_path / "back")


def test_fetch_from_s3_prefix(store: Store, tmp_path: Path, moto_server: str, s3_bucket: str) -> None:
    files = native_files()
    src = _upload_raw(moto_server, s3_bucket, "raw/Wan2.2-T2V-A14B", files)
    report = fetch_teacher(src, store, progress=False)
    assert report["sha16"] == _expected_sha16(files)  # same address as the same files fetched from disk
    assert report["layout"] == "native" and report["source"] == src
    assert store.read_manifest(report["key"]).meta["source"] == src
    _assert_stored(store, report["key"], files, tmp_path / "back")
    assert fetch_teacher(src, store, progress=False)["skipped"]


@pytest.mark.slow
def test_interrupted_fetch_resumes(store: Store, tmp_path: Path, interrupt_midway) -> None:
    files = native_files()
    files["models_t5_umt5-xxl-enc-bf16.pth"] = os.urandom(3 * TEST_CHUNK)  # sorted last: the cut falls inside it
    src = _write(tmp_path / "wan", files)
    body = f"from wanlite.checkpoint.fetch import fetch_teacher\nfetch_teacher({str(src)!r}, store, progress=False)"
    status, log = interrupt_midway(store, body, 2 * TEST_CHUNK)
    assert status != 0, log

    key = f"teachers/{_expected_sha16(files)}"
    assert store.read_manifest(key) is None
    recorded = store.get_json(f"{key}/{PARTIAL_NAME}")["files"]
    assert set(recorded) == set(files) - {"models_t5_umt5-xxl-enc-bf16.pth"}

    report = fetch_teacher(str(src), store, progress=False)
    assert (report["resumed_files"], report["copied_files"]) == (len(recorded), 1)
    assert report["bytes_copied"] == 3 * TEST_CHUNK
    _assert_stored(store, key, files, tmp_path / "back")


def test_unknown_layout_is_a_clear_error(local_store: Store, tmp_path: Path, moto_server: str, s3_bucket: str) -> None:
    junk = {"notes.json": b"{}", "weights.bin": b"\0" * 10}
    with pytest.raises(LayoutError, match=r"junk: expected a native Wan 2\.2 layout .* found notes\.json, weights\.bin"):
        fetch_teacher(str(_write(tmp_path / "junk", junk)), local_store, progress=False)
    src = _upload_raw(moto_server, s3_bucket, "junk", junk)
    with pytest.raises(LayoutError, match=rf"{src}: expected a native Wan 2\.2 layout"):
        fetch_teacher(src, local_store, progress=False)
    assert local_store.list() == []  # nothing copied


def test_missing_source_is_a_clear_error(local_store: Store, tmp_path: Path, s3_bucket: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere: expected a checkpoint directory, found nothing"):
        fetch_teacher(str(tmp_path / "nowhere"), local_store, progress=False)
    with pytest.raises(FileNotFoundError, match=rf"s3://{s3_bucket}/absent: expected a checkpoint .* found no objects"):
        fetch_teacher(f"s3://{s3_bucket}/absent", local_store, progress=False)


def test_cli_prints_only_the_uri(local_store: Store, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = native_files()
    src = _write(tmp_path / "wan", files)
    assert main(["fetch", str(src), "--store", local_store.root, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out == f"{local_store.uri('teachers/' + _expected_sha16(files))}\n"


def test_cli_hub_id_offline_says_the_hub_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the env var is read once, when the hub is imported
    monkeypatch.setenv("WANLITE_CACHE", str(tmp_path / "cache"))
    store = (tmp_path / "store").as_uri()
    assert main(["fetch", "Wan-AI/Wan2.2-T2V-A14B", "--store", store, "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Wan-AI/Wan2.2-T2V-A14B: the Hugging Face hub is unreachable" in err
    assert "pass its local directory: `wanlite fetch DIR`" in err


@pytest.mark.parametrize("fixture", ["tiny_teacher", "tiny_diffusers_teacher"])
def test_fetch_synthetic_tiny_teacher(fixture: str, local_store: Store, request: pytest.FixtureRequest) -> None:
    teacher: Path = request.getfixturevalue(fixture)
    report = fetch_teacher(str(teacher), local_store, progress=False)
    assert report["layout"] == ("native" if fixture == "tiny_teacher" else "diffusers")
    stored = local_store.local_dir(report["key"])
    for path in teacher.rglob("*"):
        if path.is_file():
            assert (stored / path.relative_to(teacher)).read_bytes() == path.read_bytes()
    assert fetch_teacher(str(teacher), local_store, progress=False)["skipped"]
