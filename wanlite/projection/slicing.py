"""Apply one `Selection` to every native Wan tensor: which axis takes which index set.

The table below is the whole width story of the projection. Every tensor that
reads or writes the residual stream, and every per-channel vector living in it
(modulation's 6 chunks, time_projection's 6 chunks, head modulation, norm3,
the embeddings' outputs), takes the SAME channel set `C`; attention tensors take
the kept heads' 128-wide channel blocks; FFN tensors take the kept neurons.
The embeddings' hidden layers (text_embedding.0 -> .2, time_embedding.0 -> .2)
are sized `dim` but are not residual channels: they take their own hidden-unit
sets (`T`, `M`), ranked by their own activations (or `C` again, the uniform
baseline's choice).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from wanlite.projection.select import Selection

# index-set codes: C residual channels, C6 the six dim-sized chunks of time_projection,
# S/X self-/cross-attention head channels, N FFN neurons, T/M text/time embedding hidden units;
# "" = axis kept whole.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"patch_embedding\.weight", ("C", "", "", "", "")),
    (r"patch_embedding\.bias", ("C",)),
    (r"text_embedding\.0\.bias", ("T",)),
    (r"time_embedding\.0\.bias", ("M",)),
    (r"text_embedding\.0\.weight", ("T", "")),
    (r"time_embedding\.0\.weight", ("M", "")),
    (r"text_embedding\.2\.weight", ("C", "T")),
    (r"time_embedding\.2\.weight", ("C", "M")),
    (r"(text_embedding|time_embedding)\.2\.bias", ("C",)),
    (r"time_projection\.1\.weight", ("C6", "C")),
    (r"time_projection\.1\.bias", ("C6",)),
    (r"blocks\.\d+\.modulation", ("", "", "C")),
    (r"blocks\.\d+\.(self|cross)_attn\.[qkv]\.weight", ("H", "C")),
    (r"blocks\.\d+\.(self|cross)_attn\.[qkv]\.bias", ("H",)),
    (r"blocks\.\d+\.(self|cross)_attn\.o\.weight", ("C", "H")),
    (r"blocks\.\d+\.(self|cross)_attn\.o\.bias", ("C",)),
    (r"blocks\.\d+\.(self|cross)_attn\.norm_[qk]\.weight", ("H",)),
    (r"blocks\.\d+\.norm3\.(weight|bias)", ("C",)),
    (r"blocks\.\d+\.ffn\.0\.weight", ("N", "C")),
    (r"blocks\.\d+\.ffn\.0\.bias", ("N",)),
    (r"blocks\.\d+\.ffn\.2\.weight", ("C", "N")),
    (r"blocks\.\d+\.ffn\.2\.bias", ("C",)),
    (r"head\.modulation", ("", "", "C")),
    (r"head\.head\.weight", ("", "C")),
    (r"head\.head\.bias", ("",)),
)
_COMPILED = tuple((re.compile(pattern), axes) for pattern, axes in _RULES)
_BLOCK = re.compile(r"blocks\.(\d+)\.(.*)")
_NAMES = {
    "C": "residual channels",
    "C6": "residual channels in each of 6 chunks",
    "S": "kept self-attn heads",
    "X": "kept cross-attn heads",
    "N": "kept FFN neurons",
    "T": "kept text-embedding hidden units",
    "M": "kept time-embedding hidden units",
}


@dataclass(frozen=True)
class Plan:
    """How one student tensor is made: its teacher source name, an index per axis, and a scale."""

    student_name: str
    teacher_name: str
    index: tuple[torch.Tensor | None, ...]
    axes: tuple[str, ...]
    scale: float = 1.0

    def describe(self) -> str:
        parts = [f"axis {i}: {_NAMES.get(code, code)}" for i, code in enumerate(self.axes) if code]
        text = "index-select (" + ", ".join(parts) + ")" if parts else "copy"
        return text + (f", RMSNorm weight x {self.scale:.6g} (kept/all RMS ratio)" if self.scale != 1.0 else "")


def plan(student_name: str, selection: Selection, teacher_dim: int) -> Plan:
    """The slicing plan for one student tensor (native name), from the rule table."""
    block = _BLOCK.fullmatch(student_name)
    j = int(block.group(1)) if block else None
    teacher_name = f"blocks.{selection.layers[j]}.{block.group(2)}" if block else student_name
    axes = _axes_for(student_name)
    attn = "self_attn" if ".self_attn." in student_name else "cross_attn"
    resolved = tuple("S" if code == "H" and attn == "self_attn" else "X" if code == "H" else code for code in axes)
    sets = {
        "C": selection.channels,
        "C6": torch.cat([selection.channels + k * teacher_dim for k in range(6)]),
        "T": selection.embedding_hidden("text_embedding"),
        "M": selection.embedding_hidden("time_embedding"),
    }
    if j is not None:
        sets["S"] = selection.head_channels("self_attn", j)
        sets["X"] = selection.head_channels("cross_attn", j)
        sets["N"] = selection.neurons[j]
    index = tuple(sets[code] if code else None for code in resolved)
    scale = 1.0
    norm = re.search(r"(self_attn|cross_attn)\.(norm_[qk])\.weight$", student_name)
    if norm:
        scale = selection.qk_scale[f"{norm.group(1)}.{norm.group(2)}"][j]
    return Plan(student_name, teacher_name, index, resolved, scale)


def apply(plan_: Plan, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Select along each axis in turn, cast to `dtype`, then scale (exactly 1.0 means untouched).

    Selecting before casting keeps the temporary at student size; scaling after
    casting keeps a bf16 teacher's rescaled weights from being rounded twice.
    """
    if tensor.ndim != len(plan_.index):
        raise ValueError(f"{plan_.teacher_name}: expected {len(plan_.index)} axes, found shape {tuple(tensor.shape)}")
    out = tensor
    for axis, idx in enumerate(plan_.index):
        if idx is not None:
            out = out.index_select(axis, idx)
    out = out.to(dtype)
    return out * plan_.scale if plan_.scale != 1.0 else out


def _axes_for(name: str) -> tuple[str, ...]:
    for pattern, axes in _COMPILED:
        if pattern.fullmatch(name):
            return axes
    raise KeyError(f"{name}: no slicing rule for this tensor (not a native Wan T2V tensor?)")
