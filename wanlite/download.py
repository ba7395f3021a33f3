"""Download a registered model version into a ComfyUI install, verified by sha256.

The sha256 recorded as a model-version tag at registration is the contract:
a file that does not match it is never placed. An existing file under the same
name is left alone unless it is byte-identical (nothing to do) or `force` is
given, because silently replacing a user's model breaks their workflows. The
file is downloaded next to its destination (same filesystem) and renamed into
place, so ComfyUI never lists a partial file. The version's ComfyUI workflow
(its sampling settings in nodes) goes into ComfyUI's user workflows folder,
`user/default/workflows/`, where the Workflows sidebar lists it. Both files get
the mode the user's umask gives (0644 by default).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanlite.export import file_sha256, read_export, readable_mode
from wanlite.mlflow_uri import prepare_tracking
from wanlite.registry import COMFYUI_FILE_TAG, COMFYUI_SHA_TAG, COMFYUI_WORKFLOW_TAG, RegistryError

log = logging.getLogger(__name__)

COMFY_MODELS_SUBDIR = Path("models") / "diffusion_models"
COMFY_WORKFLOWS_SUBDIR = Path("user") / "default" / "workflows"
"""Where ComfyUI's frontend keeps the default user's saved workflows (its user directory, `user/default/`)."""

_BARE_SAFETENSORS = re.compile(r"^(?!\.)[^/\\:\x00]+\.safetensors$")
"""A file name with no folder part (no '/', '\\', drive ':'), not hidden, ending in .safetensors."""
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


class ComfyUIError(ValueError):
    """A folder that is not a ComfyUI install, or a placement that would clobber a user's file."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""

    uri: str
    name: str
    alias: str | None
    version: str | None


def parse_model_uri(uri: str) -> ModelRef:
    match = _URI.match(uri)
    if not match:
        raise RegistryError(f"{uri!r}: expected a model URI models:/NAME@ALIAS or models:/NAME/VERSION")
    return ModelRef(uri, match["name"], match["alias"], match["version"])


def resolve_version(client: Any, uri: str) -> Any:
    """The `ModelVersion` a URI names; errors name the model and list what does exist."""
    from mlflow.exceptions import MlflowException

    ref = parse_model_uri(uri)
    try:
        model = client.get_registered_model(ref.name)
    except MlflowException:
        raise RegistryError(f"{uri}: no registered model named {ref.name!r}") from None
    if ref.alias is not None:
        if ref.alias not in model.aliases:
            known = ", ".join(f"@{a}" for a in sorted(model.aliases)) or "none"
            raise RegistryError(f"{uri}: model {ref.name!r} has no alias {ref.alias!r}; aliases: {known}")
        return client.get_model_version(ref.name, model.aliases[ref.alias])
    try:
        return client.get_model_version(ref.name, ref.version)
    except MlflowException:
        raise RegistryError(f"{uri}: model {ref.name!r} has no version {ref.version}") from None


def fetch_version_dir(uri: str, subdir: str, dst: Path, *, tracking_uri: str | None = None) -> tuple[Path, Any]:
    """Download one folder of a version's `model/` artifact (e.g. `diffusers`) into `dst`."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    prepare_tracking(tracking_uri)
    version = resolve_version(MlflowClient(tracking_uri=tracking_uri), uri)
    local = download_artifacts(
        artifact_uri=f"{version.source}/{subdir}", dst_path=str(dst), tracking_uri=tracking_uri
    )
    return Path(local), version


def comfyui_models_dir(root: str | Path) -> Path:
    """`<root>/models/diffusion_models`, after checking `root` really is a ComfyUI install."""
    root = Path(root)
    if not root.is_dir():
        raise ComfyUIError(f"{root}: not a ComfyUI install (no such directory)")
    problems = []
    if not (root / "models").is_dir():
        problems.append("no models/ directory")
    if not ((root / "comfy").is_dir() or (root / "main.py").is_file()):
        problems.append("neither comfy/ nor main.py")
    if problems:
        raise ComfyUIError(f"{root}: not a ComfyUI install ({'; '.join(problems)})")
    target = root / COMFY_MODELS_SUBDIR
    target.mkdir(exist_ok=True)
    return target


def _place(src: Path, target: Path) -> None:
    """Rename `src` onto `target`; across filesystems (a symlinked models folder), copy beside it first."""
    try:
        os.replace(src, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        partial = target.with_name(f".{target.name}.partial")  # not a model extension: ComfyUI skips it
        try:
            shutil.copyfile(src, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


def download(
    uri: str, comfyui: str | Path, *, tracking_uri: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Place the version's ComfyUI file in `<comfyui>/models/diffusion_models/`; return a report."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    models_dir = comfyui_models_dir(comfyui)
    prepare_tracking(tracking_uri)
    version = resolve_version(MlflowClient(tracking_uri=tracking_uri), uri)
    name, expected = version.tags.get(COMFYUI_FILE_TAG), version.tags.get(COMFYUI_SHA_TAG)
    if not name or not expected:
        raise RegistryError(
            f"{uri}: version {version.version} has no {COMFYUI_FILE_TAG}/{COMFYUI_SHA_TAG} tags "
            "(not registered by wanlite register)"
        )
    if not _BARE_SAFETENSORS.match(name):
        raise RegistryError(
            f"{uri}: version {version.version} tag {COMFYUI_FILE_TAG}={name!r}: expected a bare file name "
            f"ending in .safetensors (no folder, no '..'); refusing to write outside {models_dir}"
        )
    target = models_dir / name
    report = {"kind": "download", "uri": uri, "version": version.version, "path": str(target), "sha256": expected}
    replacing = target.exists()
    if replacing:
        found = file_sha256(target)
        if found == expected:
            log.info("%s already holds version %s (sha256 matches)", target, version.version)
            return {**report, "action": "already present"}
        if not force:
            raise ComfyUIError(
                f"{target}: a different file is already there (sha256 {found}, expected {expected}); "
                "refusing to overwrite it; pass --force to replace it"
            )
    with tempfile.TemporaryDirectory(prefix=".wanlite-download-", dir=models_dir.parent) as tmp:
        local = Path(
            download_artifacts(
                artifact_uri=f"{version.source}/comfyui/{name}", dst_path=tmp, tracking_uri=tracking_uri
            )
        )
        actual = file_sha256(local)
        if actual != expected:
            raise RegistryError(
                f"{uri}: downloaded {name} has sha256 {actual}, but version {version.version} records {expected}; "
                "not placed"
            )
        read_export(local)
        local.chmod(readable_mode())
        _place(local, target)
    log.info("placed %s (version %s of %s)", target, version.version, version.name)
    workflow = install_workflow(version, Path(comfyui), tracking_uri=tracking_uri)
    return {**report, "action": "replaced" if replacing else "downloaded", "workflow": workflow}


def install_workflow(version: Any, comfyui: Path, *, tracking_uri: str | None = None) -> str | None:
    """Place the version's ComfyUI workflow in `<comfyui>/user/default/workflows/`; its path, or None.

    Versions registered before workflows existed have none (None). An existing
    workflow of the same name is replaced: it is ours, named after the export.
    """
    from mlflow.artifacts import download_artifacts

    name = version.tags.get(COMFYUI_WORKFLOW_TAG)
    if not name:
        log.warning("version %s of %s has no ComfyUI workflow (registered before workflows existed)",
                    version.version, version.name)  # fmt: skip
        return None
    folder = comfyui / COMFY_WORKFLOWS_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    with tempfile.TemporaryDirectory(prefix=".wanlite-workflow-", dir=folder) as tmp:
        local = Path(
            download_artifacts(artifact_uri=f"{version.source}/comfyui/{name}", dst_path=tmp, tracking_uri=tracking_uri)
        )
        local.chmod(readable_mode())
        os.replace(local, target)
    log.info("placed workflow %s", target)
    return str(target)

