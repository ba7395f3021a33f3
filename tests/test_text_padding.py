"""Compact text padding computes what Wan computes on the full 512-row zero-padded context."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel

from wanlite.config import get_preset
from wanlite.distill.data import EmbeddingSet
from wanlite.pipeline import pad_embeddings
from wanlite.text_padding import compact_text_padding

ARCH = get_preset("tiny").arch
LENGTHS = (3, 11, 0, 7)


def _models() -> tuple[WanTransformer3DModel, WanTransformer3DModel]:
    torch.manual_seed(0)
    plain = WanTransformer3DModel.from_config(ARCH.diffusers_config())
    for p in plain.parameters():  # diffusers zero-initialises some outputs; make every path count
        p.data.normal_(0, 0.05)
    compact = WanTransformer3DModel.from_config(ARCH.diffusers_config())
    compact.load_state_dict(plain.state_dict())
    return plain, compact_text_padding(compact)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(LENGTHS), 16, 1, 8, 8, generator=gen)
    t = torch.tensor([10.0, 300.0, 600.0, 990.0])
    context = torch.zeros(len(LENGTHS), 512, ARCH.text_dim)
    for row, length in enumerate(LENGTHS):
        context[row, :length] = torch.randn(length, ARCH.text_dim, generator=gen)
    return x, t, context


def test_trimmed_context_matches_the_full_padding() -> None:
    plain, compact = _models()
    x, t, context = _batch()
    trimmed = context[:, : max(LENGTHS)]
    with torch.no_grad():
        want = plain(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
        got = compact(hidden_states=x, timestep=t, encoder_hidden_states=trimmed, return_dict=False)[0]
        positional = compact(x, t, trimmed, return_dict=False)[0]
        full = compact(x, t, context, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(positional, got, rtol=0, atol=0)
    torch.testing.assert_close(full, want, rtol=0, atol=0)  # a 512-row context runs unchanged


def test_a_deep_copy_of_a_compact_model_matches_the_full_padding() -> None:
    """An EMA copy is a deep copy: its hook must drive its own processor (the toy teacher's copies drove the
    original's, attended to trimmed text as if unpadded, and measured 78 % where the weights score 96 %)."""
    plain, compact = _models()
    copy_ = copy.deepcopy(compact)
    x, t, context = _batch()
    with torch.no_grad():
        want = plain(x, t, context, return_dict=False)[0]
        got = copy_(x, t, context[:, : max(LENGTHS)], return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_match_the_full_padding() -> None:
    plain, compact = _models()
    x, t, context = _batch()
    trimmed = context[:, : max(LENGTHS)]
    plain(x, t, context, return_dict=False)[0].square().mean().backward()
    compact(x, t, trimmed, return_dict=False)[0].square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), compact.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_compact_batches_pad_prompt_and_negative_to_their_longest() -> None:
    gen = torch.Generator().manual_seed(2)
    embeds = [torch.randn(n, 8, generator=gen) for n in (3, 11, 7)]
    emb = EmbeddingSet(["a", "b", "c"], embeds, torch.randn(20, 8, generator=gen), "sha", "digest", "uri")
    rows = torch.tensor([0, 2])
    context, negative = emb.compact(rows, with_negative=True)
    assert context.shape == negative.shape == (2, 20, 8)
    torch.testing.assert_close(context, emb.context(rows)[:, :20], rtol=0, atol=0)
    torch.testing.assert_close(negative, emb.negative_context(2)[:, :20], rtol=0, atol=0)
    alone, none = emb.compact(rows)
    assert none is None
    torch.testing.assert_close(alone, pad_embeddings([embeds[0], embeds[2]], 7), rtol=0, atol=0)


def test_a_context_longer_than_wan_pads_to_is_refused() -> None:
    _, compact = _models()
    x, t, _ = _batch()
    with pytest.raises(ValueError, match="text context: expected at most 512 tokens, found 513"):
        compact(x, t, torch.zeros(4, 513, ARCH.text_dim), return_dict=False)
