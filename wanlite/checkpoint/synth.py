"""Synthetic Wan 2.2 T2V-A14B teachers in the real layouts, with random weights.

No model hub is reachable from CI, so every test and the laptop demo run on a
teacher we generate: the same files, names, formats and (for `a14b`) shapes as
`Wan-AI/Wan2.2-T2V-A14B` (native layout) or its `-Diffusers` twin
(WAN_FORMATS.md §1, §6). Weights are random but sane, so a tiny teacher gives
finite outputs through every component.

Each tensor is drawn from its own generator, seeded from (seed, component, name),
so any tensor can be produced alone, in any order, in row chunks. That is what
lets the `a14b` size stream 126 GB to disk one chunk at a time, and what makes
the two layouts of one seed hold the very same weights.

dtypes follow the official files: experts fp32 (six ~10 GB shards for 14.3B
parameters can only be fp32), T5 bf16 (its file name says so), VAE fp32 (508 MB
for 127M parameters). The tiny teacher keeps fp32 experts too, so readers and
validators exercise the dtype the real checkpoint has; it stays ~50 MB.

`--sparse` (a14b, native only) writes every file with valid headers and seeks
over the tensor data, so the ~126 GB apparent set takes a few MB of disk and
seconds; its tensors read back as zeros.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from tqdm import tqdm

from wanlite.checkpoint import layout as L
from wanlite.checkpoint.components import (
    UMT5_XXL,
    WAN21_VAE,
    T5Arch,
    VaeArch,
    t5_hf_config,
    t5_native_shapes,
    t5_native_to_hf,
    vae_diffusers_config,
    vae_native_shapes,
    vae_native_to_diffusers,
)
from wanlite.checkpoint.tokenizer import VOCAB_SIZE, build_tokenizer
from wanlite.checkpoint.transformer_keys import native_tensor_shapes, to_diffusers
from wanlite.config import A14B, BOUNDARY_RATIO, TEACHER_SIZES, TINY_TEACHER, WanArch

log = logging.getLogger(__name__)

Size = Literal["tiny", "a14b"]

TINY_T5 = T5Arch(vocab=VOCAB_SIZE, dim=4096, dim_attn=64, dim_ffn=64, num_heads=2, num_layers=2)
"""dim must be the real 4096 (the experts' text_dim); everything else is shrunk."""
TINY_VAE = VaeArch(base_dim=8, z_dim=16)
"""z_dim stays 16 (the experts' in/out channels); the width drops from 96 to 8."""

EXPERT_DTYPE = torch.float32
T5_DTYPE = torch.bfloat16
VAE_DTYPE = torch.float32
DEFAULT_SHARD_BYTES = 10 * 10**9
"""diffusers' default "10GB": six shards per A14B expert, like the official checkpoint."""

DIFFUSERS_FLOW_SHIFT = 3.0
"""What the hub's Wan 2.2 `-Diffusers` scheduler_config.json reportedly carries (WAN_FORMATS §6).
wanlite's own sampler sets the native shift 12 itself, so this only mirrors the input format."""

_CHUNK_ELEMENTS = 1 << 24  # rows are generated in chunks of at most this many values (64 MB fp32)
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass(frozen=True)
class TeacherSize:
    """Shapes and shard size of one synthetic teacher size."""

    expert: WanArch
    t5: T5Arch
    vae: VaeArch
    max_shard_bytes: int


SIZES: dict[str, TeacherSize] = {
    # 8 MB shards cut each ~18 MB tiny expert into three, so sharding is always exercised.
    "tiny": TeacherSize(TINY_TEACHER, TINY_T5, TINY_VAE, 8 * 2**20),
    "a14b": TeacherSize(A14B, UMT5_XXL, WAN21_VAE, DEFAULT_SHARD_BYTES),
}
assert tuple(SIZES) == TEACHER_SIZES, "the CLI's --size choices live in config.TEACHER_SIZES"


# --- deterministic random weights ------------------------------------------------------------


class SynthTensors(Mapping[str, torch.Tensor]):
    """The random weights of one component, generated lazily, one tensor at a time.

    A `Mapping` so it can be handed to anything that takes a state dict; indexing
    materialises one tensor, `chunks` streams it without ever holding it whole.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, seed: int, component: str) -> None:
        self.shapes = dict(shapes)
        self.dtype = dtype
        self.seed = seed
        self.component = component

    def __getitem__(self, name: str) -> torch.Tensor:
        blocks = list(self.chunks(name))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, name: object) -> bool:
        return name in self.shapes  # Mapping's default would generate the tensor to find out

    def nbytes(self, name: str) -> int:
        return math.prod(self.shapes[name]) * self.dtype.itemsize

    def chunks(self, name: str) -> Iterator[torch.Tensor]:
        """Consecutive row blocks of tensor `name`, each shaped [rows, *shape[1:]]."""
        shape = self.shapes[name]
        center, std = _init_params(name, shape)
        generator = torch.Generator().manual_seed(_tensor_seed(self.seed, self.component, name))
        row = math.prod(shape[1:])
        step = max(1, _CHUNK_ELEMENTS // max(row, 1))
        for start in range(0, shape[0], step):
            rows = min(step, shape[0] - start)
            block = torch.empty((rows, *shape[1:]), dtype=torch.float32).normal_(center, std, generator=generator)
            yield block.to(self.dtype)

    def materialize(self) -> dict[str, torch.Tensor]:
        return {name: self[name] for name in self.shapes}


def expert_tensors(size: Size, expert: str, seed: int, layers: int | None = None) -> SynthTensors:
    """The random native-named weights of one expert (`high_noise_model` or `low_noise_model`).

    `layers` keeps the size's width and changes only the number of blocks; the
    tensors the two depths share are identical.
    """
    return SynthTensors(native_tensor_shapes(expert_arch(size, layers)), EXPERT_DTYPE, seed, expert)


def expert_arch(size: Size, layers: int | None = None) -> WanArch:
    """The expert architecture of a size, with `layers` blocks instead of the real count when given."""
    arch = SIZES[size].expert
    return arch if layers is None else arch.replace(num_layers=layers)


def t5_tensors(size: Size, seed: int) -> SynthTensors:
    return SynthTensors(t5_native_shapes(SIZES[size].t5), T5_DTYPE, seed, "t5")


def vae_tensors(size: Size, seed: int) -> SynthTensors:
    return SynthTensors(vae_native_shapes(SIZES[size].vae), VAE_DTYPE, seed, "vae")


def _tensor_seed(seed: int, component: str, name: str) -> int:
    """A stable per-tensor seed (Python's hash() is salted per process, so it cannot be used)."""
    digest = hashlib.sha256(f"wanlite-synth/{seed}/{component}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_params(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(center, std) of a tensor's normal init.

    Matrices and convolutions use std 1/sqrt(fan_in) so activations stay O(1)
    through every layer; norm scales sit near 1 and biases near 0 but are not
    exactly 1 or 0, so a projection that slices a bias or a norm weight wrongly
    changes outputs and fails its equivalence test. Modulation tables use Wan's
    own init (randn / sqrt(dim)).
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "modulation":
        return 0.0, shape[-1] ** -0.5
    if leaf == "gamma" or (leaf == "weight" and ".norm" in f".{name}" and len(shape) == 1):
        return 1.0, 0.05
    if leaf == "bias":
        return 0.0, 0.02
    return 0.0, math.prod(shape[1:]) ** -0.5 if len(shape) > 1 else 1.0


# --- file writers ------------------------------------------------------------------------------


def write_safetensors(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    chunks: Callable[[str], Iterable[torch.Tensor]] | None,
) -> None:
    """Write a .safetensors file tensor by tensor, never holding more than one chunk.

    Format: 8-byte little-endian header length, JSON header (padded with spaces to
    8 bytes, as safetensors does), then the raw data in header order. With
    `chunks=None` the data region is left as a hole (a sparse file of zeros).
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        if chunks is None:
            f.truncate(8 + len(blob) + offset)
            return
        for name, shape in shapes.items():
            written, expected = 0, math.prod(shape) * dtype.itemsize
            for chunk in chunks(name):
                data = chunk.contiguous().view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
            if written != expected:
                raise RuntimeError(f"{path}: {name}: wrote {written} bytes, expected {expected}")


def write_native_expert(
    expert_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    arch: WanArch,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    sparse: bool = False,
) -> Path:
    """Write one native expert exactly as the official checkpoint lays it out.

    `config.json` (`WanArch.native_config()`), shards named
    `diffusion_pytorch_model-0000k-of-0000N.safetensors` split by diffusers' own
    rule (huggingface_hub's splitter, in native tensor order) and the index
    `{"metadata": {"total_size": ...}, "weight_map": {...}}`, written as diffusers
    writes it. The index is written even for one shard, as the official layout
    always has one. Data first, config.json last: a directory without its config is
    not an expert. `tensors` may be a `SynthTensors`, which is then streamed.
    """
    out = Path(expert_dir)
    expected = native_tensor_shapes(arch)
    _check_tensors(out, tensors, expected)
    dtypes = {str(_dtype_of(tensors, name)) for name in expected}
    if len(dtypes) != 1:
        raise ValueError(f"{out}: expected one dtype for every tensor, found {sorted(dtypes)}")
    dtype = _dtype_of(tensors, next(iter(expected)))
    meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in expected.items()}
    split = split_torch_state_dict_into_shards(
        meta, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size=max_shard_bytes
    )
    out.mkdir(parents=True, exist_ok=True)
    files = list(split.filename_to_tensors.items())
    weight_map: dict[str, str] = {}
    progress = tqdm(files, desc=f"{out.name} shards", disable=sparse or len(files) < 4)
    for index, (_, names) in enumerate(progress, start=1):
        filename = L.shard_name(index, len(files))
        chunks = None if sparse else _chunk_source(tensors)
        write_safetensors(out / filename, {n: expected[n] for n in names}, dtype, chunks)
        weight_map.update(dict.fromkeys(names, filename))
    index_doc = {"metadata": dict(split.metadata), "weight_map": weight_map}
    (out / L.SHARD_INDEX).write_text(json.dumps(index_doc, indent=2, sort_keys=True) + "\n")
    (out / L.EXPERT_CONFIG).write_text(json.dumps(arch.native_config(), indent=2, sort_keys=True) + "\n")
    return out


def write_pth(path: Path, tensors: SynthTensors, *, sparse: bool = False) -> None:
    """`torch.save` a state dict too big for RAM: layout first, then tensor data in place.

    torch's own `skip_data` mode writes the complete zip archive (pickle, records,
    alignment) with holes where the storages go; we then map the file shared and
    copy each tensor in, chunk by chunk. `torch.load(weights_only=True, mmap=True)`
    reads the result like any checkpoint. As with torch's documented skip_data
    workflow, the zip CRC fields of the data records stay 0: torch.load does not
    read them. Small state dicts should use plain `torch.save` instead.
    """
    # Imported here: it loads torch's tracing machinery (about a second), needed only at a14b size.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = {name: torch.empty(shape, dtype=tensors.dtype) for name, shape in tensors.shapes.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(fake, path)
    if sparse:
        return
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        mapped = torch.load(path, weights_only=True, mmap=True)
    total = sum(tensors.nbytes(name) for name in tensors.shapes)
    for name in tqdm(tensors.shapes, desc=path.name, unit="tensor", disable=total < 2**30):
        start = 0
        for chunk in tensors.chunks(name):
            mapped[name][start : start + chunk.shape[0]].copy_(chunk)
            start += chunk.shape[0]
    del mapped  # unmaps the file; the kernel writes the shared pages back


def _chunk_source(tensors: Mapping[str, torch.Tensor]) -> Callable[[str], Iterable[torch.Tensor]]:
    if isinstance(tensors, SynthTensors):
        return tensors.chunks
    return lambda name: [tensors[name]]


def _dtype_of(tensors: Mapping[str, torch.Tensor], name: str) -> torch.dtype:
    return tensors.dtype if isinstance(tensors, SynthTensors) else tensors[name].dtype


def _check_tensors(where: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise KeyError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise KeyError(f"{where}: unexpected tensor {unexpected[0]!r} for this architecture")
    if isinstance(tensors, SynthTensors):
        bad = [k for k in expected if tuple(tensors.shapes[k]) != tuple(expected[k])]
    else:
        bad = [k for k in expected if tuple(tensors[k].shape) != tuple(expected[k])]
    if bad:
        found = tensors.shapes[bad[0]] if isinstance(tensors, SynthTensors) else tuple(tensors[bad[0]].shape)
        raise ValueError(f"{where}: {bad[0]}: expected shape {list(expected[bad[0]])}, found {list(found)}")
    dtypes = {_dtype_of(tensors, k) for k in expected}
    unsupported = dtypes - set(_SAFETENSORS_DTYPES)
    if unsupported:
        raise ValueError(f"{where}: expected fp32/bf16/fp16 tensors, found {sorted(map(str, unsupported))}")


# --- the two layouts ---------------------------------------------------------------------------


def synth_teacher(
    out_dir: str | Path,
    *,
    size: Size = "tiny",
    layout: L.Layout = "native",
    seed: int = 0,
    sparse: bool = False,
    layers: int | None = None,
) -> Path:
    """Write a synthetic Wan 2.2 T2V-A14B teacher to `out_dir` (which must not exist) and return it.

    `layers` (native layout) sets the number of blocks per expert at the size's
    full width: a 2-layer `a14b` teacher measures memory at real width on a laptop.

    The directory is assembled next to `out_dir` and renamed into place only when
    complete, so a crash never leaves something that looks like a teacher.
    """
    out = Path(out_dir)
    if size not in SIZES:
        raise ValueError(f"size: expected one of {', '.join(SIZES)}, found {size!r}")
    if layout not in ("native", "diffusers"):
        raise ValueError(f"layout: expected 'native' or 'diffusers', found {layout!r}")
    if layout == "diffusers" and size != "tiny":
        raise ValueError("layout: the diffusers layout is synthesised at size 'tiny' only; use 'native' for a14b")
    if sparse and size != "a14b":
        raise ValueError("sparse: only meaningful for size 'a14b' (a tiny teacher of zeros tests nothing)")
    if layers is not None and (layers < 1 or layout != "native"):
        raise ValueError(f"layers: expected a positive number of blocks with the native layout, found {layers}")
    if out.exists():
        raise FileExistsError(f"{out}: already exists; synth-teacher writes a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        if layout == "native":
            _write_native(work, size, seed, sparse, layers)
        else:
            _write_diffusers(work, seed)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("synthetic %s teacher (%s layout, seed %d%s) written to %s", size, layout, seed, ", sparse" * sparse, out)
    return out


def _write_native(out: Path, size: Size, seed: int, sparse: bool, layers: int | None) -> None:
    spec = SIZES[size]
    build_tokenizer(out / L.NATIVE_TOKENIZER)
    t5, vae = t5_tensors(size, seed), vae_tensors(size, seed)
    if size == "tiny":
        torch.save(t5.materialize(), out / L.NATIVE_T5)
        torch.save(vae.materialize(), out / L.NATIVE_VAE)
    else:
        write_pth(out / L.NATIVE_T5, t5, sparse=sparse)
        write_pth(out / L.NATIVE_VAE, vae, sparse=sparse)
    for expert in L.EXPERT_DIRS:
        write_native_expert(
            out / expert,
            expert_tensors(size, expert, seed, layers),
            expert_arch(size, layers),
            max_shard_bytes=spec.max_shard_bytes,
            sparse=sparse,
        )


def _write_diffusers(out: Path, seed: int) -> None:
    """Build a real tiny `WanPipeline` from the native weights and let diffusers save it."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    spec = SIZES["tiny"]
    experts = {}
    for native_dir, component in L.DIFFUSERS_EXPERTS.items():
        model = WanTransformer3DModel.from_config(spec.expert.diffusers_config())
        model.load_state_dict(to_diffusers(expert_tensors("tiny", native_dir, seed).materialize()), strict=True)
        experts[component] = model
    text_encoder = UMT5EncoderModel(t5_hf_config(spec.t5))
    text_encoder.load_state_dict(t5_native_to_hf(t5_tensors("tiny", seed).materialize()), strict=True)
    vae = AutoencoderKLWan.from_config(vae_diffusers_config(spec.vae))
    vae.load_state_dict(vae_native_to_diffusers(vae_tensors("tiny", seed).materialize()), strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(tmp))
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=DIFFUSERS_FLOW_SHIFT,
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.to(T5_DTYPE).eval(),
        vae=vae.eval(),
        scheduler=scheduler,
        transformer=experts["transformer"].eval(),
        transformer_2=experts["transformer_2"].eval(),
        boundary_ratio=BOUNDARY_RATIO,
        expand_timesteps=False,
    )
    pipe.save_pretrained(out, max_shard_size=spec.max_shard_bytes)
    # The hub's tokenizer/ folder also carries spiece.model and special_tokens_map.json.
    build_tokenizer(out / "tokenizer")

