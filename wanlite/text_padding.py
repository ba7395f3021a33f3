"""Wan's 512-token zero-padded text context, computed without the padding.

Wan pads every T5 embedding with zero rows to 512 tokens and cross-attends to
all of them without a mask. The zero rows all embed to the same key and value
(the text embedding is per token and cross-attention keys carry no position),
so attending to n identical rows equals attending to one of them with its
logit raised by log(n). `compact_text_padding` installs exactly that on a Wan
transformer: it then accepts a context padded only to the batch's longest prompt
(`EmbeddingSet.compact`) and computes what it would have computed on the full 512
rows, to float rounding. On a short-sequence model (training at small
resolutions, the toy benchmarks) the padded text is most of the work; at 1024²
it is a few per cent.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import nn


class CompactTextAttnProcessor(WanAttnProcessor):
    """Wan's cross-attention with a per-sample additive logit bias standing in for the trimmed padding."""

    def __init__(self) -> None:
        super().__init__()
        self.bias: torch.Tensor | None = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("cross-attention: an attention mask cannot be combined with compact text padding")
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.bias, rotary_emb)


def compact_text_padding(model: nn.Module, text_len: int = 512) -> nn.Module:
    """Let `model` (a diffusers Wan transformer) take contexts shorter than `text_len`, as if zero-padded to it.

    A context of `text_len` rows runs exactly as before. A shorter one gets one
    zero row appended (so every sample has a row to stand for its padding) and
    the zero rows' logits raised by log(notional zero rows / present zero rows).
    Returns `model`, changed in place; a model already made compact is returned as it is.
    """
    if isinstance(model.blocks[0].attn2.processor, CompactTextAttnProcessor):
        return model
    processor = CompactTextAttnProcessor()
    for block in model.blocks:
        block.attn2.set_processor(processor)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        positional = "encoder_hidden_states" not in kwargs
        context = args[2] if positional else kwargs["encoder_hidden_states"]
        # The processor is looked up on the module called, not captured: a deep copy of a compact
        # model (an EMA copy) then drives its own processor, not the original's.
        context, module.blocks[0].attn2.processor.bias = _pad_one(context, text_len)
        if positional:
            args = (*args[:2], context, *args[3:])
        else:
            kwargs = {**kwargs, "encoder_hidden_states": context}
        return args, kwargs

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return model


def _pad_one(context: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context with one zero row appended, logit bias [B, 1, 1, L+1]); unchanged and None at full length."""
    batch, length, dim = context.shape
    if length > text_len:
        raise ValueError(f"text context: expected at most {text_len} tokens, found {length}")
    if length == text_len:
        return context, None
    context = torch.cat([context, context.new_zeros(batch, 1, dim)], dim=1)
    zero = (context == 0).all(dim=-1)
    present = zero.sum(dim=1, keepdim=True)
    notional = text_len - (length + 1 - present)
    bias = torch.where(zero, (notional / present).log(), 0.0)
    return context, bias.to(context.dtype)[:, None, None, :]

