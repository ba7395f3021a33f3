"""Check a Wan 2.2 T2V-A14B teacher checkpoint by its headers, without reading weights.

A teacher is ~130 GB; a bad shard found an hour into projection or distillation
wastes a GPU node. Every later step trusts what this module checked: every file
is present, every tensor has the name, shape and dtype its config implies, the
shard index agrees with the shards, no file is truncated, and the parts fit
together (T5 width = the experts' text_dim, VAE z_dim = their in_dim).

Only headers are read: safetensors files by their 8-byte length + JSON header
(so a 10 GB shard costs one small read, and sparse synthetic shards work),
`.pth` files with `torch.load(weights_only=True, mmap=True)`, which maps the
storages without touching them and refuses any pickled object that is not a
tensor or plain container, so a malicious checkpoint is never executed.

Problems are collected, not raised, so one run lists everything to fix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from wanlite.checkpoint.components import (
    WAN21_VAE,
    T5Arch,
    VaeArch,
    t5_hf_config,
    t5_native_shapes,
    t5_native_to_hf,
    vae_diffusers_config,
    vae_native_shapes,
    vae_native_to_diffusers_names,
)
from wanlite.checkpoint.layout import (
    DIFFUSERS_EXPERTS,
    EXPERT_CONFIG,
    EXPERT_DIRS,
    MODEL_INDEX,
    NATIVE_T5,
    NATIVE_TOKENIZER,
    NATIVE_VAE,
    LayoutError,
    detect_layout,
    is_shard_name,
)
from wanlite.checkpoint.transformer_keys import arch_from_native_shapes, native_tensor_shapes, native_to_diffusers_names
from wanlite.config import BOUNDARY_RATIO, ConfigError, WanArch

log = logging.getLogger(__name__)

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
"""safetensors dtype codes and their item sizes (the format's own table)."""

FLOAT_DTYPES = ("F32", "BF16", "F16")
"""What a Wan weight may be stored in; anything else cannot be a trained weight."""

TORCH_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}

MAX_HEADER_BYTES = 100_000_000
"""safetensors refuses headers above 100 MB; a larger length prefix means a corrupt file."""

WEIGHTS_BASE = "diffusion_pytorch_model"
TEXT_ENCODER_BASE = "model"
REPORT_JSON = "validation.json"
REPORT_MD = "validation.md"

# Which tensor reveals each shape field, so a config/tensor disagreement can cite its evidence.
_EVIDENCE = {
    "dim": "head.modulation",
    "ffn_dim": "blocks.0.ffn.0.weight",
    "in_dim": "patch_embedding.weight",
    "out_dim": "head.head.weight",
    "text_dim": "text_embedding.0.weight",
    "freq_dim": "time_embedding.0.weight",
}
_SHAPE_FIELDS = ("dim", "ffn_dim", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim")
_DIFFUSERS_FIELD = {"dim": "num_attention_heads*attention_head_dim", "in_dim": "in_channels", "out_dim": "out_channels"}
_T5_CONFIG_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
)  # fmt: skip
_ARCH_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim")
_TIED_T5 = ("shared.weight", "encoder.embed_tokens.weight")
"""HF ties these; a saved UMT5 encoder may carry either or both."""
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_T5_HF_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.")


# --- report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong, phrased so the user can find and fix it without reading code."""

    file: str
    key: str
    expected: str
    found: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: expected {self.expected}, found {self.found}"


@dataclass
class ComponentReport:
    """What was found for one part of the teacher (an expert, T5, VAE, tokenizer)."""

    path: str
    tensors: int = 0
    params: int = 0
    bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    arch: dict[str, Any] | None = None


@dataclass
class ValidationReport:
    """The outcome of `validate_teacher`; `ok` only when no problem was found."""

    teacher_dir: str
    layout: str | None = None
    components: dict[str, ComponentReport] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher_dir": self.teacher_dir,
            "layout": self.layout,
            "valid": self.ok,
            "components": {name: asdict(c) for name, c in self.components.items()},
            "problems": [asdict(p) for p in self.problems],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        lines = [
            f"# Teacher validation: {'VALID' if self.ok else 'INVALID'}",
            "",
            f"- teacher: `{self.teacher_dir}`",
            f"- layout: {self.layout or 'unknown'}",
            f"- problems: {len(self.problems)}",
            "",
            "| component | path | tensors | parameters | dtypes | bytes | architecture |",
            "|---|---|---:|---:|---|---:|---|",
        ]
        for name, c in self.components.items():
            dtypes = ", ".join(f"{d} x{n}" for d, n in c.dtypes.items()) or "-"
            arch = ", ".join(f"{k} {v}" for k, v in (c.arch or {}).items()) or "-"
            lines.append(f"| {name} | `{c.path}` | {c.tensors} | {c.params:,} | {dtypes} | {c.bytes:,} | {arch} |")
        if self.problems:
            lines += ["", "## Problems", ""] + [f"- {p}" for p in self.problems]
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        """Short human text for the terminal: one line per component, then every problem."""
        head = f"{self.teacher_dir}: {self.layout or 'unknown'} layout, " + (
            "valid" if self.ok else f"INVALID ({len(self.problems)} problem(s))"
        )
        parts = [
            f"  {n}: {c.tensors} tensors, {c.params:,} params, {c.bytes:,} bytes" for n, c in self.components.items()
        ]
        return "\n".join([head, *parts, *(f"  PROBLEM {p}" for p in self.problems)])

    def write(self, report_dir: str | Path) -> tuple[Path, Path]:
        """Write validation.md then validation.json (the machine-read one last, each atomically)."""
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        md, js = out / REPORT_MD, out / REPORT_JSON
        _write_atomic(md, self.to_markdown())
        _write_atomic(js, self.to_json() + "\n")
        return js, md


def _write_atomic(path: Path, text: str) -> None:
    """A reader never sees half a report: write a sibling temp file, then rename it over."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


# --- collecting problems ---------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as its file's header describes it; the data itself is never read."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 0)


@dataclass
class _Weights:
    """Tensors of one safetensors folder; `unavailable` = names the index puts in unreadable shards."""

    tensors: dict[str, TensorInfo]
    files: list[Path]
    index: Path | None
    unavailable: set[str] = field(default_factory=set)


class _Checker:
    """Accumulates problems and component summaries, with paths relative to the teacher root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.report = ValidationReport(teacher_dir=str(root))

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root)) or "."
        except ValueError:
            return str(path)

    def problem(self, path: Path, key: str, expected: str, found: Any) -> Problem:
        return Problem(self.rel(path), key, expected, str(found))

    def add(self, path: Path, key: str, expected: str, found: Any) -> None:
        self.report.problems.append(self.problem(path, key, expected, found))

    def component(self, name: str, path: Path) -> ComponentReport:
        comp = ComponentReport(path=self.rel(path))
        self.report.components[name] = comp
        return comp


def _summarise(comp: ComponentReport, tensors: Iterable[TensorInfo], files: Iterable[Path]) -> None:
    tensors = list(tensors)
    comp.tensors = len(tensors)
    comp.params = sum(t.numel for t in tensors)
    comp.dtypes = dict(Counter(t.dtype for t in tensors).most_common())
    comp.bytes = sum(f.stat().st_size for f in files if f.is_file())


# --- public entry point ----------------------------------------------------------------


def validate_teacher(teacher_dir: str | Path) -> ValidationReport:
    """Validate a local teacher directory (native or diffusers layout); never raises on bad content.

    Raises FileNotFoundError only when `teacher_dir` is not a directory at all.
    """
    root = Path(teacher_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: expected a teacher checkpoint directory, found no such directory")
    chk = _Checker(root)
    layout = _layout(chk, root)
    chk.report.layout = layout
    if layout == "native":
        _validate_native(chk, root)
    elif layout == "diffusers":
        _validate_diffusers(chk, root)
    log.info("validated %s: %s layout, %d problem(s)", root, layout, len(chk.report.problems))
    return chk.report


def _layout(chk: _Checker, root: Path) -> str | None:
    """The layout, or None after recording why it is unknown.

    A native checkpoint missing one expert folder fails `detect_layout`; it is still
    validated as native (when it has native parts and no model_index.json), so the
    user learns exactly which folder is missing instead of "unknown layout".
    """
    try:
        return detect_layout(root)
    except LayoutError as err:
        native_parts = [*EXPERT_DIRS, NATIVE_T5, NATIVE_VAE]
        if not (root / MODEL_INDEX).exists() and any((root / p).exists() for p in native_parts):
            return "native"
        chk.add(root, "layout", "a native or diffusers Wan 2.2 T2V-A14B checkpoint", str(err))
        return None


def _validate_native(chk: _Checker, root: Path) -> None:
    configs = {name: root / name / EXPERT_CONFIG for name in EXPERT_DIRS}
    archs = {name: _check_expert(chk, name, root / name, "native") for name in EXPERT_DIRS}
    t5 = _check_pth(chk, root / NATIVE_T5, _T5_PTH)
    vae = _check_pth(chk, root / NATIVE_VAE, _VAE_PTH)
    _check_tokenizer(chk, root / NATIVE_TOKENIZER, t5.vocab if t5 else None)
    _check_consistency(chk, archs, configs, (t5, root / NATIVE_T5), (vae, root / NATIVE_VAE))


def _validate_diffusers(chk: _Checker, root: Path) -> None:
    _check_model_index(chk, root / MODEL_INDEX)
    configs = {name: root / DIFFUSERS_EXPERTS[name] / EXPERT_CONFIG for name in EXPERT_DIRS}
    archs = {name: _check_expert(chk, name, root / DIFFUSERS_EXPERTS[name], "diffusers") for name in EXPERT_DIRS}
    t5 = _check_t5_diffusers(chk, root / "text_encoder")
    vae = _check_vae_diffusers(chk, root / "vae")
    _check_tokenizer(chk, root / "tokenizer", t5.vocab if t5 else None)
    scheduler = root / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        chk.add(scheduler, "", "the scheduler config of a WanPipeline", "no such file")
    _check_consistency(chk, archs, configs, (t5, root / "text_encoder"), (vae, root / "vae"))


# --- safetensors headers ---------------------------------------------------------------


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict, bytes of tensor data the file actually holds); reads only the header.

    Raises ValueError naming the file when the header itself is cut or not JSON.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: expected an 8-byte header length, found a {size}-byte file")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise ValueError(
                f"{path}: expected a JSON header of at most {MAX_HEADER_BYTES} bytes, found a length prefix of "
                f"{length} bytes (corrupt or not safetensors)"
            )
        if 8 + length > size:
            raise ValueError(
                f"{path}: expected a {length}-byte JSON header, found only {size - 8} bytes after the "
                "length prefix (file truncated or not safetensors)"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: expected a JSON safetensors header, found unparsable bytes ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: expected a JSON object as safetensors header, found {type(header).__name__}")
    return header, size - 8 - length


def _read_header(chk: _Checker, path: Path) -> dict[str, TensorInfo] | None:
    """Tensors of one safetensors file, recording every header or size inconsistency."""
    try:
        header, data_len = read_safetensors_header(path)
    except ValueError as err:
        chk.add(path, "header", "a complete safetensors header", str(err).removeprefix(f"{path}: "))
        return None
    header.pop("__metadata__", None)
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        info = _tensor_entry(chk, path, name, entry)
        if info is None:
            continue
        begin, end = entry["data_offsets"]
        if end - begin != info.nbytes:
            chk.add(path, name, f"{info.nbytes} bytes for {info.dtype} {list(info.shape)}", f"{end - begin} bytes")
        tensors[name] = info
        spans.append((begin, end, name))
    _check_spans(chk, path, sorted(spans), data_len)
    return tensors


def _tensor_entry(chk: _Checker, path: Path, name: str, entry: Any) -> TensorInfo | None:
    expected = "an entry {dtype, shape, data_offsets} with a known dtype"
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        ok = dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
        ok = ok and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        chk.add(path, name, expected, json.dumps(entry)[:200])
        return None
    return TensorInfo(name, dtype, tuple(shape), path)


def _check_spans(chk: _Checker, path: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """Truncation, gaps and overlaps, from data offsets vs file size: no data is read."""
    beyond = [name for _, end, name in spans if end > data_len]
    if beyond:
        chk.add(
            path,
            "data_offsets",
            f"{max(e for _, e, _ in spans)} bytes of tensor data (as the header says)",
            f"{data_len} bytes: file truncated, {len(beyond)} tensor(s) lie past its end, e.g. {beyond[0]!r}",
        )
        return
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else f"leaves a {begin - cursor}-byte gap"
            chk.add(path, name, f"data starting at byte {cursor}", f"data at {begin} ({what})")
        cursor = max(cursor, end)
    if cursor != data_len:
        chk.add(path, "data_offsets", f"{cursor} bytes of tensor data", f"{data_len} bytes (trailing garbage)")


def _read_weights(chk: _Checker, folder: Path, base: str) -> _Weights | None:
    """Tensors of a diffusers/HF weights folder: sharded with an index, or one file."""
    index = folder / f"{base}.safetensors.index.json"
    single = folder / f"{base}.safetensors"
    if index.is_file():
        return _read_sharded(chk, folder, index)
    if single.is_file():
        tensors = _read_header(chk, single)
        return None if tensors is None else _Weights(tensors, [single], None)
    chk.add(folder, "", f"{single.name} or {index.name}", "neither file")
    return None


def _read_sharded(chk: _Checker, folder: Path, index: Path) -> _Weights | None:
    weight_map, total_size = _read_index(chk, index)
    if weight_map is None:
        return None
    weights = _Weights({}, [index], index)
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        named = [n for n, s in weight_map.items() if s == shard]
        if not path.is_file():
            expected = f"shard file {shard} holding {len(named)} tensor(s), e.g. {named[0]!r}"
            chk.add(index, f"weight_map -> {shard}", expected, "no such file")
            weights.unavailable.update(named)
            continue
        weights.files.append(path)
        tensors = _read_header(chk, path)
        if tensors is None:
            weights.unavailable.update(named)
            continue
        _match_shard(chk, path, shard, tensors, weight_map, weights)
    for name, shard in weight_map.items():
        if name not in weights.tensors and name not in weights.unavailable:
            chk.add(index, name, f"a tensor stored in {shard} (as weight_map says)", f"{shard} has no tensor {name!r}")
            weights.unavailable.add(name)
    _check_orphan_shards(chk, folder, index, set(weight_map.values()))
    actual = sum(t.nbytes for t in weights.tensors.values())
    if total_size is not None and not weights.unavailable and total_size != actual:
        chk.add(index, "metadata.total_size", f"{actual} (the bytes of all tensors in the shards)", total_size)
    return weights


def _read_index(chk: _Checker, index: Path) -> tuple[dict[str, str] | None, int | None]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of shard file names")
    except (OSError, ValueError, KeyError, TypeError) as err:
        chk.add(index, "weight_map", "a JSON index {metadata, weight_map: {tensor: shard}}", f"unreadable ({err})")
        return None, None
    escaping = sorted({shard for shard in weight_map.values() if not is_shard_name(shard)})
    for shard in escaping:
        chk.add(index, f"weight_map -> {shard}", f"a shard file name inside {index.parent}", "a path outside it")
    if escaping:
        return None, None
    total = data.get("metadata", {}).get("total_size") if isinstance(data.get("metadata"), dict) else None
    return weight_map, total


def _match_shard(
    chk: _Checker, path: Path, shard: str, tensors: dict[str, TensorInfo], weight_map: dict[str, str], out: _Weights
) -> None:
    for name, info in tensors.items():
        listed = weight_map.get(name)
        if listed == shard:
            out.tensors[name] = info
        elif listed is None:
            chk.add(path, name, "only tensors the index's weight_map names", "a tensor the index does not list")
        else:
            chk.add(path, name, f"this tensor only in {listed} (as weight_map says)", f"a copy in {shard}")


def _check_orphan_shards(chk: _Checker, folder: Path, index: Path, listed: set[str]) -> None:
    base = index.name.removesuffix(".index.json").removesuffix(".safetensors")
    for path in sorted(folder.glob(f"{base}*.safetensors")):
        if path.name not in listed:
            chk.add(path, "", f"only shards named in {index.name}", "a shard the index does not list")


# --- dtypes and shapes -----------------------------------------------------------------


def _check_dtypes(chk: _Checker, tensors: Iterable[TensorInfo]) -> str | None:
    """One floating dtype per component; return it, flag every tensor that differs."""
    tensors = list(tensors)
    counts = Counter(t.dtype for t in tensors if t.dtype in FLOAT_DTYPES)
    main = counts.most_common(1)[0][0] if counts else None
    for t in tensors:
        if t.dtype not in FLOAT_DTYPES:
            chk.add(t.file, t.name, f"a floating dtype ({'/'.join(FLOAT_DTYPES)})", t.dtype)
        elif t.dtype != main:
            chk.add(t.file, t.name, f"{main}, the dtype of the other {counts[main]} tensors", t.dtype)
    return main


def _shape_problems(
    chk: _Checker,
    found: Mapping[str, TensorInfo],
    expected: Mapping[str, tuple[int, ...]],
    *,
    missing_in: Path,
    what: str,
    display: Callable[[str], str] = str,
    skip_missing: Iterable[str] = (),
) -> list[Problem]:
    """Missing, unexpected and wrongly shaped tensors, named as the file names them."""
    skip = set(skip_missing)
    problems = [
        chk.problem(missing_in, display(name), f"a tensor of shape {list(shape)} ({what})", "no such tensor")
        for name, shape in expected.items()
        if name not in found and name not in skip
    ]
    for name, info in found.items():
        if name not in expected:
            found_as = f"unexpected {info.dtype} {list(info.shape)}"
            problems.append(chk.problem(info.file, info.name, f"only tensors of {what}", found_as))
        elif info.shape != tuple(expected[name]):
            want = f"shape {list(expected[name])} ({what})"
            problems.append(chk.problem(info.file, info.name, want, f"shape {list(info.shape)}"))
    return problems


def _meta(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Meta tensors: lets the state-dict converters rename shapes without allocating memory."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


# --- experts ---------------------------------------------------------------------------


def _check_expert(chk: _Checker, name: str, folder: Path, layout: str) -> WanArch | None:
    """Config, every tensor's name/shape/dtype, and index/shard consistency of one expert."""
    comp = chk.component(name, folder)
    if not folder.is_dir():
        chk.add(folder, "", f"the {name} expert folder ({EXPERT_CONFIG} + safetensors shards)", "no such folder")
        return None
    config = folder / EXPERT_CONFIG
    arch = _read_wan_config(chk, config, layout)
    weights = _read_weights(chk, folder, WEIGHTS_BASE)
    if weights is None:
        return arch
    _summarise(comp, weights.tensors.values(), [config, *weights.files])
    _check_dtypes(chk, weights.tensors.values())
    if arch is None:
        return None
    native, unavailable, display = _native_view(chk, weights, arch, layout)
    arch = _check_wan_tensors(chk, config, native, unavailable, arch, display, layout, weights.index or folder)
    comp.arch = {f: getattr(arch, f) for f in _ARCH_FIELDS}
    log.info("checked expert %s: %d tensors", name, len(native))
    return arch


def _read_wan_config(chk: _Checker, path: Path, layout: str) -> WanArch | None:
    cfg = _read_json(chk, path, "the expert's model config")
    if cfg is None:
        return None
    try:
        if layout == "native":
            return WanArch.from_native_config(cfg, chk.rel(path))
        if cfg.get("_class_name") != "WanTransformer3DModel":
            chk.add(path, "_class_name", "'WanTransformer3DModel'", repr(cfg.get("_class_name")))
        return WanArch.from_diffusers_config(cfg, chk.rel(path))
    except ConfigError as err:
        chk.add(path, "config", "a Wan T2V transformer config", str(err).removeprefix(f"{chk.rel(path)}: "))
        return None


def _read_json(chk: _Checker, path: Path, what: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        chk.add(path, "", what, "no such file")
        return None
    except (OSError, ValueError) as err:
        chk.add(path, "", f"{what} as JSON", f"unreadable ({err})")
        return None
    if not isinstance(data, dict):
        chk.add(path, "", f"{what} as a JSON object", type(data).__name__)
        return None
    return data


def _native_view(
    chk: _Checker, weights: _Weights, arch: WanArch, layout: str
) -> tuple[dict[str, TensorInfo], set[str], Callable[[str], str]]:
    """Tensors keyed by native name, plus how to show a native name the way the file spells it."""
    if layout == "native":
        return weights.tensors, weights.unavailable, str
    layers = [int(m.group(1)) for n in (*weights.tensors, *weights.unavailable) if (m := _BLOCK_RE.match(n))]
    wide = arch.replace(num_layers=max([arch.num_layers - 1, *layers]) + 1)
    to_native = {v: k for k, v in native_to_diffusers_names(wide).items()}
    native: dict[str, TensorInfo] = {}
    for name, info in weights.tensors.items():
        if name in to_native:
            native[to_native[name]] = info
        else:
            found = f"unknown {info.dtype} {list(info.shape)}"
            chk.add(info.file, name, "only tensors of a diffusers WanTransformer3DModel", found)
    unavailable = {to_native[n] for n in weights.unavailable if n in to_native}
    to_file = native_to_diffusers_names(wide)
    return native, unavailable, lambda n: to_file.get(n, n)


def _check_wan_tensors(
    chk: _Checker,
    config: Path,
    native: dict[str, TensorInfo],
    unavailable: set[str],
    arch: WanArch,
    display: Callable[[str], str],
    layout: str,
    missing_in: Path,
) -> WanArch:
    """Check tensors against the config; when the tensors consistently imply other dims, say so.

    A config that disagrees with its tensors would flag hundreds of shapes; naming the
    config field (with the tensors' evidence) and checking the tensors against the
    dims they imply gives the one actionable message instead. Returns the architecture
    the tensors really have, so the cross-component checks compare real shapes.
    """

    def check(a: WanArch) -> list[Problem]:
        what = f"a Wan model with dim {a.dim}, ffn_dim {a.ffn_dim}, {a.num_layers} layers"
        expected = native_tensor_shapes(a)
        return _shape_problems(
            chk, native, expected, missing_in=missing_in, what=what, display=display, skip_missing=unavailable
        )

    problems = check(arch)
    implied = _implied_arch(native)
    if problems and implied is not None:
        diff = [f for f in _SHAPE_FIELDS if getattr(arch, f) != getattr(implied, f)]
        implied_problems = check(implied.replace(patch_size=arch.patch_size)) if diff else problems
        if diff and len(implied_problems) < len(problems):
            for f in diff:
                label = _DIFFUSERS_FIELD.get(f, f) if layout == "diffusers" else f
                expected = f"{getattr(implied, f)}, as the tensors imply ({_evidence(f, native, display)})"
                chk.add(config, label, expected, getattr(arch, f))
            problems = implied_problems
            arch = implied if implied.dim % arch.num_heads else arch.replace(**{f: getattr(implied, f) for f in diff})
    chk.report.problems.extend(problems)
    return arch


def _implied_arch(native: Mapping[str, TensorInfo]) -> WanArch | None:
    try:
        return arch_from_native_shapes({k: t.shape for k, t in native.items()})
    except (ConfigError, IndexError, ValueError):
        return None


def _evidence(field_name: str, native: Mapping[str, TensorInfo], display: Callable[[str], str]) -> str:
    if field_name == "num_layers":
        return f"blocks 0..{max(int(m.group(1)) for n in native if (m := _BLOCK_RE.match(n)))} present"
    name = _EVIDENCE[field_name]
    return f"{display(name)} is {list(native[name].shape)}"


# --- T5, VAE, tokenizer ----------------------------------------------------------------


def _load_pth(chk: _Checker, path: Path) -> dict[str, TensorInfo] | None:
    """Shapes and dtypes of a torch.save'd state dict, never unpickling anything but tensors."""
    if not path.is_file():
        chk.add(path, "", "a torch.save'd state dict", "no such file")
        return None
    try:
        state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        match = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|$)", str(err), re.M)
        reason = match.group(1) if match else str(err).splitlines()[0]
        found = f"non-tensor objects; refused without loading them ({reason})"
        chk.add(path, "", "a state dict of tensors (torch.load weights_only=True)", found)
        return None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        chk.add(path, "", "a torch.save zip archive of tensors", f"unreadable ({str(err).splitlines()[0]})")
        return None
    if not isinstance(state, Mapping):
        chk.add(path, "", "a dict of tensors", f"a {type(state).__name__}")
        return None
    tensors = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            dtype = TORCH_DTYPES.get(value.dtype, str(value.dtype))
            tensors[str(name)] = TensorInfo(str(name), dtype, tuple(value.shape), path)
        else:
            chk.add(path, str(name), "a tensor", f"non-tensor object of type {type(value).__name__}")
    return tensors


@dataclass(frozen=True)
class _PthKind:
    """What a native `.pth` component should hold, and how to size it from its own shapes."""

    component: str
    arch_from_shapes: Callable[[dict[str, tuple[int, ...]]], Any]
    expected_shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    expected: str
    what: str


_T5_PTH = _PthKind(
    "t5", T5Arch.from_native_shapes, t5_native_shapes,
    "a native umT5 encoder state dict (token_embedding, blocks.N.*, norm)", "a umT5 encoder",
)  # fmt: skip
_VAE_PTH = _PthKind(
    "vae", VaeArch.from_native_shapes, vae_native_shapes,
    "a native Wan 2.1 VAE state dict (encoder.*, conv1, conv2, decoder.*)", "a Wan 2.1 VAE",
)  # fmt: skip


def _check_pth(chk: _Checker, path: Path, kind: _PthKind) -> Any:
    """Check a native T5 or VAE `.pth` (loaded safely) against the table its own shapes imply."""
    comp = chk.component(kind.component, path)
    tensors = _load_pth(chk, path)
    if tensors is None:
        return None
    _summarise(comp, tensors.values(), [path])
    _check_dtypes(chk, tensors.values())
    try:
        arch = kind.arch_from_shapes(_shapes(tensors))
    except (KeyError, ValueError, IndexError) as err:
        chk.add(path, "", kind.expected, f"other tensors ({err})")
        return None
    comp.arch = asdict(arch)
    expected = kind.expected_shapes(arch)
    chk.report.problems.extend(_shape_problems(chk, tensors, expected, missing_in=path, what=kind.what))
    return arch


def _check_t5_diffusers(chk: _Checker, folder: Path) -> T5Arch | None:
    comp = chk.component("t5", folder)
    cfg = _read_json(chk, folder / "config.json", "the text encoder's UMT5 config")
    weights = _read_weights(chk, folder, TEXT_ENCODER_BASE)
    if weights is None:
        return None
    _summarise(comp, weights.tensors.values(), [folder / "config.json", *weights.files])
    _check_dtypes(chk, weights.tensors.values())
    layers = 1 + max((int(m.group(1)) for n in weights.tensors if (m := _T5_HF_BLOCK_RE.match(n))), default=-1)
    to_native = _t5_hf_to_native_names(layers)
    try:
        arch = T5Arch.from_native_shapes({to_native[k]: t.shape for k, t in weights.tensors.items() if k in to_native})
    except (KeyError, ValueError, IndexError) as err:
        chk.add(folder, "", "a UMT5 encoder state dict (shared, encoder.block.N.*)", f"other tensors ({err})")
        return None
    comp.arch = asdict(arch)
    expected = _shapes(t5_native_to_hf(_meta(t5_native_shapes(arch))))
    tied = [k for k in _TIED_T5 if k in weights.tensors] or [_TIED_T5[0]]
    expected = {k: s for k, s in expected.items() if k not in _TIED_T5 or k in tied}
    _extend_folder_problems(chk, weights, folder, expected, "a UMT5 encoder")
    if cfg is not None:
        _compare_config(chk, folder / "config.json", cfg, t5_hf_config(arch).to_dict(), _T5_CONFIG_FIELDS)
    return arch


@lru_cache(maxsize=4)
def _t5_hf_to_native_names(num_layers: int) -> dict[str, str]:
    """UMT5EncoderModel name -> native name; names depend only on the depth, so probe a 1-wide encoder."""
    probe = T5Arch(vocab=1, dim=1, dim_attn=1, dim_ffn=1, num_heads=1, num_layers=max(num_layers, 1))
    meta = _meta(t5_native_shapes(probe))
    ident = {id(t): k for k, t in meta.items()}
    return {hf: ident[id(t)] for hf, t in t5_native_to_hf(meta).items()}


def _check_vae_diffusers(chk: _Checker, folder: Path) -> VaeArch | None:
    comp = chk.component("vae", folder)
    cfg = _read_json(chk, folder / "config.json", "the AutoencoderKLWan config")
    weights = _read_weights(chk, folder, WEIGHTS_BASE)
    if weights is None:
        return None
    _summarise(comp, weights.tensors.values(), [folder / "config.json", *weights.files])
    _check_dtypes(chk, weights.tensors.values())
    # Tensor names do not depend on the width, so the full-size map names the width-bearing tensors.
    to_native = {v: k for k, v in vae_native_to_diffusers_names(WAN21_VAE).items()}
    try:
        arch = VaeArch.from_native_shapes({to_native[k]: t.shape for k, t in weights.tensors.items() if k in to_native})
    except (KeyError, ValueError, IndexError) as err:
        expected = "an AutoencoderKLWan state dict (encoder.conv_in, post_quant_conv, ...)"
        chk.add(folder, "", expected, f"other tensors ({err})")
        return None
    comp.arch = asdict(arch)
    expected = {diff: vae_native_shapes(arch)[nat] for nat, diff in vae_native_to_diffusers_names(arch).items()}
    _extend_folder_problems(chk, weights, folder, expected, "a Wan 2.1 VAE")
    if cfg is not None:
        expected_cfg = vae_diffusers_config(arch)
        _compare_config(chk, folder / "config.json", cfg, expected_cfg, tuple(expected_cfg))
    return arch


def _extend_folder_problems(
    chk: _Checker, weights: _Weights, folder: Path, expected: Mapping[str, tuple[int, ...]], what: str
) -> None:
    missing_in = weights.index or folder
    problems = _shape_problems(
        chk, weights.tensors, expected, missing_in=missing_in, what=what, skip_missing=weights.unavailable
    )
    chk.report.problems.extend(problems)


def _compare_config(
    chk: _Checker, path: Path, cfg: Mapping[str, Any], implied: Mapping[str, Any], fields: Iterable[str]
) -> None:
    """Flag config fields that disagree with what the tensors imply (JSON turns tuples into lists)."""
    for key in fields:
        want = implied.get(key)
        got = cfg.get(key)
        if isinstance(want, tuple):
            want = list(want)
        if got != want:
            chk.add(path, key, f"{want!r}, as the tensors imply", repr(got))


def _check_tokenizer(chk: _Checker, folder: Path, t5_vocab: int | None) -> None:
    from transformers import AutoTokenizer

    comp = chk.component("tokenizer", folder)
    if not folder.is_dir():
        chk.add(folder, "", "the umT5 tokenizer folder", "no such folder")
        return
    files = {p.name for p in folder.iterdir()}
    if "tokenizer_config.json" not in files:
        chk.add(folder, "tokenizer_config.json", "a tokenizer config file", "no such file")
    if not files & {"spiece.model", "tokenizer.json"}:
        chk.add(folder, "spiece.model", "spiece.model or tokenizer.json (the umT5 vocabulary)", "neither file")
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - any loader failure means "unusable tokenizer", which is the finding
        chk.add(folder, "", "a tokenizer AutoTokenizer.from_pretrained can load", f"{type(err).__name__}: {err}")
        return
    vocab = len(tokenizer)
    comp.arch = {"class": type(tokenizer).__name__, "vocab_size": vocab}
    comp.bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if t5_vocab is not None and vocab > t5_vocab:
        chk.add(folder, "vocab size", f"at most {t5_vocab} (rows of the T5 token embedding)", vocab)


def _check_model_index(chk: _Checker, path: Path) -> None:
    index = _read_json(chk, path, "the WanPipeline model index")
    if index is None:
        return
    if index.get("_class_name") != "WanPipeline":
        chk.add(path, "_class_name", "'WanPipeline'", repr(index.get("_class_name")))
    if index.get("boundary_ratio") != BOUNDARY_RATIO:
        found = repr(index.get("boundary_ratio"))
        chk.add(path, "boundary_ratio", f"{BOUNDARY_RATIO} (Wan 2.2 A14B expert switch)", found)


def _check_consistency(
    chk: _Checker,
    archs: Mapping[str, WanArch | None],
    configs: Mapping[str, Path],
    t5: tuple[T5Arch | None, Path],
    vae: tuple[VaeArch | None, Path],
) -> None:
    """The parts must fit: identical experts, T5 width = text_dim, VAE latent channels = in_dim."""
    high, low = (archs[name] for name in EXPERT_DIRS)
    if high is not None and low is not None and high != low:
        high_config, low_config = (configs[name] for name in EXPERT_DIRS)
        for f in (*_ARCH_FIELDS, "eps"):
            if getattr(high, f) != getattr(low, f):
                chk.add(low_config, f, f"{getattr(high, f)}, as in {chk.rel(high_config)}", getattr(low, f))
    expert = high or low
    if expert is None:
        return
    (t5_arch, t5_path), (vae_arch, vae_path) = t5, vae
    if t5_arch is not None and t5_arch.dim != expert.text_dim:
        chk.add(t5_path, "dim", f"{expert.text_dim} (the experts' text_dim)", t5_arch.dim)
    if vae_arch is not None and vae_arch.z_dim != expert.in_dim:
        chk.add(vae_path, "z_dim", f"{expert.in_dim} (the experts' in_dim)", vae_arch.z_dim)
