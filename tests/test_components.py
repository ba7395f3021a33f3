"""T5 and VAE shape tables and key conversions, proved against transformers and diffusers."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from transformers import AutoTokenizer, UMT5EncoderModel

from wanlite.checkpoint import layout as L
from wanlite.checkpoint.components import (
    UMT5_XXL,
    WAN21_VAE,
    T5Arch,
    VaeArch,
    t5_hf_config,
    t5_hf_to_native,
    t5_native_shapes,
    t5_native_to_hf,
    vae_diffusers_config,
    vae_diffusers_to_native,
    vae_native_shapes,
    vae_native_to_diffusers_names,
)
from wanlite.checkpoint.synth import TINY_T5, TINY_VAE
from wanlite.checkpoint.tokenizer import TOKENIZER_FILES, VOCAB_SIZE, build_tokenizer
from wanlite.config import ConfigError

SMALL_T5 = T5Arch(vocab=VOCAB_SIZE, dim=64, dim_attn=32, dim_ffn=48, num_heads=2, num_layers=2)


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# --- VAE -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [TINY_VAE, WAN21_VAE], ids=["tiny", "wan21"])
def test_vae_native_table_matches_diffusers_model(arch: VaeArch) -> None:
    """Every native tensor maps to exactly one AutoencoderKLWan tensor of the same shape."""
    with torch.device("meta"):
        model_shapes = _shapes(AutoencoderKLWan.from_config(vae_diffusers_config(arch)).state_dict())
    native = vae_native_shapes(arch)
    names = vae_native_to_diffusers_names(arch)
    assert len(native) == 194  # WAN_FORMATS.md §4
    assert set(names.values()) == set(model_shapes)
    assert {names[k]: s for k, s in native.items()} == model_shapes


def test_full_vae_has_the_official_parameter_count() -> None:
    assert sum(math.prod(s) for s in vae_native_shapes(WAN21_VAE).values()) == 126_892_531  # "126.9M"


def test_vae_diffusers_to_native_inverts_diffusers_converter_exactly() -> None:
    torch.manual_seed(0)
    sd = AutoencoderKLWan.from_config(vae_diffusers_config(TINY_VAE)).state_dict()
    native = vae_diffusers_to_native(sd)
    assert list(native) == list(vae_native_shapes(TINY_VAE))
    back = convert_wan_vae_to_diffusers(native)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_vae_diffusers_to_native_names_the_bad_tensor() -> None:
    sd = AutoencoderKLWan.from_config(vae_diffusers_config(TINY_VAE)).state_dict()
    with pytest.raises(KeyError, match="decoder.conv_out.bias"):
        vae_diffusers_to_native({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"})
    with pytest.raises(KeyError, match="decoder.extra.weight"):
        vae_diffusers_to_native({**sd, "decoder.extra.weight": torch.zeros(1)})


def test_vae_arch_from_native_shapes() -> None:
    for arch in (TINY_VAE, WAN21_VAE):
        assert VaeArch.from_native_shapes(vae_native_shapes(arch)) == arch
    shapes = vae_native_shapes(TINY_VAE)
    del shapes["conv2.weight"]
    with pytest.raises(ConfigError, match=r"Wan2.1_VAE.pth: missing tensor 'conv2.weight'"):
        VaeArch.from_native_shapes(shapes, source="Wan2.1_VAE.pth")


# --- T5 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [TINY_T5, UMT5_XXL], ids=["tiny", "umt5-xxl"])
def test_t5_native_table_matches_transformers_model(arch: T5Arch) -> None:
    with torch.device("meta"):
        model_shapes = _shapes(UMT5EncoderModel(t5_hf_config(arch)).state_dict())
    converted = _shapes(t5_native_to_hf({k: torch.empty(s, device="meta") for k, s in t5_native_shapes(arch).items()}))
    assert converted == model_shapes


def test_full_t5_has_umt5_xxl_size() -> None:
    shapes = t5_native_shapes(UMT5_XXL)
    assert len(shapes) == 1 + 24 * 10 + 1  # WAN_FORMATS.md §5: no biases
    assert shapes["blocks.23.pos_embedding.embedding.weight"] == (32, 64)
    assert sum(math.prod(s) for s in shapes.values()) == 5_680_910_336


def test_t5_hf_native_hf_is_identity_and_numerically_equivalent() -> None:
    torch.manual_seed(0)
    source = UMT5EncoderModel(t5_hf_config(SMALL_T5)).eval()
    hf = source.state_dict()
    native = t5_hf_to_native(hf)
    assert list(native) == list(t5_native_shapes(SMALL_T5))
    back = t5_native_to_hf(native)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)

    rebuilt = UMT5EncoderModel(t5_hf_config(T5Arch.from_native_shapes(_shapes(native)))).eval()
    rebuilt.load_state_dict(t5_native_to_hf(native), strict=True)
    ids = torch.tensor([[5, 17, 300, 42, 1, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = source(input_ids=ids, attention_mask=mask).last_hidden_state
        found = rebuilt(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(found, expected)


def test_t5_hf_to_native_accepts_either_tied_embedding_name() -> None:
    native = {k: torch.randn(s) for k, s in t5_native_shapes(SMALL_T5).items()}
    hf = t5_native_to_hf(native)
    for drop in ("shared.weight", "encoder.embed_tokens.weight"):
        single = {k: v for k, v in hf.items() if k != drop}
        assert torch.equal(t5_hf_to_native(single)["token_embedding.weight"], native["token_embedding.weight"])
    with pytest.raises(ValueError, match="shared.weight and encoder.embed_tokens.weight differ"):
        t5_hf_to_native({**hf, "shared.weight": torch.zeros_like(hf["shared.weight"])})


def test_t5_conversions_name_unknown_tensors() -> None:
    with pytest.raises(KeyError, match="blocks.0.attn.qkv.weight"):
        t5_native_to_hf({"blocks.0.attn.qkv.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="lm_head.weight"):
        t5_hf_to_native({"shared.weight": torch.zeros(1), "lm_head.weight": torch.zeros(1)})


def test_t5_arch_from_native_shapes() -> None:
    for arch in (TINY_T5, UMT5_XXL):
        assert T5Arch.from_native_shapes(t5_native_shapes(arch)) == arch
    shapes = t5_native_shapes(TINY_T5)
    del shapes["blocks.0.pos_embedding.embedding.weight"]
    with pytest.raises(ConfigError, match="t5.pth: missing tensor 'blocks.0.pos_embedding.embedding.weight'"):
        T5Arch.from_native_shapes(shapes, source="t5.pth")


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_is_byte_identical_across_builds(tmp_path) -> None:
    def digests(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    first, second = build_tokenizer(tmp_path / "a"), build_tokenizer(tmp_path / "b")
    assert sorted(p.name for p in first.iterdir()) == sorted(TOKENIZER_FILES)
    assert digests(first) == digests(second)


def test_tokenizer_loads_with_autotokenizer_like_t5(tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "tok"))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == VOCAB_SIZE == TINY_T5.vocab
    batch = tokenizer(["A photo of a red fox in the snow.", "zebra"], padding="max_length", max_length=24)
    for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
        n = sum(mask)
        assert ids[n - 1] == 1 and all(i == 0 for i in ids[n:])  # EOS, then pad
        assert 2 not in ids[: n - 1]  # plain English never falls back to <unk>
    assert tokenizer.decode(batch.input_ids[0], skip_special_tokens=True) == "A photo of a red fox in the snow."


# --- layout detection ------------------------------------------------------------------------


def test_detect_layout(tmp_path) -> None:
    native = tmp_path / "native"
    for expert in L.EXPERT_DIRS:
        (native / expert).mkdir(parents=True)
        (native / expert / L.EXPERT_CONFIG).write_text("{}")
    diffusers = tmp_path / "diffusers"
    diffusers.mkdir()
    (diffusers / L.MODEL_INDEX).write_text("{}")
    assert L.detect_layout(native) == "native"
    assert L.detect_layout(diffusers) == "diffusers"

    (native / L.MODEL_INDEX).write_text("{}")
    with pytest.raises(L.LayoutError, match="found both"):
        L.detect_layout(native)
    half = tmp_path / "half"
    (half / "high_noise_model").mkdir(parents=True)
    (half / "high_noise_model" / L.EXPERT_CONFIG).write_text("{}")
    with pytest.raises(L.LayoutError, match=r"half: expected a native .* found high_noise_model/"):
        L.detect_layout(half)
    with pytest.raises(L.LayoutError, match="no such path"):
        L.detect_layout(tmp_path / "missing")
