"""Copy a teacher checkpoint into the store, content-addressed: `teachers/<sha16>/`.

The address is the first 16 hex digits of a sha256 over the checkpoint's
listing: every file's relative path, size and sha256, sorted by path. It is
sensitive to every byte of the weights, so a damaged copy (one flipped bit)
fetched first gets its own address and can never shadow the good checkpoint.
The cost is one full read of the source before anything is copied (sha256 of
28 GB per A14B expert; see README "Fetch"), and a second read to copy it when
the address is new; a re-fetch of a checkpoint already in the store costs that
one read and copies nothing. Each copied file's sha256 must equal the one the
address was computed from, so a source that changes during the fetch is
refused rather than stored under the wrong address.

Resumable: after each file is copied its size and sha256 are recorded in
`_PARTIAL.json` next to it, so a re-run skips files already recorded there with
the same sha256 and present in the store with that size. The manifest is
written last; once it exists a fetch of the same checkpoint copies nothing.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from wanlite.checkpoint.layout import LayoutError, detect_layout
from wanlite.storage import (
    RESERVED_NAMES,
    FileEntry,
    Manifest,
    Store,
    StoreError,
    default_cache_dir,
    join_key,
    scan_local_files,
)

log = logging.getLogger(__name__)

TEACHERS_PREFIX = "teachers"
PARTIAL_NAME = "_PARTIAL.json"
ADDRESS_SCHEME = "sha256 over every file, sorted by path: relpath NUL size NUL sha256-hex NL; first 16 hex"
HASH_CHUNK = 8 * 2**20
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class FetchError(RuntimeError):
    """A source that cannot be fetched; the message says what was tried and what to do instead."""


@dataclass
class Source:
    """The files of a checkpoint to copy, wherever they live."""

    uri: str  # for logs and the manifest: never carries credentials
    files: dict[str, int]  # relative path -> size, sorted
    open: Callable[[str], BinaryIO]
    local_root: Path | None  # set when the files are on this machine
    staged: bool = False  # local_root is our own download (hub): removed once the store holds it


def _wanted(rel: str) -> bool:
    """Checkpoint files only: no hidden files (.cache/, .gitattributes) and no store bookkeeping."""
    return rel not in RESERVED_NAMES and not any(part.startswith(".") for part in rel.split("/"))


def local_source(path: Path, uri: str | None = None) -> Source:
    """A checkpoint directory on this machine.

    Symlinks are followed only where they stay inside the checkpoint, or, for
    a hub cache snapshot (`.../snapshots/<revision>/`), inside that repo's
    `blobs/`: a link to anywhere else is refused, naming it.
    """
    if not path.is_dir():
        what = "a file" if path.exists() else "nothing (no such path)"
        raise FileNotFoundError(f"{path}: expected a checkpoint directory, found {what}")
    real = path.resolve()
    hub_blobs = (real.parent.parent / "blobs",) if real.parent.name == "snapshots" else ()
    try:
        files = scan_local_files(path, wanted=_wanted, also_inside=hub_blobs)
    except StoreError as err:
        raise FetchError(str(err)) from None
    return Source(uri=uri or str(real), files=files, open=lambda rel: open(path / rel, "rb"), local_root=path)


def s3_source(uri: str) -> Source:
    """A checkpoint under an s3:// prefix (plain objects; endpoint and credentials from the environment)."""
    src = Store.from_env(uri)
    files = {rel: size for rel, size in sorted(src.sizes("").items()) if _wanted(rel)}
    if not files:
        raise FileNotFoundError(f"{uri}: expected a checkpoint under this prefix, found no objects")
    return Source(uri=src.uri(), files=files, open=src.open, local_root=None)


def hub_source(repo_id: str, revision: str | None, progress: bool) -> Source:
    """Download a hub repo into a local staging directory with huggingface_hub, then read it from there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    staging = default_cache_dir() / "hub" / repo_id.replace("/", "--")
    hint = (
        f"download the checkpoint where the hub is reachable (e.g. `hf download {repo_id} --local-dir DIR`) "
        "and pass its local directory: `wanlite fetch DIR`"
    )
    try:
        snapshot_download(repo_id, revision=revision, local_dir=staging, tqdm_class=None if progress else _Silent)
    except LocalEntryNotFoundError as err:
        raise FetchError(
            f"{repo_id}: the Hugging Face hub is unreachable (offline, HF_HUB_OFFLINE=1, or no network) and no "
            f"local directory of that name exists; {hint}"
        ) from err
    except HfHubHTTPError as err:
        raise FetchError(f"{repo_id}: the Hugging Face hub refused the download ({err}); {hint}") from err
    suffix = f"@{revision}" if revision else ""
    source = local_source(staging, uri=f"hf://{repo_id}{suffix}")
    source.staged = True
    return source


class _Silent(tqdm):
    """A tqdm that never draws: huggingface_hub's progress when the caller asked for none."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def resolve_source(src: str, *, revision: str | None = None, progress: bool = True) -> Source:
    """A local directory, an s3:// prefix, or (if no such local path exists) a hub repo id `owner/name`."""
    if src.startswith("s3://"):
        return s3_source(src)
    path = Path(src).expanduser()
    if path.exists() or not HUB_REPO_ID.match(src):
        return local_source(path)
    return hub_source(src, revision, progress)


@dataclass
class Address:
    """Where a checkpoint lives in the store, and the per-file hashes it was computed from."""

    sha16: str
    hashes: dict[str, FileEntry]  # relative path -> size, sha256 (every file)
    blobs: dict[str, bytes]  # the JSON files' bytes (layout detection of a remote source)


def content_address(source: Source, *, progress: bool = False) -> Address:
    """Hash every file of the source once (see the module docstring); JSON files are kept in memory."""
    digest = hashlib.sha256()
    hashes: dict[str, FileEntry] = {}
    blobs: dict[str, bytes] = {}
    with tqdm(total=sum(source.files.values()), desc="hash", unit="B", unit_scale=True, unit_divisor=1024,
              disable=not progress, leave=False) as bar:  # fmt: skip
        for rel in sorted(source.files):
            sha, size = hashlib.sha256(), 0
            keep = rel.endswith(".json")
            chunks: list[bytes] = []
            with source.open(rel) as fh:
                while chunk := fh.read(HASH_CHUNK):
                    sha.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
                    if keep:
                        chunks.append(chunk)
            hashes[rel] = FileEntry(size=size, sha256=sha.hexdigest())
            if keep:
                blobs[rel] = b"".join(chunks)
            digest.update(f"{rel}\0{size}\0{hashes[rel].sha256}\n".encode())
    return Address(digest.hexdigest()[:16], hashes, blobs)


def source_layout(source: Source, blobs: dict[str, bytes]) -> str:
    """detect_layout on the source; a remote source is judged by its JSON files, which carry the markers."""
    if source.local_root is not None:
        return detect_layout(source.local_root)
    with tempfile.TemporaryDirectory(prefix="wanlite-layout-") as tmp:
        for rel, data in blobs.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(data)
        try:
            return detect_layout(tmp)
        except LayoutError as err:
            raise LayoutError(str(err).replace(tmp, source.uri)) from None


def fetch_teacher(src: str, store: Store, *, progress: bool = True, revision: str | None = None) -> dict[str, Any]:
    """Copy the checkpoint at src into `teachers/<sha16>/` of store; return a small report.

    Report keys: uri, key, sha16, layout, source, skipped (True when the
    manifest already existed), copied_files, resumed_files, bytes_copied.
    """
    source = resolve_source(src, revision=revision, progress=progress)
    address = content_address(source, progress=progress)
    sha16 = address.sha16
    layout = source_layout(source, address.blobs)
    key = join_key(TEACHERS_PREFIX, sha16)
    report: dict[str, Any] = {"uri": store.uri(key), "key": key, "sha16": sha16, "layout": layout, "source": source.uri}

    if store.read_manifest(key) is not None:
        log.info("%s is already in the store at %s; nothing copied", source.uri, report["uri"])
        return {**report, "skipped": True, "copied_files": 0, "resumed_files": 0, "bytes_copied": 0}

    entries, copied = _copy_resumable(source, address.hashes, store, key, progress)
    meta = {
        "kind": "teacher",
        "source": source.uri,
        "layout": layout,
        "content_address": sha16,
        "address_scheme": ADDRESS_SCHEME,
    }
    store.write_manifest(key, Manifest(files=entries, meta=meta))
    store.remove(join_key(key, PARTIAL_NAME))  # bookkeeping only: the manifest is now the record
    if source.staged and source.local_root is not None:
        shutil.rmtree(source.local_root, ignore_errors=True)  # the store now holds it
    return {
        **report,
        "skipped": False,
        "copied_files": len(copied),
        "resumed_files": len(entries) - len(copied),
        "bytes_copied": sum(source.files[rel] for rel in copied),
    }


def _load_partial(store: Store, key: str) -> dict[str, FileEntry]:
    """Files finished by an earlier, interrupted fetch (an unreadable record just means none)."""
    pkey = join_key(key, PARTIAL_NAME)
    if not store.exists(pkey):
        return {}
    try:
        files = store.get_json(pkey)["files"]
        return {rel: FileEntry(size=int(e["size"]), sha256=str(e["sha256"])) for rel, e in files.items()}
    except (StoreError, KeyError, TypeError, ValueError, AttributeError) as err:
        log.warning("ignoring unreadable progress record %s: %s", store.uri(pkey), err)
        return {}


def _copy_resumable(
    source: Source, hashes: dict[str, FileEntry], store: Store, key: str, progress: bool
) -> tuple[dict[str, FileEntry], list[str]]:
    """Copy every source file not already done; return (all entries, the files copied this time)."""
    done = _load_partial(store, key)
    present = store.sizes(key) if done else {}
    entries = {rel: e for rel, e in done.items() if hashes.get(rel) == e and present.get(rel) == e.size}
    if entries:
        log.info("resuming %s: %d of %d files already copied", store.uri(key), len(entries), len(source.files))
    todo = [rel for rel in source.files if rel not in entries]
    total = sum(source.files.values())
    copied: list[str] = []
    with tqdm(
        total=total,
        initial=total - sum(source.files[rel] for rel in todo),
        desc=f"fetch {key}",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        leave=False,
    ) as bar:
        for rel in todo:
            with source.open(rel) as fh:
                entry = store.put_stream(join_key(key, rel), fh, bar=bar)
            if entry != hashes[rel]:
                raise FetchError(
                    f"{source.uri}/{rel}: expected {hashes[rel].size} bytes with sha256 {hashes[rel].sha256} "
                    f"(as hashed for the address), read {entry.size} bytes with sha256 {entry.sha256}: "
                    "the source changed during the fetch; fetch it again once it is stable"
                )
            entries[rel] = entry
            copied.append(rel)
            store.put_json(join_key(key, PARTIAL_NAME), {"source": source.uri, "files": _as_json(entries)})
    return entries, copied


def _as_json(entries: dict[str, FileEntry]) -> dict[str, dict[str, Any]]:
    return {rel: {"size": e.size, "sha256": e.sha256} for rel, e in sorted(entries.items())}
