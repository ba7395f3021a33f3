"""WanLiteStudent: a real Wan transformer that stock diffusers loads, with an image API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from wanlite.checkpoint.transformer_keys import to_native
from wanlite.config import ConfigError, WanArch, get_preset
from wanlite.student import SAVED_CLASS_NAME, StudentWeightsNotFound, WanLiteStudent

REPO = Path(__file__).resolve().parents[1]
TINY = get_preset("tiny").arch


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny student saved with save_pretrained, plus fixed inputs and its outputs on them."""
    torch.manual_seed(0)
    student = WanLiteStudent.from_arch(TINY).eval()
    folder = tmp_path_factory.mktemp("student") / "tiny"
    student.save_pretrained(folder)
    gen = torch.Generator().manual_seed(1)
    io = {
        "latents": torch.randn(2, 16, 8, 8, generator=gen),
        "timestep": torch.tensor([950.0, 200.0]),
        "context": torch.randn(2, 512, 4096, generator=gen),
    }
    with torch.no_grad():
        io["out"] = student.forward_image(io["latents"], io["timestep"], io["context"])
    save_file(io, folder.parent / "io.safetensors")
    return folder, io


def test_image_forward_is_the_one_frame_video_forward(saved):
    folder, io = saved
    student = WanLiteStudent.from_pretrained(folder)
    with torch.no_grad():
        video = student(io["latents"].unsqueeze(2), io["timestep"], io["context"]).sample
    assert video.shape == (2, 16, 1, 8, 8)
    assert torch.equal(video.squeeze(2), io["out"])
    with pytest.raises(ValueError, match=r"expected \[B, C, H, W\]"):
        student.forward_image(io["latents"].unsqueeze(2), io["timestep"], io["context"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_attention_heads": 2, "attention_head_dim": 64}, r"num_heads: expected dim/128 = 1, found 2"),
        ({"num_attention_heads": 1, "attention_head_dim": 100}, r"dim: 100 is not a multiple of 128"),
        ({"text_dim": 512}, r"text_dim: expected 4096, found 512"),
        ({"qk_norm": "rms_norm"}, r"qk_norm: expected 'rms_norm_across_heads'"),
    ],
)
def test_constructor_refuses_shapes_comfyui_cannot_run(fields, message):
    with pytest.raises(ConfigError, match=message):
        WanLiteStudent.from_config({**TINY.diffusers_config(), **fields})


def test_from_arch_validates_before_building():
    with pytest.raises(ConfigError, match="num_heads"):
        WanLiteStudent.from_arch(WanArch(dim=1024, ffn_dim=2816, num_heads=16, num_layers=2))


def test_saved_config_holds_architecture_only(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == SAVED_CLASS_NAME == "WanTransformer3DModel"
    init_keys = set(WanTransformer3DModel._get_init_keys(WanTransformer3DModel)) - {"self"}
    assert set(config) == init_keys | {"_class_name", "_diffusers_version"}
    assert WanArch.from_diffusers_config(config) == TINY
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


_FRESH_LOAD = """
import sys, torch
from safetensors.torch import load_file
folder, io_path, loader = sys.argv[1:4]
io = load_file(io_path)
if loader == "diffusers":
    import importlib.abc

    class NoWanlite(importlib.abc.MetaPathFinder):  # as if wanlite were not installed (it may be, editable)
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "wanlite":
                raise ImportError("wanlite is not installed in this process")

    sys.meta_path.insert(0, NoWanlite())
    from diffusers import AutoModel, WanTransformer3DModel
    # Stock diffusers refuses low_cpu_mem_usage=False for every Wan model (its
    # fp32-kept modules need the meta path), so only the default is stock.
    models = [WanTransformer3DModel.from_pretrained(folder), AutoModel.from_pretrained(folder)]
    assert all(type(m) is WanTransformer3DModel for m in models)
    assert not [m for m in sys.modules if m.split(".")[0] == "wanlite"]
else:
    from wanlite.student import WanLiteStudent
    models = [WanLiteStudent.from_pretrained(folder, low_cpu_mem_usage=low) for low in (True, False)]
for model in models:
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        out = model(io["latents"].unsqueeze(2), io["timestep"], io["context"]).sample.squeeze(2)
    assert torch.equal(out, io["out"]), (out - io["out"]).abs().max()
print("ok", len(models))
"""


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["wanlite", "diffusers"])
def test_fresh_process_reload_reproduces_outputs(saved, loader):
    """wanlite: low_cpu_mem_usage on and off; diffusers: a process where wanlite cannot even be imported."""
    folder, _ = saved
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if loader == "wanlite":
        env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_LOAD, str(folder), str(folder.parent / "io.safetensors"), loader],
        cwd="/", env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok 2")


@pytest.mark.parametrize(
    ("file_name", "native_keys", "config"),
    [
        ("diffusion_model.safetensors", True, None),  # native keys, shapes give the architecture
        ("diffusion_model.safetensors", True, "seed"),  # the seed notes' config vocabulary
        ("model.safetensors", False, "diffusers"),  # diffusers keys need their config.json
    ],
)
def test_loads_seed_single_file_layouts(saved, tmp_path, file_name, native_keys, config):
    folder, io = saved
    state = WanLiteStudent.from_pretrained(folder).state_dict()
    save_file(to_native(state, TINY) if native_keys else state, tmp_path / file_name)
    if config == "seed":
        seed = {"hidden_size": 128, "depth": 2, "num_heads": 1, "ffn_dim": 256, "num_channels": 16,
                "image_size": 64, "patch_size": 2, "text_max_length": 512, "text_encoder_output_dim": 4096}
        (tmp_path / "config.json").write_text(json.dumps(seed))
    elif config == "diffusers":
        (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    for low in (True, False):
        student = WanLiteStudent.from_pretrained(tmp_path, low_cpu_mem_usage=low)
        with torch.no_grad():
            assert torch.equal(student.forward_image(io["latents"], io["timestep"], io["context"]), io["out"])


def test_diffusers_keys_without_config_are_refused(saved, tmp_path):
    folder, _ = saved
    save_file(WanLiteStudent.from_pretrained(folder).state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="need a config.json"):
        WanLiteStudent.from_pretrained(tmp_path)


def test_folder_without_weights_lists_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.diffusers_config()))
    with pytest.raises(StudentWeightsNotFound) as err:
        WanLiteStudent.from_pretrained(tmp_path)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_model.safetensors", "model.safetensors", "found config.json"):
        assert name in str(err.value)


def test_seed_vocabulary_config_builds_the_student(tmp_path):
    seed = {"hidden_size": 256, "depth": 3, "num_heads": 2, "num_channels": 16, "image_size": 256,
            "patch_size": 2, "text_max_length": 512, "text_encoder_output_dim": 4096}
    (tmp_path / "student.json").write_text(json.dumps(seed))
    student = WanLiteStudent.from_student_config(tmp_path / "student.json")
    assert (student.arch.dim, student.arch.num_heads, student.arch.num_layers) == (256, 2, 3)
    seed["num_heads"] = 4
    (tmp_path / "student.json").write_text(json.dumps(seed))
    with pytest.raises(ConfigError, match="num_heads: expected dim/128 = 2, found 4"):
        WanLiteStudent.from_student_config(tmp_path / "student.json")


def test_a_student_built_with_weights_holds_those_tensors_and_the_ema_gather_keeps_them_on_one_rank() -> None:
    """What a run ships: the gathered EMA weights themselves (no random copy beside them), on the writing rank only."""
    from wanlite.distill.checkpointing import EMA

    trained = WanLiteStudent.from_arch(get_preset("tiny").arch)
    ema = EMA(trained, decay=0.9)
    assert ema.full_state_dict(keep=False) == {}, "a rank that does not write keeps nothing"
    weights = ema.full_state_dict()
    shipped = WanLiteStudent.with_weights(trained.config, weights)
    assert all(p.data_ptr() == weights[name].data_ptr() for name, p in shipped.named_parameters())
    x = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0])
    with torch.no_grad():
        assert torch.equal(shipped(x, t, context, return_dict=False)[0], trained(x, t, context, return_dict=False)[0])
