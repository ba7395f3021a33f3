"""Prompt sets: the shipped train/eval files, user files, and Wan's negative prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from wanlite.prompts import NEGATIVE_PROMPT, PromptError, load_prompts, prompts_sha256


def test_shipped_sets_are_large_varied_and_disjoint() -> None:
    train, evaluation = load_prompts("default"), load_prompts("eval")
    assert load_prompts("train") == train
    assert len(train) >= 200 and 32 <= len(evaluation) <= 64
    assert len(set(train)) == len(train) and len(set(evaluation)) == len(evaluation)
    assert not set(train) & set(evaluation), "held-out prompts must never be trained on"
    assert all(p.strip() == p and not p.startswith("#") for p in train + evaluation)


def test_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("# a note\n\n  a red kite over a hill  \n# another\na blue door\n", encoding="utf-8")
    assert load_prompts(path) == ["a red kite over a hill", "a blue door"]


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"])
def test_empty_prompt_file_is_refused_naming_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(PromptError, match=r"empty\.txt: expected at least one prompt"):
        load_prompts(path)


def test_missing_file_names_the_path_and_the_builtin_sets(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match=r"nope\.txt: no such prompt file .*default"):
        load_prompts(tmp_path / "nope.txt")


def test_negative_prompt_is_wans_default() -> None:
    # sample_neg_prompt of the official wan/configs/shared_config.py, first and last phrases
    assert NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态，细节模糊不清，字幕")
    assert NEGATIVE_PROMPT.endswith("三条腿，背景人很多，倒着走")


def test_prompt_hash_depends_on_order_and_negative_prompt() -> None:
    base = prompts_sha256(["a", "b"], NEGATIVE_PROMPT)
    assert base == prompts_sha256(["a", "b"], NEGATIVE_PROMPT)
    assert base != prompts_sha256(["b", "a"], NEGATIVE_PROMPT)
    assert base != prompts_sha256(["a", "b"], "")
