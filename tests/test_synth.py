"""Synthetic teachers: the real layouts, loadable by the real libraries, deterministic."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, UMT5EncoderModel

from wanlite import cli
from wanlite.checkpoint import layout as L
from wanlite.checkpoint import synth
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
)
from wanlite.checkpoint.synth import TINY_T5, TINY_VAE, SynthTensors, synth_teacher, write_native_expert
from wanlite.checkpoint.tokenizer import TOKENIZER_FILES
from wanlite.checkpoint.transformer_keys import native_tensor_shapes, native_to_diffusers_names, to_diffusers
from wanlite.config import A14B, TINY_TEACHER

OFFICIAL_CONFIG_KEYS = {
    "_class_name", "_diffusers_version", "dim", "eps", "ffn_dim", "freq_dim",
    "in_dim", "model_type", "num_heads", "num_layers", "out_dim", "text_len",
}  # fmt: skip
SHARD_RE = re.compile(r"diffusion_pytorch_model-(\d{5})-of-(\d{5})\.safetensors")


def _files(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _expert_state_dict(expert_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((expert_dir / L.SHARD_INDEX).read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(expert_dir / shard))
    return out


def _diffusers_state_dict(component_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(component_dir.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


# --- native layout ----------------------------------------------------------------------------


def test_native_tree_is_exactly_the_official_layout(tiny_teacher: Path) -> None:
    files = set(_files(tiny_teacher))
    expected = {L.NATIVE_T5, L.NATIVE_VAE}
    expected |= {f"{L.NATIVE_TOKENIZER}/{name}" for name in TOKENIZER_FILES}
    for expert in L.EXPERT_DIRS:
        expected |= {f"{expert}/{L.EXPERT_CONFIG}", f"{expert}/{L.SHARD_INDEX}"}
        expected |= {f"{expert}/{L.shard_name(k, 3)}" for k in (1, 2, 3)}
    assert files == expected
    assert L.detect_layout(tiny_teacher) == "native"


@pytest.mark.parametrize("expert", L.EXPERT_DIRS)
def test_native_expert_config_index_and_shards(tiny_teacher: Path, expert: str) -> None:
    expert_dir = tiny_teacher / expert
    config = json.loads((expert_dir / L.EXPERT_CONFIG).read_text())
    assert set(config) == OFFICIAL_CONFIG_KEYS
    assert config == TINY_TEACHER.native_config()

    index = json.loads((expert_dir / L.SHARD_INDEX).read_text())
    assert set(index) == {"metadata", "weight_map"}
    expected = native_tensor_shapes(TINY_TEACHER)
    assert set(index["weight_map"]) == set(expected)  # every tensor, each in exactly one shard (a dict)
    seen: dict[str, str] = {}
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        match = SHARD_RE.fullmatch(shard)
        assert match and int(match.group(2)) == 3
        with safe_open(expert_dir / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert name not in seen
                seen[name] = shard
                piece = f.get_slice(name)
                assert tuple(piece.get_shape()) == expected[name]
                assert piece.get_dtype() == "F32"
                total += f.get_tensor(name).nbytes
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("expert", L.EXPERT_DIRS)
def test_native_expert_loads_strictly_into_diffusers_and_runs(tiny_teacher: Path, expert: str) -> None:
    model = WanTransformer3DModel.from_config(TINY_TEACHER.diffusers_config())
    model.load_state_dict(to_diffusers(_expert_state_dict(tiny_teacher / expert)), strict=True)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 1, 8, 8, generator=generator)
    context = torch.randn(1, 512, 4096, generator=generator)
    with torch.no_grad():
        out = model.eval()(latents, timestep=torch.tensor([900]), encoder_hidden_states=context).sample
    assert out.shape == (1, 16, 1, 8, 8)
    assert torch.isfinite(out).all() and out.std() > 0.01


def test_native_t5_encodes_our_tokens_through_transformers(tiny_teacher: Path) -> None:
    native = torch.load(tiny_teacher / L.NATIVE_T5, weights_only=True, map_location="cpu")
    assert list(native) == list(t5_native_shapes(TINY_T5))
    assert {v.dtype for v in native.values()} == {torch.bfloat16}
    arch = T5Arch.from_native_shapes({k: tuple(v.shape) for k, v in native.items()})
    assert arch == TINY_T5
    encoder = UMT5EncoderModel(t5_hf_config(arch)).to(torch.bfloat16).eval()
    encoder.load_state_dict(t5_native_to_hf(native), strict=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher / L.NATIVE_TOKENIZER)
    batch = tokenizer(["a watercolor of a lighthouse at dawn"], return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    assert hidden.shape == (1, batch.input_ids.shape[1], 4096)
    assert torch.isfinite(hidden).all() and hidden.float().std() > 0.01


def test_native_vae_round_trips_an_image_through_diffusers(tiny_teacher: Path) -> None:
    native = torch.load(tiny_teacher / L.NATIVE_VAE, weights_only=True, map_location="cpu")
    assert list(native) == list(vae_native_shapes(TINY_VAE))
    arch = VaeArch.from_native_shapes({k: tuple(v.shape) for k, v in native.items()})
    vae = AutoencoderKLWan.from_config(vae_diffusers_config(arch)).eval()
    vae.load_state_dict(convert_wan_vae_to_diffusers(native), strict=True)
    image = torch.rand(1, 3, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(image).latent_dist.mode()
        decoded = vae.decode(latent).sample
    assert latent.shape == (1, 16, 1, 8, 8)
    assert decoded.shape == (1, 3, 1, 64, 64)
    assert torch.isfinite(latent).all() and torch.isfinite(decoded).all()


# --- diffusers layout -------------------------------------------------------------------------


def test_diffusers_tree_and_model_index(tiny_diffusers_teacher: Path) -> None:
    root = tiny_diffusers_teacher
    assert L.detect_layout(root) == "diffusers"
    index = json.loads((root / L.MODEL_INDEX).read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["boundary_ratio"] == 0.875 and index["expand_timesteps"] is False
    entries = {k for k in index if not k.startswith("_")}
    assert entries == {*L.DIFFUSERS_COMPONENTS, "boundary_ratio", "expand_timesteps"}
    assert index["transformer"] == index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "flow_prediction" and scheduler["use_flow_sigmas"] is True
    assert sorted(p.name for p in (root / "tokenizer").iterdir()) == sorted(TOKENIZER_FILES)
    for component in L.DIFFUSERS_COMPONENTS:
        assert (root / component).is_dir()


def test_both_layouts_of_one_seed_hold_the_same_weights(tiny_teacher: Path, tiny_diffusers_teacher: Path) -> None:
    names = native_to_diffusers_names(TINY_TEACHER)
    for native_dir, component in L.DIFFUSERS_EXPERTS.items():
        native = _expert_state_dict(tiny_teacher / native_dir)
        diffusers = _diffusers_state_dict(tiny_diffusers_teacher / component)
        assert set(diffusers) == set(names.values())
        assert all(torch.equal(native[k], diffusers[names[k]]) for k in native), native_dir
    high, low = (_expert_state_dict(tiny_teacher / d) for d in L.EXPERT_DIRS)
    assert not torch.equal(high["head.head.weight"], low["head.head.weight"])  # two different experts

    t5 = torch.load(tiny_teacher / L.NATIVE_T5, weights_only=True)
    t5_diffusers = t5_hf_to_native(_diffusers_state_dict(tiny_diffusers_teacher / "text_encoder"))
    assert list(t5_diffusers) == list(t5) and all(torch.equal(t5[k], t5_diffusers[k]) for k in t5)
    vae = torch.load(tiny_teacher / L.NATIVE_VAE, weights_only=True)
    vae_diffusers = vae_diffusers_to_native(_diffusers_state_dict(tiny_diffusers_teacher / "vae"))
    assert all(torch.equal(vae[k], vae_diffusers[k]) for k in vae)
    assert _files(tiny_teacher / L.NATIVE_TOKENIZER) == _files(tiny_diffusers_teacher / "tokenizer")


@pytest.mark.slow
def test_diffusers_layout_generates_an_image_with_wanpipeline(tiny_diffusers_teacher: Path) -> None:
    pipe = WanPipeline.from_pretrained(tiny_diffusers_teacher)
    assert pipe.config.boundary_ratio == 0.875
    result = pipe(
        prompt="a red fox in fresh snow",
        negative_prompt="blurry",
        height=64,
        width=64,
        num_frames=1,
        num_inference_steps=2,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    frames = result.frames
    assert tuple(frames.shape) == (1, 1, 3, 64, 64)
    assert torch.isfinite(frames).all()


# --- determinism and the command line ---------------------------------------------------------


def test_cli_rebuild_is_byte_identical_and_the_seed_changes_weights(tiny_teacher: Path, tmp_path: Path) -> None:
    assert cli.main(["synth-teacher", str(tmp_path / "same"), "--size", "tiny", "--seed", "0"]) == 0
    assert _files(tmp_path / "same") == _files(tiny_teacher)
    for component in (synth.expert_tensors("tiny", "high_noise_model", 1), synth.t5_tensors("tiny", 1)):
        seed0 = type(component)(component.shapes, component.dtype, 0, component.component)
        assert all(not torch.equal(component[k], seed0[k]) for k in list(component)[:5])


def test_diffusers_rebuild_is_byte_identical(tiny_diffusers_teacher: Path, tmp_path: Path) -> None:
    again = synth_teacher(tmp_path / "again", layout="diffusers", seed=0)
    assert _files(again) == _files(tiny_diffusers_teacher)


def test_synth_refuses_an_existing_directory_and_bad_options(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken: already exists"):
        synth_teacher(tmp_path / "taken")
    with pytest.raises(ValueError, match="diffusers layout is synthesised at size 'tiny' only"):
        synth_teacher(tmp_path / "x", size="a14b", layout="diffusers")
    with pytest.raises(ValueError, match="sparse: only meaningful for size 'a14b'"):
        synth_teacher(tmp_path / "x", sparse=True)
    with pytest.raises(ValueError, match="size: expected one of"):
        synth_teacher(tmp_path / "x", size="huge")
    assert cli.main(["synth-teacher", str(tmp_path / "taken")]) == 2
    assert list(tmp_path.iterdir()) == [tmp_path / "taken"]  # nothing half-written left behind


# --- writers ------------------------------------------------------------------------------------


def test_write_native_expert_names_bad_tensors(tmp_path: Path) -> None:
    tensors = {k: torch.zeros(s) for k, s in native_tensor_shapes(TINY_TEACHER).items()}
    with pytest.raises(KeyError, match="missing tensor 'head.head.bias'"):
        write_native_expert(tmp_path / "a", {k: v for k, v in tensors.items() if k != "head.head.bias"}, TINY_TEACHER)
    with pytest.raises(KeyError, match="unexpected tensor 'blocks.4.norm3.weight'"):
        write_native_expert(tmp_path / "b", {**tensors, "blocks.4.norm3.weight": torch.zeros(256)}, TINY_TEACHER)
    with pytest.raises(ValueError, match=r"blocks.1.ffn.0.weight: expected shape \[640, 256\], found \[600, 256\]"):
        write_native_expert(tmp_path / "c", {**tensors, "blocks.1.ffn.0.weight": torch.zeros(600, 256)}, TINY_TEACHER)
    with pytest.raises(ValueError, match="expected one dtype"):
        write_native_expert(tmp_path / "d", {**tensors, "head.head.bias": torch.zeros(64).half()}, TINY_TEACHER)
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_write_native_expert_single_shard_still_has_an_index(tmp_path: Path) -> None:
    tensors = {k: torch.randn(s).to(torch.bfloat16) for k, s in native_tensor_shapes(TINY_TEACHER).items()}
    out = write_native_expert(tmp_path / "e", tensors, TINY_TEACHER, max_shard_bytes=10**9)
    assert sorted(p.name for p in out.iterdir()) == [L.EXPERT_CONFIG, L.shard_name(1, 1), L.SHARD_INDEX]
    loaded = _expert_state_dict(out)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_streamed_writers_chunk_correctly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The a14b code paths (chunked safetensors, skip_data .pth filled in place) on small shapes."""
    monkeypatch.setattr(synth, "_CHUNK_ELEMENTS", 1000)  # many chunks per tensor, ragged last chunk
    shapes = {"token_embedding.weight": (700, 24), "blocks.0.norm1.weight": (24,), "odd": (3, 5, 7)}
    for dtype in (torch.bfloat16, torch.float32):
        tensors = SynthTensors(shapes, dtype, seed=3, component="t5")
        assert len(list(tensors.chunks("token_embedding.weight"))) > 10
        expected = tensors.materialize()
        synth.write_safetensors(tmp_path / "s.safetensors", shapes, dtype, tensors.chunks)
        loaded = load_file(tmp_path / "s.safetensors")
        assert set(loaded) == set(shapes)
        assert all(torch.equal(loaded[k], expected[k]) for k in shapes)
        synth.write_pth(tmp_path / "t.pth", tensors)
        for mmap in (False, True):
            loaded = torch.load(tmp_path / "t.pth", weights_only=True, mmap=mmap)
            assert list(loaded) == list(shapes)
            assert all(torch.equal(loaded[k], expected[k]) for k in shapes)


def test_sparse_a14b_has_full_shapes_and_costs_no_disk(tmp_path: Path) -> None:
    root = synth_teacher(tmp_path / "a14b", size="a14b", sparse=True)
    apparent = disk = 0
    for path in root.rglob("*"):
        if path.is_file():
            apparent += path.stat().st_size
            disk += path.stat().st_blocks * 512
    assert apparent > 120e9 and disk < 32 * 2**20

    expected = native_tensor_shapes(A14B)
    for expert in L.EXPERT_DIRS:
        assert json.loads((root / expert / L.EXPERT_CONFIG).read_text()) == A14B.native_config()
        index = json.loads((root / expert / L.SHARD_INDEX).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert shards == [L.shard_name(k, 6) for k in range(1, 7)]  # six ~10 GB shards, like the official
        assert index["metadata"]["total_size"] == A14B.num_params() * 4
        found: dict[str, tuple[int, ...]] = {}
        for shard in shards:
            with safe_open(root / expert / shard, framework="pt") as f:
                found.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})  # noqa: SIM118
        assert found == expected
    t5 = torch.load(root / L.NATIVE_T5, weights_only=True, mmap=True)
    assert {k: tuple(v.shape) for k, v in t5.items()} == t5_native_shapes(UMT5_XXL)
    assert t5["token_embedding.weight"].dtype == torch.bfloat16
    vae = torch.load(root / L.NATIVE_VAE, weights_only=True, mmap=True)
    assert {k: tuple(v.shape) for k, v in vae.items()} == vae_native_shapes(WAN21_VAE)
    assert AutoTokenizer.from_pretrained(root / L.NATIVE_TOKENIZER).pad_token_id == 0


def test_layers_keeps_a14b_width_with_fewer_blocks(tmp_path: Path) -> None:
    assert cli.main(["synth-teacher", str(tmp_path / "two"), "--size", "a14b", "--layers", "2", "--sparse"]) == 0
    arch = A14B.replace(num_layers=2)
    for expert in L.EXPERT_DIRS:
        assert json.loads((tmp_path / "two" / expert / L.EXPERT_CONFIG).read_text()) == arch.native_config()
        index = json.loads((tmp_path / "two" / expert / L.SHARD_INDEX).read_text())
        assert set(index["weight_map"]) == set(native_tensor_shapes(arch))
        assert index["metadata"]["total_size"] == arch.num_params() * 4
    assert cli.main(["synth-teacher", str(tmp_path / "zero"), "--layers", "0"]) == 2
    assert not (tmp_path / "zero").exists()
