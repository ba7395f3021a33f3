"""The Wan 2.2 teacher's other parts: the umT5-XXL text encoder and the Wan 2.1 VAE.

Both ship in the native checkpoint as `torch.save` state dicts under the official
Wan module names (WAN_FORMATS.md §4, §5); the diffusers layout stores them under
transformers' `UMT5EncoderModel` and diffusers' `AutoencoderKLWan` names. This
module holds their shape tables (so the synthesiser and the validator agree on
what a well-formed file is, at tiny and full size alike) and the key conversions.

VAE: diffusers ships native -> diffusers (`convert_wan_vae_to_diffusers`); we
derive the inverse by running that converter over meta tensors, exactly as
`transformer_keys` does for the transformer, so the two directions cannot drift.
T5: transformers ships no converter for Wan's native names, so the table below
is the one confirmed numerically in WAN_FORMATS.md §5 (and re-proved in tests).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from transformers import UMT5Config

from wanlite.checkpoint.transformer_keys import converter_name_maps, rename_exactly
from wanlite.config import ConfigError

Shapes = dict[str, tuple[int, ...]]

# --- T5 (umT5-XXL encoder) -------------------------------------------------------------


@dataclass(frozen=True)
class T5Arch:
    """Shape of Wan's native umT5 encoder (`wan/modules/t5.py`), in its own vocabulary."""

    vocab: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int = 32

    def __post_init__(self) -> None:
        for name in ("vocab", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers", "num_buckets"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"T5 {name}: expected a positive integer, found {value!r}")
        if self.dim_attn % self.num_heads:
            raise ConfigError(f"T5 dim_attn: {self.dim_attn} is not divisible by num_heads={self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def from_native_shapes(cls, shapes: Mapping[str, tuple[int, ...]], source: str = "T5 state dict") -> T5Arch:
        """Infer the encoder's sizes from native tensor shapes (tiny or full size alike)."""
        vocab, dim = _shape(shapes, "token_embedding.weight", 2, source)
        layers = _count_blocks(shapes, source)
        num_buckets, num_heads = _shape(shapes, "blocks.0.pos_embedding.embedding.weight", 2, source)
        return cls(
            vocab=vocab,
            dim=dim,
            dim_attn=_shape(shapes, "blocks.0.attn.q.weight", 2, source)[0],
            dim_ffn=_shape(shapes, "blocks.0.ffn.fc1.weight", 2, source)[0],
            num_heads=num_heads,
            num_layers=layers,
            num_buckets=num_buckets,
        )


UMT5_XXL = T5Arch(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24, num_buckets=32)
"""Wan 2.2's text encoder (`umt5_xxl(encoder_only=True)`), 5.7B parameters."""

# (native name inside blocks.{i}, HF name inside encoder.block.{i}, shape code), in the
# native module's registration order: norm1, attn, norm2, ffn, pos_embedding.
# Codes: d = dim, a = dim_attn, f = dim_ffn, b = num_buckets, h = num_heads.
_T5_BLOCK: tuple[tuple[str, str, str], ...] = (
    ("norm1.weight", "layer.0.layer_norm.weight", "d"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight", "a,d"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight", "a,d"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight", "a,d"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight", "d,a"),
    ("norm2.weight", "layer.1.layer_norm.weight", "d"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight", "f,d"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight", "f,d"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight", "d,f"),
    # umT5 (unlike T5) has a relative-position bias in every layer, hence per block.
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight", "b,h"),
)
_T5_BLOCK_TO_HF = {native: hf for native, hf, _ in _T5_BLOCK}
_T5_BLOCK_TO_NATIVE = {hf: native for native, hf, _ in _T5_BLOCK}
_T5_NATIVE_RE = re.compile(r"blocks\.(\d+)\.(.+)")
_T5_HF_RE = re.compile(r"encoder\.block\.(\d+)\.(.+)")
_T5_EMBED = "token_embedding.weight"
_HF_EMBEDS = ("shared.weight", "encoder.embed_tokens.weight")  # one tensor, tied, under two names


def t5_native_shapes(arch: T5Arch) -> Shapes:
    """Every tensor of the native T5 state dict, in the order `torch.save` writes it."""
    sizes = {"d": arch.dim, "a": arch.dim_attn, "f": arch.dim_ffn, "b": arch.num_buckets, "h": arch.num_heads}
    shapes: Shapes = {_T5_EMBED: (arch.vocab, arch.dim)}
    for i in range(arch.num_layers):
        for native, _, code in _T5_BLOCK:
            shapes[f"blocks.{i}.{native}"] = tuple(sizes[c] for c in code.split(","))
    shapes["norm.weight"] = (arch.dim,)
    return shapes


def t5_native_to_hf(native: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native T5 state dict -> `UMT5EncoderModel` state dict (the embedding under both tied names)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in native.items():
        if key == _T5_EMBED:
            out.update(dict.fromkeys(_HF_EMBEDS, value))
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif (m := _T5_NATIVE_RE.fullmatch(key)) and m.group(2) in _T5_BLOCK_TO_HF:
            out[f"encoder.block.{m.group(1)}.{_T5_BLOCK_TO_HF[m.group(2)]}"] = value
        else:
            raise KeyError(f"T5 state dict: unexpected tensor {key!r}; expected native umT5 names (WAN_FORMATS.md §5)")
    return out


def t5_hf_to_native(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`UMT5EncoderModel` state dict -> native T5 state dict, in native order.

    A saved HF checkpoint may carry the tied embedding under either name or both;
    when both are present they must agree, or we would silently pick one.
    """
    embeds = [k for k in _HF_EMBEDS if k in hf]
    if not embeds:
        raise KeyError(f"T5 state dict: missing the token embedding (expected {' or '.join(_HF_EMBEDS)})")
    if len(embeds) == 2 and not torch.equal(hf[embeds[0]], hf[embeds[1]]):
        raise ValueError(f"T5 state dict: {embeds[0]} and {embeds[1]} differ; expected one tied embedding")
    out: dict[str, torch.Tensor] = {_T5_EMBED: hf[embeds[0]]}
    for key, value in hf.items():
        if key in _HF_EMBEDS:
            continue
        if key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif (m := _T5_HF_RE.fullmatch(key)) and m.group(2) in _T5_BLOCK_TO_NATIVE:
            out[f"blocks.{m.group(1)}.{_T5_BLOCK_TO_NATIVE[m.group(2)]}"] = value
        else:
            raise KeyError(f"T5 state dict: unexpected tensor {key!r} for a UMT5EncoderModel")
    return dict(sorted(out.items(), key=lambda item: _t5_native_order(item[0])))


def t5_hf_config(arch: T5Arch) -> UMT5Config:
    """transformers `UMT5Config` for `arch`: umT5's gated-GELU(tanh) FFN, eps 1e-6, max distance 128."""
    return UMT5Config(
        vocab_size=arch.vocab,
        d_model=arch.dim,
        d_kv=arch.head_dim,
        d_ff=arch.dim_ffn,
        num_layers=arch.num_layers,
        num_decoder_layers=arch.num_layers,
        num_heads=arch.num_heads,
        relative_attention_num_buckets=arch.num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        architectures=["UMT5EncoderModel"],
    )


def _t5_native_order(key: str) -> tuple[int, int, int]:
    if key == _T5_EMBED:
        return (0, 0, 0)
    if m := _T5_NATIVE_RE.fullmatch(key):
        order = [native for native, _, _ in _T5_BLOCK]
        return (1, int(m.group(1)), order.index(m.group(2)))
    return (2, 0, 0)


# --- VAE (Wan 2.1 VAE) -------------------------------------------------------------------


@dataclass(frozen=True)
class VaeArch:
    """Shape of the Wan 2.1 VAE (`WanVAE_`).

    Only the width and the latent channels vary: diffusers' converter hard-codes the
    block layout of dim_mult (1, 2, 4, 4) with two residual blocks per level, so any
    other layout could not round-trip through it.
    """

    base_dim: int = 96
    z_dim: int = 16

    def __post_init__(self) -> None:
        for name in ("base_dim", "z_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"VAE {name}: expected a positive integer, found {value!r}")

    @classmethod
    def from_native_shapes(cls, shapes: Mapping[str, tuple[int, ...]], source: str = "VAE state dict") -> VaeArch:
        """Infer width and latent channels from native tensor shapes."""
        return cls(
            base_dim=_shape(shapes, "encoder.conv1.weight", 5, source)[0],
            z_dim=_shape(shapes, "conv2.weight", 5, source)[0],
        )


WAN21_VAE = VaeArch(base_dim=96, z_dim=16)
"""The Wan 2.1 VAE every Wan 2.2 A14B checkpoint ships (126.9M parameters, 194 tensors)."""

_VAE_DIM_MULT = (1, 2, 4, 4)
_VAE_RES_BLOCKS = 2
_VAE_TEMPORAL_DOWN = (False, True, True)


def vae_native_shapes(arch: VaeArch) -> Shapes:
    """Every tensor of `WanVAE_`'s state dict, in registration order: encoder, conv1, conv2, decoder."""
    b, z = arch.base_dim, arch.z_dim
    shapes: Shapes = {}
    _conv(shapes, "encoder.conv1", b, 3, (3, 3, 3))
    enc_dims = [b * m for m in (1, *_VAE_DIM_MULT)]
    idx = 0
    for level, (cin, cout) in enumerate(zip(enc_dims[:-1], enc_dims[1:], strict=True)):
        for _ in range(_VAE_RES_BLOCKS):
            _residual(shapes, f"encoder.downsamples.{idx}", cin, cout)
            cin, idx = cout, idx + 1
        if level < len(_VAE_DIM_MULT) - 1:
            _conv(shapes, f"encoder.downsamples.{idx}.resample.1", cout, cout, (3, 3))
            if _VAE_TEMPORAL_DOWN[level]:
                _conv(shapes, f"encoder.downsamples.{idx}.time_conv", cout, cout, (3, 1, 1))
            idx += 1
    top = enc_dims[-1]
    _middle(shapes, "encoder.middle", top)
    shapes["encoder.head.0.gamma"] = (top, 1, 1, 1)
    _conv(shapes, "encoder.head.2", 2 * z, top, (3, 3, 3))
    _conv(shapes, "conv1", 2 * z, 2 * z, (1, 1, 1))
    _conv(shapes, "conv2", z, z, (1, 1, 1))
    _conv(shapes, "decoder.conv1", top, z, (3, 3, 3))
    _middle(shapes, "decoder.middle", top)
    dec_dims = [b * m for m in (_VAE_DIM_MULT[-1], *reversed(_VAE_DIM_MULT))]
    temporal_up = tuple(reversed(_VAE_TEMPORAL_DOWN))
    idx = 0
    for level, (cin, cout) in enumerate(zip(dec_dims[:-1], dec_dims[1:], strict=True)):
        if level > 0:  # the previous level's upsampler halved the channels
            cin //= 2
        for _ in range(_VAE_RES_BLOCKS + 1):
            _residual(shapes, f"decoder.upsamples.{idx}", cin, cout)
            cin, idx = cout, idx + 1
        if level < len(_VAE_DIM_MULT) - 1:
            _conv(shapes, f"decoder.upsamples.{idx}.resample.1", cout // 2, cout, (3, 3))
            if temporal_up[level]:
                _conv(shapes, f"decoder.upsamples.{idx}.time_conv", cout * 2, cout, (3, 1, 1))
            idx += 1
    shapes["decoder.head.0.gamma"] = (dec_dims[-1], 1, 1, 1)
    _conv(shapes, "decoder.head.2", 3, dec_dims[-1], (3, 3, 3))
    return shapes


def vae_native_to_diffusers(native: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native VAE state dict -> `AutoencoderKLWan` state dict (diffusers' own converter)."""
    return convert_wan_vae_to_diffusers(dict(native))


def vae_diffusers_to_native(diffusers_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`AutoencoderKLWan` state dict -> native `WanVAE_` state dict, in native order.

    The width is read from the input, so one function serves the tiny and the full
    VAE. Raises KeyError naming the first missing or unexpected tensor.
    """
    if "encoder.conv_in.weight" not in diffusers_sd or "post_quant_conv.weight" not in diffusers_sd:
        raise KeyError(
            "VAE state dict: expected AutoencoderKLWan names (encoder.conv_in.weight, post_quant_conv.weight)"
        )
    arch = VaeArch(
        base_dim=int(diffusers_sd["encoder.conv_in.weight"].shape[0]),
        z_dim=int(diffusers_sd["post_quant_conv.weight"].shape[0]),
    )
    what = f"a base_dim-{arch.base_dim} Wan VAE"
    return rename_exactly(diffusers_sd, _vae_name_maps(arch)[1], vae_native_shapes(arch), what, "VAE state dict: ")


def vae_native_to_diffusers_names(arch: VaeArch) -> dict[str, str]:
    """native name -> `AutoencoderKLWan` name, for every tensor of `arch`."""
    return dict(_vae_name_maps(arch)[0])


def vae_diffusers_config(arch: VaeArch) -> dict[str, Any]:
    """Kwargs for `AutoencoderKLWan.from_config`; the rest (latents mean/std, ...) keep Wan 2.1's defaults."""
    return {
        "base_dim": arch.base_dim,
        "z_dim": arch.z_dim,
        "dim_mult": list(_VAE_DIM_MULT),
        "num_res_blocks": _VAE_RES_BLOCKS,
        "attn_scales": [],
        "temperal_downsample": list(_VAE_TEMPORAL_DOWN),
        "dropout": 0.0,
    }


@lru_cache(maxsize=4)
def _vae_name_maps(arch: VaeArch) -> tuple[dict[str, str], dict[str, str]]:
    return converter_name_maps(vae_native_shapes(arch), convert_wan_vae_to_diffusers, "Wan VAE")


def _conv(shapes: Shapes, prefix: str, cout: int, cin: int, kernel: tuple[int, ...]) -> None:
    shapes[f"{prefix}.weight"] = (cout, cin, *kernel)
    shapes[f"{prefix}.bias"] = (cout,)


def _residual(shapes: Shapes, prefix: str, cin: int, cout: int) -> None:
    """`ResidualBlock`: RMS_norm, SiLU, conv, RMS_norm, SiLU, dropout, conv (+ 1x1x1 shortcut)."""
    shapes[f"{prefix}.residual.0.gamma"] = (cin, 1, 1, 1)
    _conv(shapes, f"{prefix}.residual.2", cout, cin, (3, 3, 3))
    shapes[f"{prefix}.residual.3.gamma"] = (cout, 1, 1, 1)
    _conv(shapes, f"{prefix}.residual.6", cout, cout, (3, 3, 3))
    if cin != cout:
        _conv(shapes, f"{prefix}.shortcut", cout, cin, (1, 1, 1))


def _middle(shapes: Shapes, prefix: str, dim: int) -> None:
    """Residual, single-head spatial attention, residual."""
    _residual(shapes, f"{prefix}.0", dim, dim)
    shapes[f"{prefix}.1.norm.gamma"] = (dim, 1, 1)
    _conv(shapes, f"{prefix}.1.to_qkv", 3 * dim, dim, (1, 1))
    _conv(shapes, f"{prefix}.1.proj", dim, dim, (1, 1))
    _residual(shapes, f"{prefix}.2", dim, dim)


# --- shared helpers ------------------------------------------------------------------------


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ConfigError(f"{source}: missing tensor {key!r}")
    shape = tuple(int(s) for s in shapes[key])
    if len(shape) != ndim:
        raise ConfigError(f"{source}: {key}: expected {ndim} dimensions, found shape {list(shape)}")
    return shape


def _count_blocks(shapes: Mapping[str, tuple[int, ...]], source: str) -> int:
    indices = {int(m.group(1)) for k in shapes if (m := _T5_NATIVE_RE.fullmatch(k))}
    if not indices:
        raise ConfigError(f"{source}: expected tensors blocks.0.* ..., found none")
    if indices != set(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise ConfigError(f"{source}: blocks are not numbered 0..{max(indices)}; missing block(s) {missing[:5]}")
    return len(indices)
