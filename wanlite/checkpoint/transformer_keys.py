"""Wan transformer tensor names and shapes, native (`WanModel`) and diffusers.

Native -> diffusers uses diffusers' own converter
(`convert_wan_transformer_to_diffusers`), so we inherit its fixes; we write only
the inverse, which the ComfyUI exporter needs. The name-level maps are derived
by running that converter over meta tensors, so they cannot drift from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from wanlite.config import WanArch

COMFY_PREFIX = "model.diffusion_model."

_BLOCK_TENSORS: tuple[tuple[str, str], ...] = (
    # (name inside blocks.{i}, shape code); d = dim, f = ffn_dim
    ("modulation", "1,6,d"),
    *((f"self_attn.{p}.{w}", "d,d" if w == "weight" else "d") for p in "qkvo" for w in ("weight", "bias")),
    ("self_attn.norm_q.weight", "d"),
    ("self_attn.norm_k.weight", "d"),
    ("norm3.weight", "d"),
    ("norm3.bias", "d"),
    *((f"cross_attn.{p}.{w}", "d,d" if w == "weight" else "d") for p in "qkvo" for w in ("weight", "bias")),
    ("cross_attn.norm_q.weight", "d"),
    ("cross_attn.norm_k.weight", "d"),
    ("ffn.0.weight", "f,d"),
    ("ffn.0.bias", "f"),
    ("ffn.2.weight", "d,f"),
    ("ffn.2.bias", "d"),
)


def native_tensor_shapes(arch: WanArch) -> dict[str, tuple[int, ...]]:
    """Every tensor of a native `WanModel` state dict (no `freqs`), in checkpoint order."""
    d, f = arch.dim, arch.ffn_dim
    pt, ph, pw = arch.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, arch.in_dim, pt, ph, pw),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, arch.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, arch.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
    }
    sizes = {"d": d, "f": f}
    for i in range(arch.num_layers):
        for name, code in _BLOCK_TENSORS:
            shapes[f"blocks.{i}.{name}"] = tuple(int(sizes.get(c, c)) for c in code.split(","))
    shapes["head.modulation"] = (1, 2, d)
    shapes["head.head.weight"] = (arch.out_dim * arch.patch_volume, d)
    shapes["head.head.bias"] = (arch.out_dim * arch.patch_volume,)
    return shapes


def converter_name_maps(
    shapes: Mapping[str, tuple[int, ...]],
    converter: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    what: str,
) -> tuple[dict[str, str], dict[str, str]]:
    """(native -> converted, converted -> native) names, by running `converter` over meta tensors.

    Deriving the map from diffusers' own converter means it cannot drift from it.
    """
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    ident = {id(t): k for k, t in meta.items()}
    to_diff = {ident[id(t)]: k for k, t in converter(dict(meta)).items()}
    if len(to_diff) != len(shapes):  # the converter split or merged a tensor: our map would lie
        raise RuntimeError(f"diffusers' {what} converter no longer maps tensors one-to-one")
    return to_diff, {v: k for k, v in to_diff.items()}


@lru_cache(maxsize=8)
def _name_maps(arch: WanArch) -> tuple[dict[str, str], dict[str, str]]:
    return converter_name_maps(native_tensor_shapes(arch), convert_wan_transformer_to_diffusers, "Wan")


def native_to_diffusers_names(arch: WanArch) -> dict[str, str]:
    """native name -> diffusers name, for every tensor of `arch`."""
    return dict(_name_maps(arch)[0])


def diffusers_to_native_names(arch: WanArch) -> dict[str, str]:
    """diffusers name -> native name, for every tensor of `arch`."""
    return dict(_name_maps(arch)[1])


def strip_comfy_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ComfyUI's `model.diffusion_model.` prefix when every key carries it."""
    if state_dict and all(k.startswith(COMFY_PREFIX) for k in state_dict):
        return {k[len(COMFY_PREFIX) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def to_diffusers(native: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native WanModel state dict -> WanTransformer3DModel state dict (diffusers' converter)."""
    return convert_wan_transformer_to_diffusers(strip_comfy_prefix(native))


def to_native(diffusers_sd: Mapping[str, torch.Tensor], arch: WanArch) -> dict[str, torch.Tensor]:
    """WanTransformer3DModel state dict -> native WanModel state dict, in native order.

    Raises KeyError naming the first tensor that is missing or unexpected, because an
    export with a hole loads in ComfyUI with uninitialised weights and no error.
    """
    what = f"a {arch.num_layers}-layer dim-{arch.dim} Wan model"
    return rename_exactly(diffusers_sd, _name_maps(arch)[1], native_tensor_shapes(arch), what)


def rename_exactly(
    state_dict: Mapping[str, torch.Tensor], names: Mapping[str, str], order: Iterable[str], what: str, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Rename every tensor through `names` and return them in `order`; nothing may be missing or extra.

    Raises KeyError naming the first unexpected or missing tensor (`prefix` starts the message).
    """
    unexpected = sorted(set(state_dict) - set(names))
    if unexpected:
        raise KeyError(f"{prefix}unexpected tensor {unexpected[0]!r} for {what}")
    missing = sorted(set(names) - set(state_dict))
    if missing:
        raise KeyError(f"{prefix}missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    renamed = {names[k]: v for k, v in state_dict.items()}
    return {k: renamed[k] for k in order}


def arch_from_native_shapes(shapes: Mapping[str, tuple[int, ...]], source: str = "state dict") -> WanArch:
    """Infer the architecture from native tensor shapes, the way ComfyUI does (head_dim 128)."""
    from wanlite.config import HEAD_DIM, ConfigError

    try:
        dim = shapes["head.modulation"][-1]
        layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
        return WanArch(
            dim=dim,
            ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
            num_heads=dim // HEAD_DIM,
            num_layers=layers,
            in_dim=shapes["patch_embedding.weight"][1],
            out_dim=shapes["head.head.weight"][0] // 4,
            text_dim=shapes["text_embedding.0.weight"][1],
            freq_dim=shapes["time_embedding.0.weight"][1],
        )
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{source}: not a native Wan transformer ({err})") from None
