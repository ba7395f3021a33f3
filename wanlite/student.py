"""WanLiteStudent: the distilled text-to-image model, a genuine (smaller) Wan transformer.

The student is diffusers' `WanTransformer3DModel` with a validated config and an
image-shaped entry point; it adds no parameter and no config field. That is what
lets every consumer load it with stock code: `from_pretrained` (no custom loader,
no projection in the constructor, so no meta-tensor trouble), a stock
`WanPipeline`, and ComfyUI after the native-key export.

Decision on `config.json`'s `_class_name`: it is "WanTransformer3DModel", not
"WanLiteStudent". diffusers resolves `_class_name` against its own library
(`AutoModel`, pipeline loading); an unknown name would make the folder unusable
where wanlite is not installed, and the student *is* exactly that class.
`WanLiteStudent.from_pretrained` reads the same file (diffusers accepts a
config saved by the parent class when the init keys agree, which they do).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from wanlite.config import ConfigError, WanArch, load_student_config, validate_student
from wanlite.checkpoint.transformer_keys import (
    arch_from_native_shapes,
    strip_comfy_prefix,
    to_diffusers,
)

log = logging.getLogger(__name__)

SAVED_CLASS_NAME = WanTransformer3DModel.__name__
"""`_class_name` written to config.json (see the module docstring for why)."""

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
"""What stock `from_pretrained` reads (single file or sharded)."""

SINGLE_FILE_WEIGHTS = ("diffusion_model.safetensors", "model.safetensors")
"""The seed notes' single-file layouts, accepted on load (native or diffusers tensor names)."""


class StudentWeightsNotFound(FileNotFoundError):
    """A student folder with no weights file under any accepted name."""


class WanLiteStudent(WanTransformer3DModel):
    """A Wan T2V transformer whose shape ComfyUI and the Wan RoPE accept (head_dim 128).

    The signature mirrors the parent's so `from_config` sees every field (the
    decorated parent `__init__` is what registers them). Defaults are the
    `lite-1024` preset, but configs always spell every field out.
    """

    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 8,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 2816,
        num_layers: int = 16,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
    ) -> None:
        fields = dict(locals())
        fields.pop("self")
        fields.pop("__class__", None)
        _validate_fields(fields)
        super().__init__(**fields)

    # --- construction --------------------------------------------------------------
    @classmethod
    def from_arch(cls, arch: WanArch) -> WanLiteStudent:
        """A randomly initialised student of shape `arch` (validated first: nothing is built if invalid)."""
        return cls.from_config(validate_student(arch).diffusers_config())

    @classmethod
    def with_weights(cls, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> WanLiteStudent:
        """A student of `config` whose parameters are `weights` themselves (assigned: no second, random copy)."""
        with init_empty_weights():
            model = cls.from_config(dict(config))
        model.load_state_dict(weights, strict=True, assign=True)
        return model

    @classmethod
    def from_student_config(cls, path: str | Path) -> WanLiteStudent:
        """A random student from a config file in the diffusers or the seed notes' vocabulary."""
        arch, _image_size = load_student_config(path)
        return cls.from_arch(arch)

    @property
    def arch(self) -> WanArch:
        return WanArch.from_diffusers_config(dict(self.config), "WanLiteStudent config")

    # --- image API -----------------------------------------------------------------
    def forward_image(
        self, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """Velocity for single-frame latents: `[B,16,H,W]` in, `[B,16,H,W]` out.

        Wan treats an image as a one-frame video (patch (1,2,2) makes the time
        axis an exact squeeze), so this is the 5-D forward with F = 1.
        """
        if latents.ndim != 4:
            raise ValueError(f"latents: expected [B, C, H, W], found shape {tuple(latents.shape)}")
        if latents.shape[1] != self.config.in_channels:
            raise ValueError(f"latents: expected {self.config.in_channels} channels, found {latents.shape[1]}")
        out = self(latents.unsqueeze(2), timestep, encoder_hidden_states, return_dict=False)[0]
        return out.squeeze(2)

    # --- persistence ---------------------------------------------------------------
    def to_json_string(self) -> str:
        """The parent's config JSON, with the class name that stock diffusers resolves."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = SAVED_CLASS_NAME
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> WanLiteStudent:
        """Stock `from_pretrained`, plus `low_cpu_mem_usage=False` and the seed notes' single-file folders.

        A diffusers-layout folder goes to diffusers unchanged (all its options
        apply). Two cases are read here instead: `low_cpu_mem_usage=False`, which
        stock diffusers refuses for every Wan model (its fp32-kept modules need
        the meta-device path), is honoured by building real tensors and copying
        the weights in; and a folder holding `diffusion_model.safetensors` or
        `model.safetensors`. A folder with no weights raises
        `StudentWeightsNotFound` listing every name looked for.
        """
        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        if not folder.is_dir():  # a hub id: diffusers' business
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        files = _weight_files(folder)
        is_diffusers = files[0].name.startswith("diffusion_pytorch_model")
        low_cpu_mem_usage = kwargs.get("low_cpu_mem_usage", True)
        if is_diffusers and low_cpu_mem_usage is not False:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        unsupported = sorted(set(kwargs) - {"torch_dtype", "low_cpu_mem_usage", "subfolder"})
        if unsupported:
            raise ValueError(
                f"{folder}: option(s) {', '.join(unsupported)} need a diffusers-layout folder "
                "loaded with low_cpu_mem_usage on"
            )
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(file))
        return cls._from_state_dict(folder, state, kwargs.get("torch_dtype"), empty=low_cpu_mem_usage is not False)

    @classmethod
    def _from_state_dict(
        cls, folder: Path, state: dict[str, torch.Tensor], torch_dtype: torch.dtype | None, *, empty: bool
    ) -> WanLiteStudent:
        """Build the model and load `state` strictly; `empty` skips random init (weights assigned)."""
        state = strip_comfy_prefix(state)
        native = "head.modulation" in state
        arch = _folder_arch(folder, {k: tuple(v.shape) for k, v in state.items()}, native)
        if native:
            state = to_diffusers(state)
        if empty:
            with init_empty_weights():
                model = cls.from_arch(arch)
        else:
            model = cls.from_arch(arch)
        try:
            model.load_state_dict(state, strict=True, assign=empty)
        except RuntimeError as err:
            raise ValueError(f"{folder}: tensors do not match a {arch} student: {err}") from None
        if torch_dtype is not None:
            cast_keeping_fp32_modules(model, torch_dtype)
        return model.eval()


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a student folder, in the first accepted layout found."""
    single, index = (folder / n for n in DIFFUSERS_WEIGHTS)
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    for name in SINGLE_FILE_WEIGHTS:
        if (folder / name).is_file():
            return [folder / name]
    present = sorted(p.name for p in folder.iterdir()) or ["nothing"]
    raise StudentWeightsNotFound(
        f"{folder}: no student weights; looked for {', '.join(DIFFUSERS_WEIGHTS + SINGLE_FILE_WEIGHTS)}; "
        f"found {', '.join(present)}"
    )


def _validate_fields(fields: dict[str, Any]) -> None:
    """Refuse any config the exporter, ComfyUI or the RoPE could not honour, before allocating."""
    for key, expected in (("cross_attn_norm", True), ("qk_norm", "rms_norm_across_heads")):
        if fields[key] != expected:
            raise ConfigError(f"WanLiteStudent config: {key}: expected {expected!r}, found {fields[key]!r}")
    validate_student(WanArch.from_diffusers_config(fields, "WanLiteStudent config"), "WanLiteStudent config")


def _folder_arch(folder: Path, shapes: dict[str, tuple[int, ...]], native: bool) -> WanArch:
    """Architecture of a student folder: from its config.json, else from native tensor shapes."""
    config = folder / "config.json"
    if config.is_file():
        arch, _image_size = load_student_config(config)
        if native:
            inferred = arch_from_native_shapes(shapes, str(folder))
            if inferred != arch:
                raise ConfigError(f"{folder}: tensor shapes give {inferred}, but {config} says {arch}")
        return arch
    if not native:
        raise ConfigError(
            f"{folder}: diffusers tensor names need a config.json beside them to fix the architecture; none found"
        )
    return validate_student(arch_from_native_shapes(shapes, str(folder)), str(folder))


def kept_in_fp32(model: WanTransformer3DModel, param_name: str) -> bool:
    """Whether diffusers keeps this parameter in fp32 whatever `torch_dtype` asks (its modulation, norms, ...)."""
    keep = model._keep_in_fp32_modules or ()
    return any(part in keep for part in param_name.split("."))


def cast_keeping_fp32_modules(model: WanTransformer3DModel, dtype: torch.dtype) -> None:
    """Cast like stock `from_pretrained(torch_dtype=...)`: modules diffusers keeps in fp32 stay fp32."""
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if kept_in_fp32(model, name) else dtype)
