"""Native <-> diffusers Wan transformer names: the exporter's correctness rests on these."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from wanlite.checkpoint import transformer_keys as tk
from wanlite.config import A14B, TINY_TEACHER, ConfigError


def test_native_key_set_has_the_official_size():
    shapes = tk.native_tensor_shapes(A14B)
    assert len(shapes) == 12 + 27 * 40 + 3
    assert shapes["blocks.39.ffn.0.weight"] == (13824, 5120)
    assert shapes["head.head.weight"] == (64, 5120)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == A14B.num_params()


def test_documented_renames_hold():
    names = tk.native_to_diffusers_names(TINY_TEACHER)
    assert names["blocks.0.norm3.weight"] == "blocks.0.norm2.weight"  # affine norm before cross-attn
    assert names["blocks.0.modulation"] == "blocks.0.scale_shift_table"
    assert names["head.modulation"] == "scale_shift_table"
    assert names["head.head.weight"] == "proj_out.weight"
    assert names["blocks.1.cross_attn.o.bias"] == "blocks.1.attn2.to_out.0.bias"


def test_round_trip_through_a_real_model_is_exact_and_forward_identical():
    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config(TINY_TEACHER.diffusers_config()).eval()
    for p in model.parameters():  # the default init zeroes some tensors; make every one count
        torch.nn.init.normal_(p, std=0.02)
    native = tk.to_native(model.state_dict(), TINY_TEACHER)
    assert {k: tuple(v.shape) for k, v in native.items()} == tk.native_tensor_shapes(TINY_TEACHER)
    prefixed = {tk.COMFY_PREFIX + k: v for k, v in native.items()}
    reloaded = WanTransformer3DModel.from_config(TINY_TEACHER.diffusers_config()).eval()
    reloaded.load_state_dict(tk.to_diffusers(prefixed), strict=True)
    x = torch.randn(1, 16, 1, 8, 8)
    t = torch.tensor([500])
    ctx = torch.randn(1, 512, 4096)
    with torch.no_grad():
        a = model(x, t, ctx, return_dict=False)[0]
        b = reloaded(x, t, ctx, return_dict=False)[0]
    assert torch.equal(a, b)


def test_to_native_names_the_hole_in_an_incomplete_state_dict():
    sd = WanTransformer3DModel.from_config(TINY_TEACHER.diffusers_config()).state_dict()
    del sd["blocks.2.attn1.norm_q.weight"]
    with pytest.raises(KeyError, match="missing tensor 'blocks.2.attn1.norm_q.weight'"):
        tk.to_native(sd, TINY_TEACHER)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="unexpected tensor 'extra.weight'"):
        tk.to_native(sd, TINY_TEACHER)


def test_arch_is_inferred_from_shapes_like_comfyui():
    assert tk.arch_from_native_shapes(tk.native_tensor_shapes(A14B)) == A14B
    with pytest.raises(ConfigError, match="not a native Wan transformer"):
        tk.arch_from_native_shapes({"foo": (1,)})
