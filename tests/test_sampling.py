"""The sampling record: round trips, validation that names the field, overrides that are reported."""

from __future__ import annotations

import json

import pytest

from wanlite.config import ConfigError
from wanlite.sampling import (
    HEADER_KEY,
    Sampling,
    from_header,
    from_tags,
    load_sampling,
    save_sampling,
    student_sampling,
    teacher_sampling,
    to_tags,
)

FOLDED = Sampling(steps=40, shift=12.0, guidance=1.0, negative_prompt=False, sampler="unipc")
FEW = Sampling(steps=4, shift=12.0, guidance=1.0, negative_prompt=False, sampler="euler", sigmas=(1.0, 0.9, 0.7, 0.4))


@pytest.mark.parametrize("s", [FOLDED, FEW, teacher_sampling(), student_sampling(guided=False, steps=4)])
def test_round_trips_through_json_folder_header_and_tags(tmp_path, s):
    assert Sampling.from_json(s.to_json()) == s
    save_sampling(tmp_path, s)
    assert load_sampling(tmp_path) == s
    assert from_header({HEADER_KEY: s.to_json(), "other": "x"}) == s
    assert from_tags(to_tags(s)) == s


def test_absent_record_is_none(tmp_path):
    assert load_sampling(tmp_path) is None
    assert from_header({"format": "pt"}) is None
    assert from_tags({}) is None


def test_stock_student_settings_follow_guided():
    assert student_sampling(guided=True, steps=40) == FOLDED
    unguided = student_sampling(guided=False, steps=40)
    assert unguided.guidance == 3.0 and unguided.negative_prompt


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": True}, "steps"),
        ({"shift": float("nan")}, "shift"),
        ({"guidance": 0.5}, "guidance"),
        ({"negative_prompt": "yes"}, "negative_prompt"),
        ({"negative_prompt": True}, "negative_prompt"),  # contradicts guidance 1
        ({"sampler": "ddim"}, "sampler"),
        ({"sigmas": [1.0, 0.5]}, "sigmas"),  # 2 sigmas for 40 steps
        ({"steps": 2, "sigmas": [0.5, 0.9]}, "sigmas"),  # increasing
        ({"steps": 2, "sigmas": [1.5, 0.9]}, "sigmas"),  # above 1
        ({"bogus": 1}, "bogus"),
    ],
)
def test_every_bad_field_is_named(change, field):
    data = {**FOLDED.to_dict(), **change}
    with pytest.raises(ConfigError, match=f"my.json.*{field}"):
        Sampling.from_json(json.dumps(data), "my.json")


def test_missing_field_and_bad_json_are_named():
    data = FOLDED.to_dict()
    del data["shift"]
    with pytest.raises(ConfigError, match="my.json: missing shift"):
        Sampling.from_json(json.dumps(data), "my.json")
    with pytest.raises(ConfigError, match="my.json: expected a JSON object"):
        Sampling.from_json("{not json", "my.json")
    with pytest.raises(ConfigError, match="my.json: expected a JSON object"):
        Sampling.from_json("[1, 2]", "my.json")


def test_overrides_are_reported_and_negative_prompt_follows_guidance():
    same, notes = FOLDED.overridden(steps=None, guidance=None)
    assert same == FOLDED and notes == []
    cfg, notes = FOLDED.overridden(guidance=3.0)
    assert cfg.guidance == 3.0 and cfg.negative_prompt
    assert notes == ["guidance: 1.0 -> 3.0", "negative_prompt: False -> True (follows guidance)"]
    back, notes = teacher_sampling().overridden(guidance=1.0)
    assert not back.negative_prompt and len(notes) == 2
    with pytest.raises(ConfigError, match="explicit sigmas"):
        FEW.overridden(steps=8)
