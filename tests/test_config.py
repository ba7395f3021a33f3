"""The architecture vocabulary every other module trusts: presets, config mapping, validation."""

import json

import pytest
from diffusers import WanTransformer3DModel

from wanlite.config import (
    A14B,
    PRESETS,
    TINY_TEACHER,
    ConfigError,
    WanArch,
    arch_from_seed_config,
    load_student_config,
    validate_student,
)


def test_a14b_matches_official_config_and_param_count():
    cfg = A14B.native_config()
    assert cfg == {
        "_class_name": "WanModel", "_diffusers_version": "0.33.0", "dim": 5120, "eps": 1e-06,
        "ffn_dim": 13824, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 40,
        "num_layers": 40, "out_dim": 16, "text_len": 512,
    }
    assert A14B.num_params() == 14_288_491_584  # 14.288B per expert (WAN_FORMATS.md §2)


@pytest.mark.parametrize("arch", [TINY_TEACHER, PRESETS["tiny"].arch])
def test_param_count_matches_a_real_diffusers_model(arch):
    model = WanTransformer3DModel.from_config(arch.diffusers_config())
    assert sum(p.numel() for p in model.parameters()) == arch.num_params()


@pytest.mark.parametrize("arch", [A14B, TINY_TEACHER, *(p.arch for p in PRESETS.values())])
def test_native_and_diffusers_configs_round_trip(arch):
    assert WanArch.from_native_config(arch.native_config()) == arch
    assert WanArch.from_diffusers_config(arch.diffusers_config()) == arch


def test_presets_are_valid_students_with_comfyui_head_dim():
    for preset in PRESETS.values():
        validate_student(preset.arch)
        assert preset.arch.head_dim == 128
    lite = PRESETS["lite-1024"]
    assert (lite.arch.dim, lite.arch.num_heads, lite.arch.num_layers, lite.image_size) == (1024, 8, 16, 1024)
    assert lite.export_name == "wanlite-1024.safetensors"


def test_sixteen_heads_at_dim_1024_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"num_heads: expected dim/128 = 8, found 16"):
        validate_student(WanArch(dim=1024, ffn_dim=2816, num_heads=16, num_layers=16))


def test_dim_not_multiple_of_128_is_refused():
    with pytest.raises(ConfigError, match=r"dim: 1000 is not a multiple of 128"):
        validate_student(WanArch(dim=1000, ffn_dim=2816, num_heads=8, num_layers=16))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("text_dim", 768, "text_dim: expected 4096, found 768"), ("in_dim", 4, "in_dim: expected 16, found 4")],
)
def test_comfyui_fixed_fields_are_enforced(field, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_student(PRESETS["lite-1024"].arch.replace(**{field: value}))


def test_native_config_errors_name_the_source_and_field():
    bad = {**A14B.native_config(), "num_heads": 0}
    with pytest.raises(ConfigError, match=r"high_noise_model/config.json: num_heads: expected a positive integer"):
        WanArch.from_native_config(bad, "high_noise_model/config.json")
    with pytest.raises(ConfigError, match=r"_class_name: expected 'WanModel', found 'Foo'"):
        WanArch.from_native_config({**A14B.native_config(), "_class_name": "Foo"}, "x")


SEED_CONFIG = {
    "model_type": "WanLiteStudent", "hidden_size": 1024, "depth": 16, "num_heads": 8, "num_channels": 16,
    "image_size": 1024, "patch_size": 2, "text_max_length": 512, "text_encoder_output_dim": 4096,
}


def test_seed_vocabulary_maps_onto_lite_1024():
    arch, image_size = arch_from_seed_config(SEED_CONFIG)
    assert arch == PRESETS["lite-1024"].arch
    assert image_size == 1024


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_heads": 16}, "num_heads: expected dim/128 = 8, found 16"),
        ({"num_channels": 4}, "in_dim: expected 16, found 4"),
        ({"text_max_length": 77}, "text_max_length: expected 512"),
        ({"patch_size": 16}, "patch_size: expected 2"),
        ({"teacher_checkpoint_path": "/x"}, "unknown field.*teacher_checkpoint_path"),
    ],
)
def test_seed_config_mistakes_from_the_seed_notes_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        arch_from_seed_config({**SEED_CONFIG, **change})


def test_load_student_config_reads_both_vocabularies(tmp_path):
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps(SEED_CONFIG))
    assert load_student_config(seed)[0] == PRESETS["lite-1024"].arch
    diff = tmp_path / "config.json"
    diff.write_text(json.dumps(PRESETS["tiny"].arch.diffusers_config()))
    assert load_student_config(diff) == (PRESETS["tiny"].arch, None)
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(ConfigError, match="junk.json: not valid JSON"):
        load_student_config(junk)
