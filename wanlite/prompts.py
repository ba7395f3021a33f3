"""Prompt sets: the shipped training and held-out evaluation prompts, user files, and the negative prompt.

Prompt files hold one prompt per line; blank lines and lines starting with `#`
are ignored, so a file can carry its own provenance note. The two shipped sets
are disjoint on purpose: evaluation must measure prompts the student never
trained on.
"""

from __future__ import annotations

import hashlib
import json
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


def parse_prompts(text: str, source: str) -> list[str]:
    """Non-empty, non-comment lines, stripped; raise naming `source` if there are none."""
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise PromptError(f"{source}: expected at least one prompt (one per line), found none")
    return prompts


def load_prompts(source: str | Path = "default") -> list[str]:
    """Prompts from a built-in set (`default`/`train`, `eval`) or a text file."""
    if str(source) in BUILTIN:
        name = BUILTIN[str(source)]
        text = (DATA_DIR / name).read_text(encoding="utf-8")
        return parse_prompts(text, f"wanlite/data/{name}")
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"{path}: no such prompt file (or use one of: {', '.join(BUILTIN)})") from None
    except UnicodeDecodeError as err:
        raise PromptError(f"{path}: expected UTF-8 text, found undecodable bytes ({err.reason})") from None
    return parse_prompts(text, str(path))


def prompts_sha256(prompts: list[str], negative_prompt: str) -> str:
    """Content hash of an ordered prompt set and its negative prompt (what the embeddings depend on)."""
    payload = json.dumps({"prompts": prompts, "negative": negative_prompt}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
