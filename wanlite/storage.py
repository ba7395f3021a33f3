"""The object store: one fsspec-based API over a local directory (`file://`) and S3 (`s3://`).

Every artifact is a directory of files under a key, published by writing its
data files first and `_MANIFEST.json` (relative path -> size, sha256) LAST.
Readers trust only a complete manifest, so a writer killed half-way leaves
nothing that anyone will read. S3 has no atomic rename, so nothing is renamed
into place there: each object appears whole when its (multipart) upload
completes, and the manifest is written create-only so a finished artifact can
never be replaced by a different one.

Credentials come from the constructor or the environment and are never
logged, never put in an exception message and never shown by `repr`.

Retries: S3 requests go through botocore's "standard" retry mode, per HTTP
request (so one failed part of a multipart upload is retried alone, not the
whole file): connection errors, HTTP 500/502/503/504, RequestTimeout and
throttling codes are retried with exponential backoff and jitter, at most
`max_attempts` attempts; 4xx answers (403 access denied, 404 not found, bad
credentials) are never retried. s3fs's own outer retry loop is set to a single
attempt so that the two layers do not multiply the bound.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

import fsspec
from tqdm import tqdm

from wanlite.config import ConfigError

log = logging.getLogger(__name__)

MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_FORMAT = "wanlite-manifest"
MANIFEST_VERSION = 1
RESERVED_NAMES = frozenset({MANIFEST_NAME, "_PARTIAL.json"})
"""Store bookkeeping files at an artifact's root; never uploaded as artifact data."""

DEFAULT_CHUNK_SIZE = 64 * 2**20
"""Streaming chunk and S3 multipart part size (s3fs' default is 50 MiB)."""
S3_MIN_PART_SIZE = 5 * 2**20
"""S3 rejects multipart parts smaller than 5 MiB (except the last)."""
DEFAULT_MAX_ATTEMPTS = 5
CHECKSUM_MODES = ("when_required", "when_supported")

ENV_STORE = "WANLITE_STORE"
ENV_CACHE = "WANLITE_CACHE"
ENV_ENDPOINT = "WANLITE_S3_ENDPOINT_URL"
ENV_CHECKSUMS = "WANLITE_S3_CHECKSUMS"
ENV_MAX_ATTEMPTS = "WANLITE_S3_MAX_ATTEMPTS"
ENV_CHUNK_SIZE = "WANLITE_STORE_CHUNK_SIZE"


class StoreError(RuntimeError):
    """A store operation failed. The message names the URI and the cause, never a credential."""

    def __init__(self, message: str, *, uri: str = "") -> None:
        super().__init__(message)
        self.uri = uri


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact as its manifest records it."""

    size: int
    sha256: str


@dataclass
class Manifest:
    """What a finished artifact contains: files (relative path -> size, sha256) and free-form meta."""

    files: dict[str, FileEntry]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    @property
    def digest(self) -> str:
        """sha256 over the canonical file listing: identifies the content, whatever the meta says."""
        listing = {rel: [e.size, e.sha256] for rel, e in sorted(self.files.items())}
        return hashlib.sha256(json.dumps(listing, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_json(self) -> str:
        body = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "files": {rel: {"size": e.size, "sha256": e.sha256} for rel, e in sorted(self.files.items())},
            "meta": self.meta,
        }
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate a manifest; ValueError says which field is wrong and what was found."""
        try:
            body = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"not valid JSON ({err})") from err
        if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
            found = body.get("format") if isinstance(body, dict) else type(body).__name__
            raise ValueError(f"format: expected {MANIFEST_FORMAT!r}, found {found!r}")
        if body.get("version") != MANIFEST_VERSION:
            raise ValueError(f"version: expected {MANIFEST_VERSION}, found {body.get('version')!r}")
        files, meta = body.get("files"), body.get("meta", {})
        if not isinstance(files, dict) or not isinstance(meta, dict):
            raise ValueError("files and meta: expected JSON objects")
        return cls(files={_check_relpath(rel): _parse_entry(rel, e) for rel, e in files.items()}, meta=meta)


def _parse_entry(rel: str, entry: Any) -> FileEntry:
    try:
        size, sha = entry["size"], entry["sha256"]
    except (TypeError, KeyError) as err:
        raise ValueError(f"files[{rel!r}]: expected {{size, sha256}}, found {entry!r}") from err
    if not isinstance(size, int) or size < 0 or not isinstance(sha, str) or len(sha) != 64:
        raise ValueError(f"files[{rel!r}]: expected a size >= 0 and a 64-hex sha256, found {entry!r}")
    return FileEntry(size=size, sha256=sha)


def _check_relpath(rel: str) -> str:
    """Refuse paths that would escape the artifact directory when downloaded."""
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or "\\" in rel or ".." in parts or "." in rel.split("/"):
        raise ValueError(f"file path {rel!r}: expected a relative path inside the artifact")
    return rel


def join_key(*parts: str) -> str:
    """Join store keys with '/', ignoring empty parts (key "" is the store root)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _redact_url(url: str) -> str:
    """An endpoint URL fit for messages: any user:password@ part removed."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _normalise_root(root: str) -> str:
    """A canonical root URI: local paths (plain or file://) become absolute file:// URIs."""
    if "://" not in root:
        return "file://" + str(Path(root).expanduser().resolve())
    if root.startswith("file://"):
        return "file://" + str(Path(root[len("file://") :] or "/").expanduser().resolve())
    return root.rstrip("/")


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError as err:
        raise ConfigError(f"{name}: expected an integer, found {raw!r}") from err


def default_cache_dir() -> Path:
    """Where verified local copies of remote artifacts live: $WANLITE_CACHE or ~/.cache/wanlite."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "wanlite").expanduser()


class Store:
    """An object store rooted at `file://DIR` or `s3://BUCKET[/PREFIX]`; keys are '/'-separated paths.

    `storage_options` go to s3fs (`endpoint_url`, `key`, `secret`, `token`,
    `config_kwargs`, ...). S3 defaults: checksums "when_required" (botocore
    >= 1.36 otherwise sends CRC32 headers that S3-compatible servers reject),
    botocore "standard" retries with `max_attempts`.
    """

    def __init__(
        self,
        root: str,
        *,
        storage_options: dict[str, Any] | None = None,
        chunk_size: int | None = None,
        max_attempts: int | None = None,
    ) -> None:
        self.root = _normalise_root(root)
        self.protocol = urlsplit(self.root).scheme
        self.chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
        self.max_attempts = max_attempts or DEFAULT_MAX_ATTEMPTS
        options = dict(storage_options or {})
        if self.protocol == "file":
            self.endpoint = "local filesystem"
            self._secrets: tuple[str, ...] = ()
            self.fs = fsspec.filesystem("file", auto_mkdir=True)
        elif self.protocol == "s3":
            if self.chunk_size < S3_MIN_PART_SIZE:
                raise ConfigError(
                    f"chunk_size: expected >= {S3_MIN_PART_SIZE} bytes (the S3 minimum part size) "
                    f"for {self.root}, found {self.chunk_size}"
                )
            endpoint = urlsplit(options.get("endpoint_url") or "")
            self.endpoint = _redact_url(endpoint.geturl()) or "AWS S3 (default endpoint)"
            credentials = [options.get(k) for k in ("key", "secret", "token")] + [endpoint.username, endpoint.password]
            self._secrets = tuple(str(v) for v in credentials if v)
            self.fs = self._s3_filesystem(options)
        else:
            raise ConfigError(f"store root {root!r}: expected a file:// or s3:// URI (or a local path)")
        self._base = self.fs._strip_protocol(self.root).rstrip("/")

    def _s3_filesystem(self, options: dict[str, Any]) -> fsspec.AbstractFileSystem:
        import s3fs

        config = {
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "retries": {"mode": "standard", "total_max_attempts": self.max_attempts},
            **options.pop("config_kwargs", {}),
        }
        fs = s3fs.S3FileSystem(
            config_kwargs=config,
            default_block_size=self.chunk_size,
            use_listings_cache=False,  # manifests are polled: a cached listing would hide new ones
            skip_instance_cache=True,  # our retry setting below must not leak into shared instances
            **options,
        )
        fs.retries = 1  # botocore retries each request; a second loop would multiply the bound
        return fs

    @classmethod
    def from_env(cls, root: str | None = None) -> Store:
        """A store configured from the environment (see the module constants `ENV_*`).

        root: explicit URI, else $WANLITE_STORE, else `file://$PWD/.wanlite/store`.
        S3: endpoint from $WANLITE_S3_ENDPOINT_URL, credentials from
        $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY / $AWS_SESSION_TOKEN (else
        botocore's usual chain), checksums from $WANLITE_S3_CHECKSUMS.
        """
        root = root or os.environ.get(ENV_STORE) or str(Path.cwd() / ".wanlite" / "store")
        options: dict[str, Any] = {}
        if _normalise_root(root).startswith("s3://"):
            env_map = {
                "endpoint_url": ENV_ENDPOINT,
                "key": "AWS_ACCESS_KEY_ID",
                "secret": "AWS_SECRET_ACCESS_KEY",
                "token": "AWS_SESSION_TOKEN",
            }
            options = {opt: os.environ[var] for opt, var in env_map.items() if os.environ.get(var)}
            checksums = os.environ.get(ENV_CHECKSUMS)
            if checksums:
                if checksums not in CHECKSUM_MODES:
                    raise ConfigError(f"{ENV_CHECKSUMS}: expected one of {CHECKSUM_MODES}, found {checksums!r}")
                options["config_kwargs"] = {
                    "request_checksum_calculation": checksums,
                    "response_checksum_validation": checksums,
                }
        return cls(
            root,
            storage_options=options,
            chunk_size=_env_int(ENV_CHUNK_SIZE),
            max_attempts=_env_int(ENV_MAX_ATTEMPTS),
        )

    def __repr__(self) -> str:
        where = "" if self.protocol == "file" else f", endpoint={self.endpoint!r}"
        return f"Store({self.root!r}{where})"

    # ----------------------------------------------------------------- paths and errors

    def uri(self, key: str = "") -> str:
        """The full URI of a key (key "" is the root)."""
        key = join_key(key)
        return f"{self.root}/{key}" if key else self.root

    def _path(self, key: str) -> str:
        key = join_key(key)
        if ".." in key.split("/"):
            raise ValueError(f"store key {key!r}: expected a path inside {self.root}, found '..'")
        return f"{self._base}/{key}" if key else self._base

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _explain(self, err: BaseException) -> str:
        """A one-line cause, with a hint for the failures a user can fix."""
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, NoCredentialsError

        code = getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")
        detail = f"{type(err).__name__}: {self._scrub(str(err))}" + (f" (S3 error code {code})" if code else "")
        if isinstance(err, PermissionError):
            return (
                f"access denied by {self.endpoint} (not retried: check AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY and the bucket policy) [{detail}]"
            )
        if isinstance(err, (BotoConnectionError, HTTPClientError)):
            return f"cannot reach {self.endpoint} after {self.max_attempts} attempts [{detail}]"
        if isinstance(err, NoCredentialsError):
            return f"no S3 credentials for {self.endpoint}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        if isinstance(err, FileNotFoundError):
            return f"not found [{detail}]"
        return detail

    @contextmanager
    def _guard(self, action: str, key: str) -> Iterator[None]:
        """Turn any backend failure into a StoreError naming the action, URI and cause."""
        try:
            yield
        except StoreError:
            raise
        except Exception as err:
            raise StoreError(f"{action} {self.uri(key)}: {self._explain(err)}", uri=self.uri(key)) from err

    # ----------------------------------------------------------------- small objects

    def exists(self, key: str) -> bool:
        with self._guard("checking", key):
            return bool(self.fs.exists(self._path(key)))

    def get_bytes(self, key: str) -> bytes:
        with self._guard("reading", key):
            return self.fs.cat_file(self._path(key))

    def _read_or_none(self, key: str) -> bytes | None:
        try:
            with self._guard("reading", key):
                return self.fs.cat_file(self._path(key))
        except StoreError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                return None
            raise

    def put_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        """Write one object whole. create_only: an existing object is kept if identical, else StoreError."""
        if create_only:
            if not self._create(key, data) and self.get_bytes(key) != data:
                raise StoreError(
                    f"writing {self.uri(key)}: refusing to overwrite: it exists with different content",
                    uri=self.uri(key),
                )
            return
        with self._guard("writing", key):
            if self.protocol == "file":
                self._local_write(Path(self._path(key)), data)
            else:
                self.fs.pipe_file(self._path(key), data)

    def _create(self, key: str, data: bytes) -> bool:
        """Create-only write; False when the object already exists (it is left untouched)."""
        with self._guard("creating", key):
            try:
                if self.protocol == "file":
                    self._local_write(Path(self._path(key)), data, exclusive=True)
                else:
                    self.fs.pipe_file(self._path(key), data, mode="create")  # S3 IfNoneMatch="*"
            except FileExistsError:
                return False
        return True

    @staticmethod
    def _local_write(path: Path, data: bytes, *, exclusive: bool = False) -> None:
        """Readers never see half a file: write a complete sibling temp file, then publish it.

        Publishing is `os.replace` (atomic), or with `exclusive` `os.link`, which is atomic
        AND fails with FileExistsError when the name is taken.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            (os.link if exclusive else os.replace)(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def get_json(self, key: str) -> Any:
        raw = self.get_bytes(key)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"reading {self.uri(key)}: expected JSON, found {err}", uri=self.uri(key)) from err

    def put_json(self, key: str, obj: Any, *, create_only: bool = False) -> None:
        self.put_bytes(key, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), create_only=create_only)

    def remove(self, key: str) -> None:
        """Delete one object (used for bookkeeping files; artifacts themselves are never modified)."""
        with self._guard("deleting", key):
            self.fs.rm_file(self._path(key))

    def move(self, src: str, dst: str) -> None:
        """Move every object under `src` to the same relative path under `dst` (manifest first).

        The manifest goes first so an interrupted move never leaves a published
        artifact with files missing, only files without a manifest (which no
        reader trusts). On S3 each object is copied then deleted.
        """
        rels = sorted(self.sizes(src), key=lambda rel: rel != MANIFEST_NAME)
        for rel in rels:
            source, target = self._path(join_key(src, rel)), self._path(join_key(dst, rel))
            with self._guard("moving", join_key(src, rel)):
                if self.protocol == "file":
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                self.fs.mv(source, target)

    def list(self, prefix: str = "") -> list[str]:
        """Keys of every object under prefix (recursive), sorted, relative to the store root."""
        return sorted(join_key(prefix, rel) for rel in self.sizes(prefix))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Every object under prefix (recursive): path relative to prefix -> size in bytes."""
        top = self._path(prefix)
        with self._guard("listing", prefix):
            found = self.fs.find(top, detail=True)
        return {
            name[len(top) + 1 :]: int(info["size"])
            for name, info in found.items()
            if info["type"] == "file" and name.startswith(top + "/")
        }

    def open(self, key: str) -> BinaryIO:
        """A binary file object reading one object (streamed in chunk_size blocks)."""
        with self._guard("opening", key):
            return self.fs.open(self._path(key), "rb", block_size=self.chunk_size)

    # ----------------------------------------------------------------- streaming one file

    def put_stream(self, key: str, src: BinaryIO, *, bar: tqdm | None = None) -> FileEntry:
        """Stream src into one object, hashing as it goes; on any failure nothing is committed on S3.

        Above chunk_size bytes S3 receives a multipart upload (parts of
        chunk_size), and the object appears only when the upload completes.
        A local partial file is removed on failure.
        """
        digest, size = hashlib.sha256(), 0
        path = self._path(key)
        with self._guard("uploading to", key):
            out = self.fs.open(path, "wb", block_size=self.chunk_size)
            try:
                while chunk := src.read(self.chunk_size):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            except BaseException:
                self._abandon(out, path)
                raise
            out.close()
        return FileEntry(size=size, sha256=digest.hexdigest())

    def _abandon(self, out: Any, path: str) -> None:
        """Drop a half-written object: abort the S3 multipart upload, or delete the local file."""
        if self.protocol == "file":
            out.close()
            Path(path).unlink(missing_ok=True)
            return
        try:
            out.discard()
        except Exception as err:  # the endpoint may be what failed; the orphan part data is never read
            log.warning("could not abort the multipart upload of %s: %s", path, self._scrub(str(err)))
        finally:
            out.closed = True  # discarded: garbage collection must not try to flush it

    def _download(self, key: str, target: Path, expected: FileEntry, bar: tqdm | None) -> None:
        """Stream one object to a local file and verify its size and sha256 against the manifest."""
        digest, size = hashlib.sha256(), 0
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._guard("downloading", key), self.fs.open(self._path(key), "rb", block_size=self.chunk_size) as src:
            with open(target, "wb") as out:
                while chunk := src.read(self.chunk_size):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        found = FileEntry(size=size, sha256=digest.hexdigest())
        if found != expected:
            target.unlink(missing_ok=True)
            raise StoreError(
                f"downloading {self.uri(key)}: content does not match the manifest: expected "
                f"{expected.size} bytes sha256 {expected.sha256}, found {found.size} bytes sha256 {found.sha256} "
                "(the object was altered or damaged after upload)",
                uri=self.uri(key),
            )

    # ----------------------------------------------------------------- artifacts (directories)

    def inspect(self, key: str) -> tuple[Manifest | None, str]:
        """(manifest, "") for a complete artifact, else (None, why it is not complete)."""
        raw = self._read_or_none(join_key(key, MANIFEST_NAME))
        if raw is None:
            return None, f"no {MANIFEST_NAME} (never published, or its upload was interrupted)"
        try:
            manifest = Manifest.from_json(raw)
        except ValueError as err:
            return None, f"unreadable {MANIFEST_NAME}: {err}"
        present = self.sizes(key)
        problems = [
            f"{rel} ({'missing' if rel not in present else f'{present[rel]} bytes, expected {e.size}'})"
            for rel, e in sorted(manifest.files.items())
            if present.get(rel) != e.size
        ]
        if problems:
            shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
            return None, f"{MANIFEST_NAME} lists {len(manifest.files)} files but found: {shown}"
        return manifest, ""

    def read_manifest(self, key: str) -> Manifest | None:
        """The artifact's manifest if it is complete (parseable, every file present with its size), else None."""
        manifest, why = self.inspect(key)
        if manifest is None:
            log.debug("%s is not a complete artifact: %s", self.uri(key), why)
        return manifest

    def _require(self, key: str) -> Manifest:
        manifest, why = self.inspect(key)
        if manifest is None:
            raise StoreError(f"{self.uri(key)}: not a complete artifact: {why}", uri=self.uri(key))
        return manifest

    def write_manifest(self, key: str, manifest: Manifest) -> Manifest:
        """Publish an artifact whose files are already uploaded: create-only, so it is written once.

        If a manifest is already there with the same files (same paths, sizes
        and sha256) the existing one is kept and returned, meta included; a
        different one raises StoreError and nothing is changed.
        """
        mkey = join_key(key, MANIFEST_NAME)
        if self._create(mkey, manifest.to_json().encode()):
            log.info("published %s (%d files, %d bytes)", self.uri(key), len(manifest.files), manifest.total_size)
            return manifest
        existing = self._require(key)
        if existing.files != manifest.files:
            raise StoreError(
                f"publishing {self.uri(key)}: refusing to overwrite: a different artifact is already "
                f"published there ({_difference(existing.files, manifest.files)})",
                uri=self.uri(key),
            )
        log.info("%s is already published with identical files; kept its manifest", self.uri(key))
        return existing

    def put_dir(
        self, local_dir: str | Path, key: str, *, meta: dict[str, Any] | None = None, progress: bool = True
    ) -> Manifest:
        """Upload a directory tree: every file streamed and hashed, then the manifest, last.

        If a complete artifact already exists at key, the local files are hashed
        (no upload): identical content returns the existing manifest, different
        content raises StoreError before a single byte is written.
        """
        src = Path(local_dir)
        files = _scan_local(src)
        existing = self.read_manifest(key)
        if existing is not None:
            local = {rel: _hash_file(src / rel, self.chunk_size) for rel in files}
            if local != existing.files:
                raise StoreError(
                    f"uploading {src} to {self.uri(key)}: refusing to overwrite: a different artifact is "
                    f"already published there ({_difference(existing.files, local)})",
                    uri=self.uri(key),
                )
            log.info("%s already holds these files; nothing uploaded", self.uri(key))
            return existing
        entries: dict[str, FileEntry] = {}
        with _bar(sum(files.values()), f"upload {key or self.root}", progress) as bar:
            for rel in files:
                with open(src / rel, "rb") as fh:
                    entries[rel] = self.put_stream(join_key(key, rel), fh, bar=bar)
        return self.write_manifest(key, Manifest(files=entries, meta=dict(meta or {})))

    def get_dir(self, key: str, local_dir: str | Path, *, progress: bool = True) -> Manifest:
        """Download a complete artifact, verifying every file's size and sha256; its manifest is copied last."""
        manifest = self._require(key)
        self._download_all(key, manifest, Path(local_dir), progress)
        return manifest

    def _download_all(self, key: str, manifest: Manifest, dest: Path, progress: bool) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        with _bar(manifest.total_size, f"download {key or self.root}", progress) as bar:
            for rel, entry in sorted(manifest.files.items()):
                self._download(join_key(key, rel), dest / rel, entry, bar)
        self._local_write(dest / MANIFEST_NAME, manifest.to_json().encode())

    def local_dir(self, key: str = "", *, progress: bool = True) -> Path:
        """A local directory holding the complete artifact, for readers that need real files (safe_open).

        file://: the artifact directory itself, after checking its manifest is
        complete (presence and sizes; not re-hashed, which would read every
        byte on each call). s3://: a copy in the content-addressed cache
        `$WANLITE_CACHE/store/<manifest digest>/`, downloaded into a temp
        directory, sha256-verified, then renamed into place (local rename is
        atomic, so a half-downloaded cache is never seen). Processes sharing
        the cache (the ranks of one node) download once: the first holds a
        lock on the digest while the others wait for it, then find the copy.
        The cache outlives the job, so a restarted job downloads nothing.
        """
        manifest = self._require(key)
        if self.protocol == "file":
            return Path(self._path(key))
        cache_root = default_cache_dir() / "store"
        final = cache_root / manifest.digest
        with _exclusive(default_cache_dir() / "locks" / f"{manifest.digest}.lock"):  # one download per machine
            if _local_complete(final, manifest):
                log.debug("%s: using cached copy %s", self.uri(key), final)
                return final
            log.info("%s: downloading into the cache %s", self.uri(key), final)
            tmp = cache_root / f".tmp-{manifest.digest[:16]}-{uuid.uuid4().hex[:8]}"
            try:
                self._download_all(key, manifest, tmp, progress)
                if final.exists():  # a damaged copy (a complete one returned above)
                    log.warning("%s: cached copy %s is incomplete; replacing it", self.uri(key), final)
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final


def local_dir(uri: str, *, progress: bool = True) -> Path:
    """A verified local directory for the artifact at uri (see `Store.local_dir`)."""
    return Store.from_env(uri).local_dir("", progress=progress)


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file`, waiting while another process holds it.

    An advisory `flock`: the kernel releases it when its holder exits, even when killed.
    """
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _difference(old: dict[str, FileEntry], new: dict[str, FileEntry]) -> str:
    changed = sorted(set(old) ^ set(new) | {rel for rel in set(old) & set(new) if old[rel] != new[rel]})
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return f"{len(changed)} file(s) differ: {shown}"


def _scan_local(root: Path) -> dict[str, int]:
    """Regular files under root, sorted relative path -> size; bookkeeping files skipped, escaping symlinks refused."""
    return scan_local_files(root, wanted=lambda rel: rel not in RESERVED_NAMES)


def scan_local_files(
    root: Path, *, wanted: Callable[[str], bool] = lambda rel: True, also_inside: tuple[Path, ...] = ()
) -> dict[str, int]:
    """Files under root (symlinks followed only where they stay inside), sorted relative path -> size.

    A symlink whose target resolves outside root (or outside one of
    `also_inside`, e.g. a hub cache's `blobs/`) raises StoreError naming it:
    uploading it would publish a file from elsewhere on this machine
    (`notes.md -> /etc/shadow`). A symlinked directory that points back to
    one of its ancestors is refused too (walking it would never end).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: expected a directory to upload, found {'a file' if root.exists() else 'nothing'}")
    allowed = tuple(p.resolve() for p in (root, *also_inside))
    found: dict[str, int] = {}
    for here, dirs, files in os.walk(root, followlinks=True):
        here_path = Path(here)
        for name in sorted(dirs):
            link = here_path / name
            if link.is_symlink():
                target = _inside(link, root, allowed)
                if here_path.resolve().is_relative_to(target):
                    raise StoreError(f"{link}: a symlink to {target}, which contains it (a loop); not followed")
        for name in files:
            path = here_path / name
            rel = path.relative_to(root).as_posix()
            if not wanted(rel):
                continue
            _inside(path, root, allowed)
            if path.is_file():
                found[rel] = path.stat().st_size
    return dict(sorted(found.items()))


def _inside(path: Path, root: Path, allowed: tuple[Path, ...]) -> Path:
    """path's real location, after checking it lies inside one of `allowed`."""
    target = path.resolve()
    if not any(target.is_relative_to(base) for base in allowed):
        raise StoreError(
            f"{path}: a symlink to {target}, outside {root}; refusing to copy a file from elsewhere on this "
            "machine (copy the file itself into the folder if it belongs there)"
        )
    return target


def _hash_file(path: Path, chunk_size: int) -> FileEntry:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(size=size, sha256=digest.hexdigest())


def _local_complete(path: Path, manifest: Manifest) -> bool:
    """A local copy is usable if it carries the same manifest and every file has its size."""
    try:
        if Manifest.from_json((path / MANIFEST_NAME).read_bytes()).digest != manifest.digest:
            return False
    except (OSError, ValueError):
        return False
    return all((path / rel).is_file() and (path / rel).stat().st_size == e.size for rel, e in manifest.files.items())


def _bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A byte progress bar on stderr (silent when disabled)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False)
