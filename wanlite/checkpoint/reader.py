"""Lazy, tensor-at-a-time access to a Wan 2.2 teacher's two transformer experts.

One A14B expert is 57 GB in fp32: it must never be materialised whole in host
RAM. `TeacherReader` therefore opens the right shard with `safe_open` for each
tensor and closes it again. Closing matters: safetensors memory-maps the shard,
and mapped pages that were touched count towards the process' RSS until the
map is dropped, so a handle kept open across a whole expert would grow RSS to
the expert's size even though every tensor was freed.

Both layouts are read through native `WanModel` tensor names; the diffusers
layout is translated with diffusers' own converter's name map.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from safetensors import SafetensorError, safe_open
from torch import nn

from wanlite.checkpoint.layout import (
    DIFFUSERS_EXPERTS,
    EXPERT_CONFIG,
    EXPERT_DIRS,
    SHARD_INDEX,
    SINGLE_SHARD,
    LayoutError,
    detect_layout,
    is_shard_name,
)
from wanlite.checkpoint.transformer_keys import (
    diffusers_to_native_names,
    native_tensor_shapes,
    native_to_diffusers_names,
)
from wanlite.config import ConfigError, WanArch
from wanlite.student import cast_keeping_fp32_modules, kept_in_fp32


class TeacherReadError(ValueError):
    """A teacher tensor that is missing or not what its config promises; names file and key."""


class _Expert:
    """Where one expert's tensors live: stored name -> shard file, plus its architecture."""

    def __init__(self, folder: Path, layout: str) -> None:
        self.folder = folder
        config_path = folder / EXPERT_CONFIG
        config = json.loads(config_path.read_text())
        if layout == "native":
            self.arch = WanArch.from_native_config(config, str(config_path))
        else:
            self.arch = WanArch.from_diffusers_config(config, str(config_path))
        self.weight_map = _weight_map(folder)


def _weight_map(folder: Path) -> dict[str, Path]:
    """Stored tensor name -> file, from the shard index or the single file's header."""
    index, single = folder / SHARD_INDEX, folder / SINGLE_SHARD
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise TeacherReadError(f"{index}: expected a non-empty 'weight_map', found {weight_map!r}")
        escaping = sorted({str(shard) for shard in weight_map.values() if not is_shard_name(shard)})
        if escaping:
            raise TeacherReadError(
                f"{index}: weight_map: expected shard file names inside {folder}, found {', '.join(escaping[:3])}"
            )
        return {name: folder / shard for name, shard in weight_map.items()}
    if single.is_file():
        with safe_open(str(single), framework="pt") as fh:
            return dict.fromkeys(fh.keys(), single)
    raise TeacherReadError(f"{folder}: expected {SHARD_INDEX} or {SINGLE_SHARD}, found neither")


class TeacherReader:
    """Read a teacher directory (native or diffusers layout) one tensor at a time.

    `expert_names` uses the native folder names (`high_noise_model`,
    `low_noise_model`) whatever the layout, so callers never branch on it.
    """

    def __init__(self, teacher_dir: str | Path) -> None:
        self.root = Path(teacher_dir)
        self.layout = detect_layout(self.root)
        self._experts: dict[str, _Expert] = {}
        for name in EXPERT_DIRS:
            folder = self.root / (name if self.layout == "native" else DIFFUSERS_EXPERTS[name])
            if (folder / EXPERT_CONFIG).is_file():
                self._experts[name] = _Expert(folder, self.layout)
        if not self._experts:
            raise LayoutError(f"{self.root}: no transformer expert found (looked for {', '.join(EXPERT_DIRS)})")
        self.expert_names: tuple[str, ...] = tuple(self._experts)
        archs = {name: e.arch for name, e in self._experts.items()}
        first = next(iter(archs.values()))
        for name, arch in archs.items():
            if arch != first:
                raise ConfigError(
                    f"{self.root}: experts disagree on architecture: {self.expert_names[0]} {first}, {name} {arch}"
                )
        self.arch: WanArch = first
        for name in self.expert_names:
            self._check_complete(name)

    # --- names ---------------------------------------------------------------------
    @cached_property
    def _stored_names(self) -> dict[str, str]:
        if self.layout == "native":
            return {k: k for k in native_tensor_shapes(self.arch)}
        return native_to_diffusers_names(self.arch)

    def _check_complete(self, expert: str) -> None:
        weight_map = self._experts[expert].weight_map
        missing = [n for n in native_tensor_shapes(self.arch) if self._stored_names[n] not in weight_map]
        if missing:
            raise TeacherReadError(
                f"{self._experts[expert].folder}: missing tensor {self._stored_names[missing[0]]!r} "
                f"({len(missing)} missing in all) for a {self.arch.num_layers}-layer dim-{self.arch.dim} expert"
            )

    def expert(self, name: str) -> _Expert:
        try:
            return self._experts[name]
        except KeyError:
            raise TeacherReadError(
                f"{self.root}: expert {name!r} not present; found {', '.join(self.expert_names)}"
            ) from None

    # --- tensors -------------------------------------------------------------------
    def location(self, expert: str, native_name: str) -> tuple[Path, str]:
        """(file, stored key) of one tensor: what a report cites as its source."""
        try:
            stored = self._stored_names[native_name]
        except KeyError:
            raise TeacherReadError(f"{self.root}: {native_name!r} is not a tensor of {self.arch}") from None
        return self.expert(expert).weight_map[stored], stored

    def tensor(self, expert: str, native_name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, checked against the shape the config implies."""
        file, stored = self.location(expert, native_name)
        if not file.is_file():
            raise TeacherReadError(f"{file}: missing shard (the index lists {stored!r} in it)")
        try:
            with safe_open(str(file), framework="pt") as fh:
                if stored not in fh.keys():
                    raise TeacherReadError(f"{file}: missing tensor {stored!r} (the shard index lists it here)")
                value = fh.get_tensor(stored)
        except SafetensorError as err:  # bad header: offsets overlapping, past the end of the file, ...
            raise TeacherReadError(
                f"{file}: {stored}: unreadable safetensors file ({err}); run `wanlite validate`"
            ) from None
        expected = native_tensor_shapes(self.arch)[native_name]
        if tuple(value.shape) != expected:
            raise TeacherReadError(f"{file}: {stored}: expected shape {expected}, found {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TeacherReadError(f"{file}: {stored}: expected a floating-point weight, found {value.dtype}")
        return value

    def rows(self, expert: str, native_name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one tensor, reading only those bytes (what a rank of a sharded teacher owns)."""
        file, stored = self.location(expert, native_name)
        if not file.is_file():
            raise TeacherReadError(f"{file}: missing shard (the index lists {stored!r} in it)")
        with safe_open(str(file), framework="pt") as fh:
            if stored not in fh.keys():
                raise TeacherReadError(f"{file}: missing tensor {stored!r} (the shard index lists it here)")
            part = fh.get_slice(stored)
            expected = native_tensor_shapes(self.arch)[native_name]
            if tuple(part.get_shape()) != expected:
                raise TeacherReadError(f"{file}: {stored}: expected shape {expected}, found {tuple(part.get_shape())}")
            return part[start:stop] if expected else part[:]

    def tensors(self, expert: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of an expert in native order, one at a time."""
        for name in native_tensor_shapes(self.arch):
            yield name, self.tensor(expert, name)

    def fingerprint(self) -> str:
        """A cheap identity of the experts' weights: configs, indexes and file sizes (no GB hashing).

        Good enough to tell two teachers apart for caching and for refusing to
        overwrite a student projected from another teacher; the store's
        manifests carry the real sha256s.
        """
        digest = hashlib.sha256()
        for name in self.expert_names:
            folder = self._experts[name].folder
            digest.update(f"{name}\0{(folder / EXPERT_CONFIG).read_text()}\0".encode())
            for file in sorted(set(self._experts[name].weight_map.values())):
                digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
            index = folder / SHARD_INDEX
            if index.is_file():
                digest.update(index.read_bytes())
        return digest.hexdigest()

    # --- models --------------------------------------------------------------------
    def load_expert(self, expert: str, dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
        """A whole expert as a diffusers model (fine for tiny teachers; A14B wants `streaming_expert`)."""
        self.expert(expert)
        to_diffusers_name = native_to_diffusers_names(self.arch)
        state = {to_diffusers_name[n]: t for n, t in self.tensors(expert)}
        with init_empty_weights():
            model = WanTransformer3DModel.from_config(self.arch.diffusers_config())
        model.load_state_dict(state, strict=True, assign=True)
        cast_keeping_fp32_modules(model, dtype)
        return model.eval().requires_grad_(False)

    def empty_expert(self, expert: str, dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
        """An expert with parameters on the meta device in the dtypes `load_expert` gives (buffers real).

        What a sharded teacher starts from: shard it, then fill each rank's
        rows with `rows` (see `wanlite.distill.parallel.sharded_expert`).
        """
        self.expert(expert)
        with init_empty_weights():
            model = WanTransformer3DModel.from_config(self.arch.diffusers_config())
        cast_keeping_fp32_modules(model, dtype)
        return model.eval().requires_grad_(False)

    def device_expert(
        self, expert: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> WanTransformer3DModel:
        """The whole expert on `device`, read one tensor at a time (host memory: the largest tensor).

        For passes that run many batches through one expert (calibration): it
        is read once, not once per forward as `streaming_expert` does.
        """
        self.expert(expert)
        with init_empty_weights():
            model = WanTransformer3DModel.from_config(self.arch.diffusers_config())
        model.rope.to(device)  # RoPE tables are buffers computed at init, not checkpoint tensors
        to_native = diffusers_to_native_names(self.arch)
        for full, _ in list(model.named_parameters()):
            module_name, _, param = full.rpartition(".")
            value = self.tensor(expert, to_native[full])
            value = value.to(device=device, dtype=torch.float32 if kept_in_fp32(model, full) else dtype)
            model.get_submodule(module_name)._parameters[param] = nn.Parameter(value, requires_grad=False)
        return model.eval().requires_grad_(False)

    def streaming_expert(
        self, expert: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> WanTransformer3DModel:
        """An expert whose weights are read just before each submodule runs and dropped right after.

        Runs the stock diffusers forward with host memory bounded by the
        largest single submodule (one Linear), which is how calibration passes
        through a 14B expert on a machine that cannot hold it. Every tensor is
        re-read on each forward call, so callers batch their inputs.
        """
        self.expert(expert)
        with init_empty_weights():
            model = WanTransformer3DModel.from_config(self.arch.diffusers_config())
        model.rope.to(device)  # RoPE tables are buffers computed at init, not checkpoint tensors
        to_native = diffusers_to_native_names(self.arch)
        for module_name, module in model.named_modules():
            params = [p for p, _ in module.named_parameters(recurse=False)]
            if not params:
                continue
            full = {p: f"{module_name}.{p}" if module_name else p for p in params}
            dtypes = {p: torch.float32 if kept_in_fp32(model, full[p]) else dtype for p in params}
            sources = {p: to_native[full[p]] for p in params}
            _set_meta(module, dtypes)
            module.register_forward_pre_hook(self._materialiser(expert, sources, dtypes, device))
            module.register_forward_hook(lambda mod, _args, _out, dtypes=dtypes: _set_meta(mod, dtypes))
        return model.eval().requires_grad_(False)

    def _materialiser(
        self, expert: str, sources: dict[str, str], dtypes: dict[str, torch.dtype], device: str | torch.device
    ) -> Callable[[nn.Module, tuple], None]:
        def materialise(module: nn.Module, _args: tuple) -> None:
            for param, native in sources.items():
                value = self.tensor(expert, native).to(device=device, dtype=dtypes[param])
                module._parameters[param] = nn.Parameter(value, requires_grad=False)

        return materialise


def _set_meta(module: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Replace a module's direct parameters by meta placeholders (frees the real tensors)."""
    for param, dtype in dtypes.items():
        shape = module._parameters[param].shape
        module._parameters[param] = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
