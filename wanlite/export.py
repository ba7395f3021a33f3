"""Export a student to ONE ComfyUI-loadable `.safetensors` file in native Wan names.

ComfyUI reads only tensor names and shapes (plus, in recent releases, the
header's `config` entry): it detects Wan by `head.modulation`, infers every
size from shapes, and silently leaves missing tensors uninitialised. So the
file carries the complete native `WanModel` key set (`to_native`, the inverse
of diffusers' converter), the architecture in its header, and provenance. It
is written under a temporary name and renamed, or uploaded to the store with
its manifest last, so a half-written export is never visible under its name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from wanlite import __version__
from wanlite.checkpoint.transformer_keys import (
    COMFY_PREFIX,
    arch_from_native_shapes,
    native_tensor_shapes,
    to_native,
)
from wanlite.config import EXPORT_DTYPES, PRESETS, ConfigError, Preset, WanArch, load_student_config
from wanlite.pipeline import local_path
from wanlite.sampling import HEADER_KEY, Sampling, load_sampling, teacher_sampling

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = dict(zip(EXPORT_DTYPES, (torch.bfloat16, torch.float16, torch.float32), strict=True))

SAFETENSORS_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}

EXPORT_REPORT = "export_report.json"

COMFY_CONFIG_FIELDS = (
    "model_type", "dim", "ffn_dim", "num_heads", "num_layers",
    "in_dim", "out_dim", "text_dim", "freq_dim", "text_len", "eps",
)  # fmt: skip
"""WanModel constructor arguments ComfyUI takes from the header's `config.transformer`."""


class ExportError(ValueError):
    """An export file that is unreadable, incomplete or inconsistent; the message names the file."""


@dataclass(frozen=True)
class ExportInfo:
    """What a reader learns from an export's header without loading any tensor."""

    path: Path
    arch: WanArch
    dtype: str
    prefixed: bool
    metadata: dict[str, str]


# --- inputs --------------------------------------------------------------------------


def parse_dtype(name: str) -> torch.dtype:
    """Map an export dtype name to torch, refusing anything ComfyUI's Wan model cannot run."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, found {name!r}") from None


def student_arch(student_dir: Path) -> WanArch:
    """The student's architecture from its diffusers `config.json`, validated for ComfyUI."""
    config = student_dir / "config.json"
    if not config.is_file():
        raise ConfigError(f"{student_dir}: expected a diffusers student folder with config.json, found none")
    return load_student_config(config)[0]


def load_student(student: str | Path, dtype: torch.dtype | None = None) -> tuple[Any, WanArch, Path]:
    """Load a saved student (folder or store URI); returns (model in eval mode, arch, local folder)."""
    from wanlite.student import WanLiteStudent

    student_dir = local_path(student)
    arch = student_arch(student_dir)
    model = WanLiteStudent.from_pretrained(student_dir, torch_dtype=dtype or torch.float32)
    return model.eval().requires_grad_(False), arch, student_dir


def preset_for(arch: WanArch) -> Preset | None:
    """The preset whose student has exactly this architecture, if any."""
    return next((p for p in PRESETS.values() if p.arch == arch), None)


def export_name(arch: WanArch, sampling: Sampling | None = None) -> str:
    """Default file name: the preset's (`wanlite-1024.safetensors`), else one naming the size.

    A few-step student (explicit sigmas in its sampling record) gets `-<K>step`
    (`wanlite-1024-4step.safetensors`), so both models of a run can sit in one
    ComfyUI `diffusion_models/` folder.
    """
    preset = preset_for(arch)
    stem = preset.export_name.removesuffix(".safetensors") if preset else f"wanlite-d{arch.dim}-l{arch.num_layers}"
    few_step = f"-{sampling.steps}step" if sampling is not None and sampling.sigmas is not None else ""
    return f"{stem}{few_step}.safetensors"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dir_sha256(path: Path) -> str:
    """One digest for a folder: sha256 over sorted `relpath sha256` lines of its files.

    Names are included so that renaming a shard changes the digest, and the
    store's own `_MANIFEST.json` is skipped so a stored copy hashes like the original.
    """
    lines = [
        f"{p.relative_to(path).as_posix()} {file_sha256(p)}\n"
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "_MANIFEST.json"
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# --- the file ------------------------------------------------------------------------


def comfy_config(arch: WanArch) -> dict[str, Any]:
    """The `config.transformer` header entry: WanModel kwargs ComfyUI applies over its guesses."""
    fields = {**arch.native_config(), "text_dim": arch.text_dim}
    return {k: fields[k] for k in COMFY_CONFIG_FIELDS}


def arch_from_comfy_config(cfg: Mapping[str, Any], source: str) -> WanArch:
    """Read the architecture back from a header `config.transformer` entry."""
    missing = [k for k in ("dim", "ffn_dim", "num_heads", "num_layers") if k not in cfg]
    if missing:
        raise ExportError(f"{source}: header config.transformer lacks {', '.join(missing)}")
    if cfg.get("model_type", "t2v") != "t2v":
        raise ExportError(f"{source}: header model_type: expected 't2v', found {cfg.get('model_type')!r}")
    fields = {k: cfg[k] for k in COMFY_CONFIG_FIELDS if k in cfg and k != "model_type"}
    try:
        return WanArch(**fields)
    except ConfigError as err:
        raise ExportError(f"{source}: header config.transformer: {err}") from None


def export_state_dict(
    diffusers_sd: Mapping[str, torch.Tensor], arch: WanArch, dtype: torch.dtype, *, prefix: bool = False
) -> dict[str, torch.Tensor]:
    """Native-named, contiguous, cast tensors in native order; the complete WanModel key set."""
    native = to_native(diffusers_sd, arch)
    head = COMFY_PREFIX if prefix else ""
    return {head + k: v.detach().to(dtype=dtype, device="cpu").contiguous() for k, v in native.items()}


def require_finite(tensors: Mapping[str, torch.Tensor], source: Path) -> None:
    """Refuse to export NaN or inf (also what an fp32 value too large for bf16/fp16 becomes after the cast)."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ExportError(
            f"{source}: non-finite values (NaN or inf) in {len(bad)} tensor(s): {shown}; nothing exported"
        )


def export_metadata(
    arch: WanArch,
    dtype: str,
    *,
    source_sha256: str,
    teacher_sha256: str | None = None,
    sampling: Sampling | None = None,
) -> dict[str, str]:
    """Header metadata (safetensors allows only str -> str): architecture, provenance, sampling settings."""
    meta = {
        "config": json.dumps({"transformer": comfy_config(arch)}),
        "format": "pt",
        "wanlite_version": __version__,
        "wanlite_dtype": dtype,
        "source_sha256": source_sha256,
    }
    preset = preset_for(arch)
    if preset is not None:
        meta["wanlite_preset"] = preset.name
    if teacher_sha256:
        meta["teacher_sha256"] = teacher_sha256
    if sampling is not None:
        meta[HEADER_KEY] = sampling.to_json()
    return meta


def readable_mode() -> int:
    """The mode a new file gets from the user's umask (0644 under the usual 022).

    `mkstemp` creates files 0600 whatever the umask, which a ComfyUI running as
    another user cannot read; exports and downloads are chmod-ed to this.
    """
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write next to `path` under a temporary name, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, readable_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_export(path: str | Path) -> ExportInfo:
    """Check an export by its header alone, the way ComfyUI sizes it, and return what it holds.

    Raises ExportError naming the file and the first problem: unreadable or
    truncated data, missing or extra tensors, a shape that disagrees with the
    inferred architecture, mixed dtypes, or a header config that disagrees.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such export file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{path}: not a complete safetensors file ({err})") from None
    prefixed = bool(shapes) and all(k.startswith(COMFY_PREFIX) for k in shapes)
    if prefixed:
        shapes = {k[len(COMFY_PREFIX) :]: v for k, v in shapes.items()}
    if "head.modulation" not in shapes:
        raise ExportError(f"{path}: no head.modulation tensor, so ComfyUI would not detect a Wan model")
    try:
        arch = arch_from_native_shapes(shapes, str(path))
    except ConfigError as err:
        raise ExportError(str(err)) from None
    _check_shapes(path, shapes, arch)
    dtype = _single_dtype(path, dtypes)
    if "config" in metadata:
        _check_header_config(path, metadata["config"], arch)
    return ExportInfo(path=path, arch=arch, dtype=dtype, prefixed=prefixed, metadata=metadata)


def _check_shapes(path: Path, shapes: Mapping[str, tuple[int, ...]], arch: WanArch) -> None:
    expected = native_tensor_shapes(arch)
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise ExportError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ExportError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} extra in all)")
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise ExportError(f"{path}: {key}: expected shape {list(shape)}, found {list(shapes[key])}")


def _single_dtype(path: Path, dtypes: set[str]) -> str:
    names = {SAFETENSORS_DTYPES.get(d, d) for d in dtypes}
    if len(names) != 1 or not names <= set(DTYPES):
        raise ExportError(f"{path}: expected all tensors in one of {', '.join(DTYPES)}, found {sorted(names)}")
    return names.pop()


def _check_header_config(path: Path, raw: str, arch: WanArch) -> None:
    try:
        transformer = json.loads(raw)["transformer"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ExportError(f"{path}: header 'config' is not {{\"transformer\": {{...}}}} JSON ({err!r})") from None
    declared = arch_from_comfy_config(transformer, str(path))
    if declared != arch:
        raise ExportError(f"{path}: header config.transformer {transformer} disagrees with tensor shapes {arch}")


def load_export(path: str | Path, dtype: torch.dtype | None = None) -> Any:
    """Load an export as a diffusers `WanTransformer3DModel` via stock `from_single_file`.

    diffusers guesses a hub config from the width unless given one, and a
    student's width is not a hub model's; so the config comes from the
    architecture read out of the file itself (shapes, cross-checked with the header).
    """
    from diffusers import WanTransformer3DModel

    info = read_export(path)
    with tempfile.TemporaryDirectory(prefix="wanlite-config-") as tmp:
        cfg = {"_class_name": "WanTransformer3DModel", **info.arch.diffusers_config()}
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        model = WanTransformer3DModel.from_single_file(
            str(info.path), config=tmp, torch_dtype=dtype or DTYPES[info.dtype], local_files_only=True
        )
    return model.eval().requires_grad_(False)


# --- the step ------------------------------------------------------------------------


def export_student(
    student: str | Path,
    out: str | Path | None = None,
    *,
    dtype: str = "bf16",
    prefix: bool = False,
    teacher_sha256: str | None = None,
) -> dict[str, Any]:
    """Export `student` (folder or store URI) to a ComfyUI file; return the export report.

    `out`: a `.safetensors` path, an existing directory (the preset's default
    name inside), None (the default name in the current directory), or a store
    URI (`file://…`, `s3://…`) that receives the file and `export_report.json`
    under a manifest written last. A folder that does not exist yet (a path
    without the `.safetensors` suffix) is created.

    The student's sampling record goes into the header (`wanlite_sampling`)
    and into a ComfyUI workflow written beside the file (`wanlite.workflow`).
    A student without a record (written before records existed) gets the
    teacher's settings in its workflow and nothing in its header.
    """
    from wanlite.workflow import write_workflow

    torch_dtype = parse_dtype(dtype)
    model, arch, student_dir = load_student(student)
    tensors = export_state_dict(model.state_dict(), arch, torch_dtype, prefix=prefix)
    del model
    require_finite(tensors, student_dir)
    sampling = load_sampling(student_dir)
    if sampling is None:
        log.warning("%s records no sampling settings; its workflow uses the teacher's", student_dir)
    metadata = export_metadata(
        arch, dtype, source_sha256=dir_sha256(student_dir), teacher_sha256=teacher_sha256, sampling=sampling
    )
    name = export_name(arch, sampling)
    size = preset_for(arch).image_size if preset_for(arch) else PRESETS["lite-1024"].image_size
    workflow_sampling = sampling or teacher_sampling()
    if out is not None and "://" in str(out):
        return _export_to_store(tensors, metadata, name, str(out), workflow_sampling, size)
    target = _local_target(out, name)
    write_atomic(tensors, target, metadata)
    report = _report(target, metadata)
    report["workflow"] = str(write_workflow(target, workflow_sampling, size=size))
    report["sampling"] = workflow_sampling.to_dict()
    report["sampling_recorded"] = sampling is not None
    log.info("exported %s (%s, %d tensors, sha256 %s)", target, dtype, len(tensors), report["sha256"][:12])
    return report


def _local_target(out: str | Path | None, name: str) -> Path:
    if out is None:
        return Path.cwd() / name
    text, out = str(out), Path(out)
    if out.is_dir():
        return out / name
    if out.suffix == ".safetensors" and not text.endswith(("/", os.sep)):
        return out
    if out.suffix:
        raise ConfigError(f"--out: expected a .safetensors file, a directory or a store URI, found {out}")
    if out.exists():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    out.mkdir(parents=True)
    return out / name


def _export_to_store(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str, uri: str, sampling: Sampling, size: int
) -> dict:
    from wanlite.storage import Store
    from wanlite.workflow import write_workflow

    with tempfile.TemporaryDirectory(prefix="wanlite-export-") as tmp:
        target = Path(tmp) / name
        save_file(tensors, str(target), metadata=metadata)
        location = f"{uri.rstrip('/')}/{name}"
        workflow = write_workflow(target, sampling, size=size)
        report = {**_report(target, metadata, location), "uri": location,
                  "workflow": f"{uri.rstrip('/')}/{workflow.name}", "sampling": sampling.to_dict(),
                  "sampling_recorded": HEADER_KEY in metadata}  # fmt: skip
        (Path(tmp) / EXPORT_REPORT).write_text(json.dumps(report, indent=2))
        Store.from_env(uri).put_dir(tmp, "", meta={"kind": "export", "sha256": report["sha256"]})
    return report


def _report(path: Path, metadata: dict[str, str], location: str | None = None) -> dict[str, Any]:
    """Re-read the written file by header and describe it; raises if it is not a valid export.

    `location` is where readers will find the file when that is not `path` (a store URI).
    """
    info = read_export(path)
    return {
        "kind": "export",
        "passed": True,
        "file": path.name,
        "path": location or str(path),
        "sha256": file_sha256(path),
        "size": path.stat().st_size,
        "dtype": info.dtype,
        "prefixed": info.prefixed,
        "arch": comfy_config(info.arch),
        "num_tensors": len(native_tensor_shapes(info.arch)),
        "num_params": info.arch.num_params(),
        "metadata": {k: v for k, v in metadata.items() if k != "config"},
        "wanlite_version": __version__,
    }
