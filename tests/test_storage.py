"""The object store, run against both backends: a local directory and S3 (a real moto server on loopback)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.storage import TEST_CHUNK, free_port
from wanlite.config import ConfigError
from wanlite.storage import MANIFEST_NAME, FileEntry, Manifest, Store, StoreError, local_dir


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


TREE = {
    "config.json": b'{"dim": 128}',
    "nested/deep/weights.bin": bytes(range(256)) * 300,
    "nested/empty.dat": b"",
    "with space/\u00fcnicode.txt": "gr\u00fc\u00df".encode(),
}


def test_round_trip_directory_tree(store: Store, tmp_path: Path) -> None:
    src = _write(tmp_path / "src", TREE)
    manifest = store.put_dir(src, "art/one", meta={"kind": "test"}, progress=False)

    assert manifest.files == {rel: FileEntry(len(data), _sha(data)) for rel, data in TREE.items()}
    assert store.read_manifest("art/one") == manifest
    assert store.list("art/one") == sorted([f"art/one/{rel}" for rel in TREE] + [f"art/one/{MANIFEST_NAME}"])

    got = store.get_dir("art/one", tmp_path / "dst", progress=False)
    assert got.meta == {"kind": "test"}
    copied = _tree(tmp_path / "dst")
    assert Manifest.from_json(copied.pop(MANIFEST_NAME)) == manifest
    assert copied == TREE


def test_small_objects_and_create_only(store: Store) -> None:
    assert not store.exists("cfg/a.json")
    store.put_json("cfg/a.json", {"x": 1})
    assert store.exists("cfg/a.json") and store.get_json("cfg/a.json") == {"x": 1}
    store.put_json("cfg/a.json", {"x": 2})  # plain writes overwrite
    assert store.get_json("cfg/a.json") == {"x": 2}

    store.put_bytes("cfg/once", b"v1", create_only=True)
    store.put_bytes("cfg/once", b"v1", create_only=True)  # identical content: accepted, untouched
    with pytest.raises(StoreError, match=r"cfg/once: refusing to overwrite"):
        store.put_bytes("cfg/once", b"v2", create_only=True)
    assert store.get_bytes("cfg/once") == b"v1"
    assert store.list("cfg") == ["cfg/a.json", "cfg/once"]

    with pytest.raises(StoreError, match=r"cfg/missing.*not found"):
        store.get_bytes("cfg/missing")


def test_publish_refuses_to_overwrite_a_different_artifact(store: Store, tmp_path: Path) -> None:
    first = store.put_dir(_write(tmp_path / "a", {"w.bin": b"A" * 100}), "art", meta={"run": 1}, progress=False)

    # The same content again: nothing uploaded, the published manifest (and its meta) is kept.
    again = store.put_dir(_write(tmp_path / "a2", {"w.bin": b"A" * 100}), "art", meta={"run": 2}, progress=False)
    assert again == first and again.meta == {"run": 1}

    # Different content: refused before a byte is written, so the published data stays intact.
    with pytest.raises(StoreError, match=r"art: refusing to overwrite.*1 file\(s\) differ: w\.bin"):
        store.put_dir(_write(tmp_path / "b", {"w.bin": b"B" * 100}), "art", progress=False)
    assert store.get_bytes("art/w.bin") == b"A" * 100

    # A writer that raced past the check still cannot replace the manifest (create-only).
    other = Manifest(files={"w.bin": FileEntry(100, _sha(b"B" * 100))})
    with pytest.raises(StoreError, match="refusing to overwrite"):
        store.write_manifest("art", other)
    assert store.read_manifest("art") == first


def test_multipart_upload_is_verified_by_sha(store: Store, tmp_path: Path, moto_server: str) -> None:
    big = os.urandom(2 * TEST_CHUNK + 12345)  # > 2 x the 5 MiB part size: three parts
    manifest = store.put_dir(_write(tmp_path / "src", {"big.bin": big}), "mp", progress=False)
    assert manifest.files["big.bin"] == FileEntry(len(big), _sha(big))
    if store.protocol == "s3":
        import boto3

        bucket, _, prefix = store.root.removeprefix("s3://").partition("/")
        head = boto3.client("s3", endpoint_url=moto_server).head_object(Bucket=bucket, Key=f"{prefix}/mp/big.bin")
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # S3's multipart ETag: md5-of-parts "-N"
    store.get_dir("mp", tmp_path / "dst", progress=False)
    assert _sha((tmp_path / "dst" / "big.bin").read_bytes()) == _sha(big)


CUT_TREE = {"a.json": b"{}", "b/small.bin": b"s" * 1000}
BIG_NAME = "z_big.bin"  # sorted last: the cut falls inside it, after the small files are stored


@pytest.mark.slow
def test_interrupted_upload_leaves_no_manifest(store: Store, tmp_path: Path, interrupt_midway) -> None:
    src = _write(tmp_path / "src", {**CUT_TREE, BIG_NAME: os.urandom(3 * TEST_CHUNK)})
    status, log = interrupt_midway(store, f"store.put_dir({str(src)!r}, 'art', progress=False)", 2 * TEST_CHUNK)
    assert status != 0, log

    assert set(store.list("art")) >= {"art/a.json", "art/b/small.bin"}  # it did get half-way
    assert f"art/{MANIFEST_NAME}" not in store.list("art")
    assert store.read_manifest("art") is None
    with pytest.raises(StoreError, match=rf"{store.uri('art')}: not a complete artifact: no {MANIFEST_NAME}"):
        store.get_dir("art", tmp_path / "dst", progress=False)

    store.put_dir(src, "art", progress=False)  # a re-run finishes the job
    store.get_dir("art", tmp_path / "dst", progress=False)
    assert _tree(tmp_path / "dst").keys() - {MANIFEST_NAME} == _tree(src).keys()


def test_manifest_is_written_after_every_file_local(local_store: Store, tmp_path: Path) -> None:
    src = _write(tmp_path / "src", TREE)
    local_store.put_dir(src, "art", progress=False)
    root = Path(local_store.root.removeprefix("file://")) / "art"
    manifest_time = (root / MANIFEST_NAME).stat().st_mtime_ns
    assert all((root / rel).stat().st_mtime_ns <= manifest_time for rel in TREE)


def test_manifest_is_written_after_every_file_s3(s3_store: Store, tmp_path: Path, loopback_proxy) -> None:
    """Freeze an upload mid-way through its last file: data objects are there, the manifest is not."""
    import threading

    src = _write(tmp_path / "src", {**CUT_TREE, BIG_NAME: os.urandom(2 * TEST_CHUNK)})
    proxy = loopback_proxy(stall_after=TEST_CHUNK)
    slow = _via(s3_store, proxy.endpoint, chunk_size=TEST_CHUNK, max_attempts=1)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            slow.put_dir(src, "art", progress=False)
        except BaseException as err:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(err)

    worker = threading.Thread(target=upload)
    worker.start()
    assert proxy.stalled.wait(300), "upload never reached the stall point"
    listing = s3_store.list("art")
    assert "art/a.json" in listing and f"art/{MANIFEST_NAME}" not in listing
    assert s3_store.read_manifest("art") is None
    proxy.close()  # the frozen upload now fails; nothing gets published
    worker.join()
    assert errors and isinstance(errors[0], StoreError)
    assert s3_store.read_manifest("art") is None


def test_corruption_after_upload_is_caught(store: Store, tmp_path: Path) -> None:
    store.put_dir(_write(tmp_path / "src", TREE), "art", progress=False)
    original = TREE["nested/deep/weights.bin"]
    store.put_bytes("art/nested/deep/weights.bin", bytes(reversed(original)))  # same size, other bytes

    assert store.read_manifest("art") is not None  # sizes still match: only the sha can tell
    with pytest.raises(StoreError, match=r"art/nested/deep/weights\.bin: content does not match the manifest"):
        store.get_dir("art", tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst" / "nested/deep/weights.bin").exists()
    assert not (tmp_path / "dst" / MANIFEST_NAME).exists()

    store.put_bytes("art/config.json", b"{}")  # a size change makes the artifact incomplete
    assert store.read_manifest("art") is None
    with pytest.raises(StoreError, match=r"config\.json \(2 bytes, expected 12\)"):
        store.get_dir("art", tmp_path / "dst2", progress=False)


def test_unreadable_or_unsafe_manifests_are_not_trusted(store: Store) -> None:
    store.put_bytes("art/x.bin", b"x")
    store.put_bytes(f"art/{MANIFEST_NAME}", b'{"format": "wanlite-manifest", "vers')  # half a manifest
    assert store.read_manifest("art") is None
    assert "unreadable _MANIFEST.json: not valid JSON" in store.inspect("art")[1]

    evil = {"format": "wanlite-manifest", "version": 1, "meta": {}, "files": {"../x.bin": {"size": 1, "sha256": "0" * 64}}}
    store.put_json(f"art/{MANIFEST_NAME}", evil)
    assert "'../x.bin': expected a relative path inside the artifact" in store.inspect("art")[1]


def test_local_dir(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANLITE_CACHE", str(tmp_path / "cache"))
    store.put_dir(_write(tmp_path / "src", TREE), "art", progress=False)

    path = store.local_dir("art", progress=False)
    assert _tree(path).keys() - {MANIFEST_NAME} == TREE.keys()
    assert all((path / rel).read_bytes() == data for rel, data in TREE.items())
    if store.protocol == "file":
        assert path == Path(store.root.removeprefix("file://")) / "art"  # no copy
    else:
        assert path.parent == tmp_path / "cache" / "store"
        assert path.name == store.read_manifest("art").digest  # content-addressed
        before = (path / "config.json").stat().st_mtime_ns
        assert store.local_dir("art", progress=False) == path  # served from the cache, not re-downloaded
        assert (path / "config.json").stat().st_mtime_ns == before
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dirs left behind

    assert local_dir(store.uri("art"), progress=False) == path  # module-level helper, configured from env

    with pytest.raises(StoreError, match=rf"{store.uri('nothing')}: not a complete artifact"):
        store.local_dir("nothing")


def test_local_dir_never_trusts_a_half_downloaded_cache(
    s3_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANLITE_CACHE", str(tmp_path / "cache"))
    s3_store.put_dir(_write(tmp_path / "src", TREE), "art", progress=False)
    digest = s3_store.read_manifest("art").digest
    s3_store.put_bytes("art/nested/deep/weights.bin", b"\0" * len(TREE["nested/deep/weights.bin"]))

    with pytest.raises(StoreError, match="content does not match the manifest"):
        s3_store.local_dir("art", progress=False)
    assert not (tmp_path / "cache" / "store" / digest).exists()
    assert list((tmp_path / "cache" / "store").iterdir()) == []  # the temp download was removed too


def _fetch_into_cache(root: str, endpoint: str, cache: str, log_file: str) -> None:
    os.environ["WANLITE_CACHE"] = cache
    logging.basicConfig(filename=log_file, level=logging.INFO)
    Store(root, storage_options={"endpoint_url": endpoint}).local_dir("art", progress=False)


def test_processes_sharing_a_cache_download_once(s3_store: Store, moto_server: str, tmp_path: Path) -> None:
    """The ranks of one node call local_dir together: one downloads, the others wait and use its copy."""
    import multiprocessing

    s3_store.put_dir(_write(tmp_path / "src", TREE), "art", progress=False)
    spawn = multiprocessing.get_context("spawn")
    ranks = [spawn.Process(target=_fetch_into_cache,
                           args=(s3_store.root, moto_server, str(tmp_path / "cache"), str(tmp_path / f"{i}.log")))
             for i in range(3)]  # fmt: skip
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=120)
    assert [rank.exitcode for rank in ranks] == [0, 0, 0]
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(3)]
    assert sum("downloading into the cache" in text for text in logs) == 1
    digest = s3_store.read_manifest("art").digest
    assert [p.name for p in (tmp_path / "cache" / "store").iterdir()] == [digest]


# ----------------------------------------------------------------- S3 failure modes


def _via(store: Store, endpoint: str, **kwargs) -> Store:
    """The same bucket and prefix as `store`, reached through another endpoint."""
    return Store(store.root, storage_options={"endpoint_url": endpoint, **kwargs.pop("options", {})}, **kwargs)


def test_transient_errors_are_retried_with_backoff(s3_store: Store, loopback_proxy, caplog) -> None:
    s3_store.put_bytes("obj", b"payload")
    proxy = loopback_proxy(["drop", "500", "503"])  # a dropped connection, an InternalError, a SlowDown
    flaky = _via(s3_store, proxy.endpoint, max_attempts=4)
    with caplog.at_level(logging.DEBUG, logger="botocore.retries"):
        assert flaky.get_bytes("obj") == b"payload"
    assert proxy.connections >= 4
    assert sum("Retry needed" in r.getMessage() for r in caplog.records) >= 2


@pytest.mark.parametrize(("fault", "explained"), [("403", "access denied"), ("404", "not found")])
def test_permanent_errors_are_not_retried(s3_store: Store, loopback_proxy, fault: str, explained: str) -> None:
    proxy = loopback_proxy(forever_fault=fault)
    with pytest.raises(StoreError, match=rf"reading {s3_store.uri('obj')}: {explained}"):
        _via(s3_store, proxy.endpoint, max_attempts=5).get_bytes("obj")
    requests = proxy.faulted_requests
    assert requests and len(set(requests)) == len(requests), requests  # each request sent once: no retry


def test_unreachable_endpoint_fails_after_bounded_retries(s3_store: Store, loopback_proxy) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreError, match=rf"{s3_store.uri('x')}: cannot reach {closed} after 2 attempts"):
        _via(s3_store, closed, max_attempts=2).get_bytes("x")

    # A server that accepts and hangs up on every connection: the attempts are counted and bounded.
    proxy = loopback_proxy(forever_fault="drop")
    with pytest.raises(StoreError, match="after 3 attempts"):
        _via(s3_store, proxy.endpoint, max_attempts=3).get_bytes("x")
    # aiohttp itself re-sends an idempotent request once on a fresh connection (RFC 9112 §9.3.1).
    assert 3 <= proxy.connections <= 6


def _moto_auth(endpoint: str, free_actions: str) -> None:
    """Switch moto's signature/IAM checks on ("0") or off ("inf") for the running server."""
    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=free_actions.encode(), method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(req).read()


def test_wrong_credentials_fail_clearly_and_never_leak(
    s3_store: Store, moto_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    import boto3

    iam = boto3.client("iam", endpoint_url=moto_server, region_name="us-east-1")
    user = f"wanlite-{os.urandom(4).hex()}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    wrong_secret = "WRONG-" + key["SecretAccessKey"][6:]

    _moto_auth(moto_server, "0")
    try:
        good = _via(s3_store, moto_server, options={"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]})
        good.put_bytes("obj", b"ok")
        assert good.get_bytes("obj") == b"ok"

        bad = _via(s3_store, moto_server, options={"key": key["AccessKeyId"], "secret": wrong_secret})
        with caplog.at_level(logging.DEBUG, logger="wanlite"), pytest.raises(StoreError) as info:
            bad.get_bytes("obj")
    finally:
        _moto_auth(moto_server, "inf")

    message = str(info.value)
    assert f"reading {s3_store.uri('obj')}: access denied by {moto_server}" in message
    assert "AWS_SECRET_ACCESS_KEY" in message  # tells the user what to check
    for secret in (wrong_secret, key["SecretAccessKey"], key["AccessKeyId"]):
        assert secret not in message
        assert secret not in repr(bad) and secret not in caplog.text


def test_secrets_never_appear_in_repr_errors_or_logs(
    s3_store: Store, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret, key_id = "sEcReT-do-not-print-1234567890", "AKIA-do-not-print-42"
    endpoint = f"http://{key_id}:{secret}@127.0.0.1:{free_port()}"  # even credentials in the URL are hidden
    monkeypatch.setenv("WANLITE_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("WANLITE_S3_MAX_ATTEMPTS", "1")
    store = Store.from_env(s3_store.root)
    with caplog.at_level(logging.DEBUG, logger="wanlite"), pytest.raises(StoreError) as info:
        store.read_manifest("art")
    for text in (repr(store), str(store), str(info.value), caplog.text):
        assert secret not in text and key_id not in text
    assert "cannot reach http://127.0.0.1:" in str(info.value)


# ----------------------------------------------------------------- configuration


def test_from_env_roots_and_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANLITE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert Store.from_env().root == f"file://{tmp_path}/.wanlite/store"
    monkeypatch.setenv("WANLITE_STORE", "relative/store")
    assert Store.from_env().root == f"file://{tmp_path}/relative/store"
    assert Store.from_env("s3://bucket/prefix/").uri("a/b") == "s3://bucket/prefix/a/b"

    monkeypatch.setenv("WANLITE_S3_CHECKSUMS", "always")
    with pytest.raises(ConfigError, match="WANLITE_S3_CHECKSUMS: expected one of"):
        Store.from_env("s3://bucket")
    with pytest.raises(ConfigError, match=r"chunk_size: expected >= 5242880 .*found 1024"):
        Store("s3://bucket", chunk_size=1024)
    with pytest.raises(ConfigError, match="expected a file:// or s3:// URI"):
        Store("gs://bucket")
