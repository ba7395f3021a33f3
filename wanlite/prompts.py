"""Prompt sets: the shipped training and held-out evaluation prompts, user files, and the negative prompt.

Prompt files hold one prompt per line; blank lines and lines starting with `#`
are ignored, so a file can carry its own provenance note. The two shipped sets
are disjoint on purpose: evaluation must measure prompts the student never
trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""Wan's default negative prompt, quoted from `sample_neg_prompt` in the official `wan/configs/shared_config.py`.

The teacher's CFG "unconditional" branch was tuned with exactly this text, so
reproducing its samples (and folding its guidance into the student) needs it.
Roughly: "garish colours, overexposed, static, blurry details, subtitles, style,
artwork, painting, frame, still, greyish overall, worst quality, low quality,
JPEG artefacts, ugly, mutilated, extra fingers, badly drawn hands, badly drawn
face, deformed, disfigured, malformed limbs, fused fingers, motionless frame,
cluttered background, three legs, crowded background, walking backwards".
"""

DATA_DIR = Path(__file__).parent / "data"

BUILTIN = {"default": "train_prompts.txt", "train": "train_prompts.txt", "eval": "eval_prompts.txt"}
"""Names accepted instead of a file path; `default` is the training set."""


class PromptError(ValueError):
    """A prompt source that cannot be used; the message names the file."""


def iter_prompts(source: str | Path = "default") -> Iterator[str]:
    """Prompts from a built-in set (`default`/`train`, `eval`) or a text file, read one line at a time.

    A generator: a 100k-line file is never held whole; the file is opened at
    the first `next` and closed when the generator finishes or is closed.
    Raises PromptError naming the file when it is missing, not UTF-8, or
    holds no prompt (that last one once the whole file has been read).
    """
    if str(source) in BUILTIN:
        path, label = DATA_DIR / BUILTIN[str(source)], f"wanlite/data/{BUILTIN[str(source)]}"
    else:
        path, label = Path(source), str(source)
    found = False
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                prompt = line.strip()
                if prompt and not prompt.startswith("#"):
                    found = True
                    yield prompt
    except FileNotFoundError:
        raise PromptError(f"{label}: no such prompt file (or use one of: {', '.join(BUILTIN)})") from None
    except UnicodeDecodeError as err:
        raise PromptError(f"{label}: expected UTF-8 text, found undecodable bytes ({err.reason})") from None
    if not found:
        raise PromptError(f"{label}: expected at least one prompt (one per line), found none")


def load_prompts(source: str | Path = "default") -> list[str]:
    """Every prompt of a built-in set or a file, as a list (for sets that are used whole: evaluation, tests)."""
    return list(iter_prompts(source))


class PromptDigest:
    """`prompts_sha256` fed one prompt at a time: the same digest, without holding the set."""

    def __init__(self, negative_prompt: str) -> None:
        self.negative_prompt = negative_prompt
        self.count = 0
        self._sha = hashlib.sha256(b'{"prompts": [')

    def add(self, prompt: str) -> None:
        self._sha.update(((", " if self.count else "") + json.dumps(prompt, ensure_ascii=False)).encode("utf-8"))
        self.count += 1

    def hexdigest(self) -> str:
        sha = self._sha.copy()
        sha.update(f'], "negative": {json.dumps(self.negative_prompt, ensure_ascii=False)}}}'.encode("utf-8"))
        return sha.hexdigest()


def prompts_sha256(prompts: Iterable[str], negative_prompt: str) -> str:
    """Content hash of an ordered prompt set and its negative prompt (what the embeddings depend on).

    The sha256 of `json.dumps({"prompts": [...], "negative": ...}, ensure_ascii=False)`,
    computed as a stream (`PromptDigest`), so stored content addresses stay
    what they were when it hashed a list.
    """
    digest = PromptDigest(negative_prompt)
    for prompt in prompts:
        digest.add(prompt)
    return digest.hexdigest()
