"""encode-prompts: run the teacher's T5 once over a prompt set and store the embeddings.

T5-XXL is 5.7B parameters; keeping it resident beside the experts and the
student during training would waste tens of GB per GPU, and its output for a
fixed prompt never changes. So it runs once, here, and the result is
content-addressed by (prompts, negative prompt, T5 weights): a re-run with the
same inputs finds the finished artifact and returns at once.

Tokenisation and cleaning follow `WanPipeline` exactly (max length 512,
`prompt_clean`), so stored embeddings equal what the pipeline would compute.

A prompt file streams: it is read twice, one line at a time, once to hash it
(the content address must be known before anything is encoded) and once to
encode it shard by shard. Memory holds one shard's prompts and embeddings
(`shard_size`) and T5, whatever the file's length; what still grows with the
number of prompts N is the local staging folder (every shard, on disk, until
the set is published) and the manifest's list of N / shard_size shard files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from safetensors.torch import save_file
from tqdm import tqdm

from wanlite.checkpoint.layout import NATIVE_T5, detect_layout
from wanlite.distill.data import (
    EMBEDDINGS_KIND,
    MANIFEST,
    NEGATIVE_FILE,
    PROMPTS_FILE,
    embeddings_shard_name,
)
from wanlite.pipeline import TEXT_LEN, load_text_encoder, load_tokenizer, local_path
from wanlite.prompts import NEGATIVE_PROMPT, PromptDigest, PromptError, iter_prompts

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_sha256(root: Path, rel: str) -> str:
    """A file's sha256 from the artifact's store manifest when it has one (free), else computed."""
    manifest = root / MANIFEST
    if manifest.is_file():
        entry = json.loads(manifest.read_text()).get("files", {}).get(rel)
        if entry:
            return entry["sha256"]
    log.info("hashing %s (no store manifest records it)", root / rel)
    return file_sha256(root / rel)


def encoder_sha256(teacher_dir: str | Path) -> str:
    """Identity of the teacher's T5 weights: the sha256 of its weight file(s).

    Native: the `.pth` itself. Diffusers: the `text_encoder/` weight files,
    combined in name order (one file: its own sha256).
    """
    root = local_path(teacher_dir)
    if detect_layout(root) == "native":
        return recorded_sha256(root, NATIVE_T5)
    files = sorted(p for p in (root / "text_encoder").glob("*") if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise FileNotFoundError(f"{root / 'text_encoder'}: expected T5 weight files (*.safetensors), found none")
    shas = [recorded_sha256(root, f"text_encoder/{p.name}") for p in files]
    if len(shas) == 1:
        return shas[0]
    return hashlib.sha256("\n".join(f"{p.name} {s}" for p, s in zip(files, shas)).encode()).hexdigest()


def embeddings_key(prompts_digest: str, encoder_digest: str) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, "prompts": prompts_digest, "encoder": encoder_digest,
                          "text_len": TEXT_LEN}, sort_keys=True)  # fmt: skip
    return f"embeddings/{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


@torch.no_grad()
def encode(tokenizer: Any, text_encoder: Any, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Each prompt's T5 output trimmed to its real token count (EOS included), on CPU."""
    inputs = tokenizer(
        [prompt_clean(p) for p in prompts],
        padding="max_length",
        max_length=TEXT_LEN,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    hidden = text_encoder(inputs.input_ids.to(device), inputs.attention_mask.to(device)).last_hidden_state
    lengths = inputs.attention_mask.sum(dim=1).tolist()
    return [h[:n].cpu() for h, n in zip(hidden, lengths)]


def encode_prompts(
    teacher: str | Path,
    prompts: str | Path | Sequence[str] = "default",
    out: str | None = None,
    *,
    negative_prompt: str = NEGATIVE_PROMPT,
    shard_size: int = 256,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode a prompt set (a built-in name, a file, or a list) into `embeddings/<hash>/` of the store `out`.

    A name or a file is streamed (module docstring). Returns {uri, key,
    digest, encoder_sha256, prompts_sha256, num_prompts, skipped}.
    """
    from wanlite.storage import Store

    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size, batch_size: expected positive integers, found {shard_size}, {batch_size}")
    source = _prompt_source(prompts)
    digest = PromptDigest(negative_prompt)
    for prompt in source():
        digest.add(prompt)
    if not digest.count:
        raise PromptError("prompts: expected at least one prompt, found an empty list")
    root = local_path(teacher)
    enc_sha = encoder_sha256(root)
    p_sha = digest.hexdigest()
    store = Store.from_env(out)
    key = embeddings_key(p_sha, enc_sha)
    result = {"uri": store.uri(key), "key": key, "encoder_sha256": enc_sha, "prompts_sha256": p_sha,
              "num_prompts": digest.count}  # fmt: skip
    existing = store.read_manifest(key)
    if existing is not None:
        log.info("embeddings already in %s: nothing to do", store.uri(key))
        return {**result, "digest": existing.digest, "skipped": True}

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tokenizer, text_encoder = load_tokenizer(root), load_text_encoder(root, dtype=dtype, device=dev)
    num_shards = -(-digest.count // shard_size)
    with tempfile.TemporaryDirectory(prefix="wanlite-embeddings-") as tmp:
        staging = Path(tmp)
        save_file({"embeds": encode(tokenizer, text_encoder, [negative_prompt])[0].contiguous()},
                  staging / NEGATIVE_FILE)  # fmt: skip
        with (
            PromptListing(staging / PROMPTS_FILE, negative_prompt) as listing,
            tqdm(total=digest.count, desc="encode prompts", unit="prompt", disable=not progress) as bar,
        ):
            for index, chunk in enumerate(_chunks(source(), shard_size)):
                listing.extend(chunk)
                embeds: list[torch.Tensor] = []
                for start in range(0, len(chunk), batch_size):
                    embeds += encode(tokenizer, text_encoder, chunk[start : start + batch_size])
                    bar.update(min(batch_size, len(chunk) - start))
                save_file(
                    {"embeds": torch.cat(embeds).contiguous(), "lengths": torch.tensor([e.shape[0] for e in embeds])},
                    staging / embeddings_shard_name(index),
                )
        if listing.digest.hexdigest() != p_sha:
            raise PromptError(f"{_label(prompts)}: changed while it was being encoded; nothing was published")
        meta = {
            "kind": EMBEDDINGS_KIND,
            "encoder_sha256": enc_sha,
            "prompts_sha256": p_sha,
            "num_prompts": digest.count,
            "num_shards": num_shards,
            "shard_size": shard_size,
            "dim": int(text_encoder.config.d_model),
            "dtype": str(dtype).removeprefix("torch."),
            "text_len": TEXT_LEN,
        }
        manifest = store.put_dir(staging, key, meta=meta, progress=progress)
    return {**result, "digest": manifest.digest, "skipped": False}


def _prompt_source(prompts: str | Path | Sequence[str]) -> Callable[[], Iterable[str]]:
    """A fresh pass over the prompts on each call: a name or a file is re-read lazily, a list is reused."""
    if isinstance(prompts, (str, Path)):
        return lambda: iter_prompts(prompts)
    return lambda: prompts


def _label(prompts: str | Path | Sequence[str]) -> str:
    return str(prompts) if isinstance(prompts, (str, Path)) else "prompts"


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of `size` items (the last may be shorter), drawn lazily."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


class PromptListing:
    """Writes `prompts.json` a prompt at a time and hashes what it wrote (`PromptDigest`).

    The bytes are exactly `json.dumps({"prompts": [...], "negative_prompt": ...},
    ensure_ascii=False, indent=0)` of the whole list, the form sets were
    written in before they streamed, so a set's files do not depend on which
    version encoded it.
    """

    def __init__(self, path: Path, negative_prompt: str) -> None:
        self.path, self.negative_prompt = path, negative_prompt
        self.digest = PromptDigest(negative_prompt)

    def __enter__(self) -> PromptListing:
        self._file = self.path.open("w", encoding="utf-8")
        self._file.write('{\n"prompts": [\n')
        return self

    def extend(self, prompts: Iterable[str]) -> None:
        for prompt in prompts:
            self._file.write((",\n" if self.digest.count else "") + json.dumps(prompt, ensure_ascii=False))
            self.digest.add(prompt)

    def __exit__(self, *exc: object) -> None:
        self._file.write(f'\n],\n"negative_prompt": {json.dumps(self.negative_prompt, ensure_ascii=False)}\n}}')
        self._file.close()
