"""Prompt sets: the shipped train/eval files, user files, and Wan's negative prompt."""

from __future__ import annotations

import hashlib
import inspect
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from wanlite.distill.encode import PromptListing
from wanlite.prompts import NEGATIVE_PROMPT, PromptError, iter_prompts, load_prompts, prompts_sha256


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


def _numbered_file(path: Path, lines: int) -> Path:
    path.write_text("".join(f"prompt number {i}\n" for i in range(lines)), encoding="utf-8")
    return path


def test_a_prompt_file_is_read_one_line_at_a_time(tmp_path: Path) -> None:
    """20k lines: iterating holds a line at a time (traced peak far below the file); the list holds them all."""
    path = _numbered_file(tmp_path / "big.txt", 20_000)
    lines = iter_prompts(path)
    assert inspect.isgenerator(lines)
    tracemalloc.start()
    try:
        count = sum(1 for _ in lines)
        _, streamed = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        whole = load_prompts(path)
        _, listed = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    assert count == len(whole) == 20_000
    assert streamed < size / 4 < size < listed, (streamed, size, listed)


def test_streamed_digest_and_listing_are_the_whole_list_forms(tmp_path: Path) -> None:
    """Content addresses and `prompts.json` bytes are what hashing and dumping the whole list gave."""
    prompts = ['a "quoted" kite', "ünïcödé 山", "back\\slash", "tab\there"]
    expected = hashlib.sha256(
        json.dumps({"prompts": prompts, "negative": NEGATIVE_PROMPT}, ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    assert prompts_sha256(iter(prompts), NEGATIVE_PROMPT) == prompts_sha256(prompts, NEGATIVE_PROMPT) == expected
    with PromptListing(tmp_path / "prompts.json", NEGATIVE_PROMPT) as listing:
        listing.extend(prompts[:1])
        listing.extend(prompts[1:])
    whole = json.dumps({"prompts": prompts, "negative_prompt": NEGATIVE_PROMPT}, ensure_ascii=False, indent=0)
    assert (tmp_path / "prompts.json").read_text(encoding="utf-8") == whole
    assert listing.digest.hexdigest() == expected


def test_encode_prompts_reads_a_large_file_one_shard_ahead_at_most(
    tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20k lines, the tiny teacher's tokenizer and store; T5's output is faked (20k real forwards of 512 tokens
    would be the test's whole cost and are not what is checked). One pass hashes, one encodes, and
    the encoding pass never reads more than one shard beyond what has been encoded."""
    from wanlite.distill import encode as encoding
    from wanlite.distill.data import EmbeddingSet

    path = _numbered_file(tmp_path / "big.txt", 20_000)
    passes: list[int] = []

    def counted(source: str | Path) -> Iterator[str]:
        passes.append(0)
        for prompt in iter_prompts(source):
            passes[-1] += 1
            yield prompt

    encoded, ahead = [0], []

    def fake_t5(_tokenizer: object, _encoder: object, prompts: list[str]) -> list[torch.Tensor]:
        if len(passes) == 2:  # the negative prompt is encoded before the second pass starts
            ahead.append(passes[-1] - encoded[0])
            encoded[0] += len(prompts)
        return [torch.full((1, 4), float(len(p))) for p in prompts]

    monkeypatch.setattr(encoding, "iter_prompts", counted)
    monkeypatch.setattr(encoding, "encode", fake_t5)
    result = encoding.encode_prompts(tiny_teacher, path, str(tmp_path / "store"), shard_size=1000, batch_size=250,
                                     progress=False)  # fmt: skip
    assert passes == [20_000, 20_000] and encoded[0] == 20_000
    assert 0 < max(ahead) <= 1000, "one shard of prompts read ahead of the encoder at most"
    assert result["num_prompts"] == 20_000
    assert result["prompts_sha256"] == prompts_sha256(load_prompts(path), NEGATIVE_PROMPT)
    from wanlite.distill import data

    reads = _RowReads(data.safe_open)
    monkeypatch.setattr(data, "safe_open", reads.open)
    emb = EmbeddingSet.load(result["uri"])
    assert emb.prompts == load_prompts(path) and len(emb.embeds) == 20_000
    assert reads.rows == [1], "load reads the negative prompt's one row, none of the 20k prompts' rows"
    assert emb.embeds[12_345].tolist() == [[float(len("prompt number 12345"))] * 4]
    assert emb.compact(torch.tensor([7, 19_999]))[0].shape == (2, 1, 4) and reads.rows == [1, 1, 1, 1]


class _RowReads:
    """`safe_open` that records how many rows of `embeds` every read brings into memory."""

    def __init__(self, safe_open: Any) -> None:
        self.safe_open, self.rows = safe_open, []

    def open(self, path: str, framework: str) -> Any:
        handle, rows = self.safe_open(path, framework=framework), self.rows

        class Slice:
            def __init__(self, part: Any) -> None:
                self.part, self.get_shape = part, part.get_shape

            def __getitem__(self, index: slice) -> torch.Tensor:
                value = self.part[index]
                rows.append(value.shape[0])
                return value

        class Handle:
            def __enter__(self) -> Handle:
                return self

            def __exit__(self, *_: object) -> None:
                return None

            def get_tensor(self, name: str) -> torch.Tensor:
                value = handle.get_tensor(name)
                rows.extend([value.shape[0]] if name == "embeds" else [])
                return value

            def get_slice(self, name: str) -> Slice:
                return Slice(handle.get_slice(name))

        return Handle()


def test_a_prompt_file_that_changes_between_the_passes_is_refused(
    tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wanlite.distill import encode as encoding

    path = _numbered_file(tmp_path / "moving.txt", 10)
    passes = []

    def rewritten(source: str | Path) -> Iterator[str]:
        passes.append(source)
        if len(passes) == 2:
            _numbered_file(path, 11)
        return iter_prompts(source)

    monkeypatch.setattr(encoding, "iter_prompts", rewritten)
    with pytest.raises(PromptError, match=r"moving\.txt: changed while it was being encoded; nothing was published"):
        encoding.encode_prompts(tiny_teacher, path, str(tmp_path / "store"), progress=False)
    assert not (tmp_path / "store" / "embeddings").exists() or not any((tmp_path / "store" / "embeddings").iterdir())
