"""teacher-data: clean one-frame latents x0 sampled by the teacher (and/or VAE-encoded user images).

The teacher samples exactly as Wan 2.2 does, through stock `WanPipeline`:
both experts (`transformer` = high-noise for t >= 875, `transformer_2` =
low-noise), UniPC on flow sigmas with shift 12, 40 steps, CFG 4.0 / 3.0 with
Wan's negative prompt, `output_type="latent"` with precomputed prompt
embeddings (so T5 is never loaded). Sample i uses prompt i mod P and its own
seed (seed + i), so any shard can be regenerated alone with identical content.

Work is split into shards, each published with its own manifest; a re-run
(after a crash, or on another machine) skips finished shards. The set's
manifest is written last and lists every shard's files.

Fan-out: `workers=N` processes (N GPUs, N machines, N mapped Prefect tasks:
any engine that starts the same call with `worker=0..N-1`) each make the
shards j with j mod N = worker. A shard's content depends only on its sample
ids, so N workers write byte for byte the set one worker writes. The worker
that finds every shard finished writes the set's manifest; the others return
`complete: False`. A killed worker's unfinished shards are made by re-running
that worker; finished shards are never redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from wanlite.config import GUIDANCE_HIGH, GUIDANCE_LOW, SAMPLE_SHIFT, SAMPLE_STEPS
from wanlite.distill.data import LATENTS_FILE, LATENTS_KIND, MANIFEST, EmbeddingSet, latent_shard_name
from wanlite.distill.encode import encoder_sha256, file_sha256
from wanlite.pipeline import build_pipeline, encode_images, load_vae, local_path
from wanlite.text_padding import compact_text_padding

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VAE_STRIDE = 8


def teacher_identity(teacher_dir: Path) -> str:
    """Content identity of the teacher: its store manifest's digest, else the sha256 of its expert weights."""
    from wanlite.checkpoint.reader import TeacherReader
    from wanlite.distill.data import manifest_digest

    manifest = teacher_dir / MANIFEST
    if manifest.is_file():
        return manifest_digest(json.loads(manifest.read_text()))
    reader = TeacherReader(teacher_dir)
    log.info("hashing the expert weights of %s (no store manifest records them)", teacher_dir)
    digest = hashlib.sha256()
    for name in reader.expert_names:
        folder = reader.expert(name).folder
        for file in sorted({*reader.expert(name).weight_map.values(), folder / "config.json"}):
            digest.update(f"{file.relative_to(teacher_dir)} {file_sha256(file)}\n".encode())
    return digest.hexdigest()


def find_images(folder: Path, prompts: list[str]) -> list[tuple[Path, int]]:
    """(image, prompt row) pairs: each image needs a sidecar `.txt` caption that is in the embedding set."""
    if not folder.is_dir():
        found = "a file" if folder.exists() else "nothing"
        raise FileNotFoundError(f"{folder}: expected a folder of images, found {found}")
    rows = {p: i for i, p in enumerate(prompts)}
    pairs = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            raise FileNotFoundError(f"{caption_file}: expected the caption of {image.name} (one line of text)")
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as err:
            raise ValueError(f"{caption_file}: expected UTF-8 text, found byte {err.object[err.start]:#04x} at "
                             f"offset {err.start}") from None  # fmt: skip
        check_image(image)
        if caption not in rows:
            raise ValueError(
                f"{caption_file}: caption {caption[:80]!r} is not in the embedding set; add it to the prompt "
                "file and re-run encode-prompts"
            )
        pairs.append((image, rows[caption]))
    if not pairs:
        raise ValueError(f"{folder}: expected images ({', '.join(IMAGE_SUFFIXES)}) with .txt captions, found none")
    return pairs


@contextlib.contextmanager
def _image_errors(path: Path) -> Iterator[None]:
    """A corrupt file or a decompression bomb (more than PIL's MAX_IMAGE_PIXELS) -> ValueError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: expected a readable image, found {type(err).__name__}: {err}") from None


def check_image(path: Path) -> None:
    """Refuse an unreadable image before any sampling starts (header and checksums only, no decoding)."""
    with _image_errors(path), Image.open(path) as img:
        img.verify()


def load_image(path: Path, size: int) -> torch.Tensor:
    """An RGB image scaled so its short side is `size`, centre-cropped square, as [3, size, size] in [-1, 1]."""
    with _image_errors(path), Image.open(path) as img:
        img = img.convert("RGB")
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.LANCZOS)
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def teacher_data(
    teacher: str | Path,
    embeddings: str | Path,
    out: str | None = None,
    *,
    image_size: int = 1024,
    images: str | Path | None = None,
    teacher_samples: bool = True,
    samples_per_prompt: int = 1,
    steps: int = SAMPLE_STEPS,
    shift: float = SAMPLE_SHIFT,
    guidance_high: float = GUIDANCE_HIGH,
    guidance_low: float = GUIDANCE_LOW,
    seed: int = 0,
    shard_size: int = 64,
    batch_size: int = 4,
    device: str | None = None,
    progress: bool = True,
    worker: int = 0,
    workers: int = 1,
) -> dict[str, Any]:
    """Build (or finish) the latent set `data/<hash>/` in the store `out`; returns {uri, key, digest, ...}.

    With `workers` > 1 this call makes only the shards of `worker` (see the
    module docstring); `complete` in the result says whether the set is published.
    """
    from wanlite.storage import Manifest, Store, join_key

    if image_size <= 0 or image_size % 16:
        raise ValueError(f"image_size: expected a positive multiple of 16 (VAE 8 x patch 2), found {image_size}")
    for name, number in (("shift", shift), ("guidance_high", guidance_high), ("guidance_low", guidance_low)):
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{name}: expected a finite value > 0, found {number}")
    if not teacher_samples and images is None:
        raise ValueError("teacher-data: nothing to do: --no-teacher-samples needs --images DIR")
    for name, value in (("samples_per_prompt", samples_per_prompt), ("steps", steps), ("shard_size", shard_size),
                        ("batch_size", batch_size)):  # fmt: skip
        if value <= 0:
            raise ValueError(f"{name}: expected a positive integer, found {value}")
    if workers <= 0 or not 0 <= worker < workers:
        raise ValueError(f"worker: expected 0 <= worker < workers (workers >= 1), found worker {worker} of {workers}")
    root = local_path(teacher)
    emb = EmbeddingSet.load(embeddings)
    enc_sha = encoder_sha256(root)
    if emb.encoder_sha256 != enc_sha:
        raise ValueError(
            f"{embeddings}: encoder_sha256: these embeddings come from T5 {emb.encoder_sha256}, but the teacher "
            f"{root} has T5 {enc_sha}; re-run encode-prompts with this teacher"
        )
    pairs = find_images(Path(images), emb.prompts) if images is not None else []
    latent_shape = [16, 1, image_size // VAE_STRIDE, image_size // VAE_STRIDE]
    sampler = {"steps": steps, "shift": shift, "guidance_high": guidance_high, "guidance_low": guidance_low,
               "seed": seed, "samples_per_prompt": samples_per_prompt if teacher_samples else 0}  # fmt: skip
    identity = {
        "format": FORMAT_VERSION,
        "teacher": teacher_identity(root),
        "embeddings": emb.digest,
        "image_size": image_size,
        "sampler": sampler,
        "shard_size": shard_size,
        "images": [[p.name, file_sha256(p), row] for p, row in pairs],
    }
    store = Store.from_env(out)
    key = "data/" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    result = {"uri": store.uri(key), "key": key, "latent_shape": latent_shape}
    existing = store.read_manifest(key)
    if existing is not None:
        log.info("teacher data already in %s: nothing to do", store.uri(key))
        return {**result, "digest": existing.digest, "num_samples": existing.meta["num_samples"], "skipped": True,
                "complete": True}  # fmt: skip

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    jobs = _teacher_jobs(len(emb.prompts), samples_per_prompt, shard_size) if teacher_samples else []
    jobs += _image_jobs(pairs, shard_size)
    mine = jobs[worker::workers]
    maker = _ShardMaker(root, emb, pairs, dev, image_size, sampler, batch_size)
    with tqdm(total=sum(len(rows) for _, _, rows in mine), desc="teacher data", unit="sample",
              disable=not progress) as bar:  # fmt: skip
        for shard, source, rows in mine:
            shard_key = join_key(key, shard)
            if store.read_manifest(shard_key) is None:
                with tempfile.TemporaryDirectory(prefix="wanlite-shard-") as tmp:
                    maker.write(Path(tmp), source, rows)
                    store.put_dir(tmp, shard_key, meta={"source": source, "count": len(rows)}, progress=False)
            else:
                log.info("%s is already finished: skipped", store.uri(shard_key))
            bar.update(len(rows))

    files = {}
    for shard, _, _ in jobs:
        shard_manifest = store.read_manifest(join_key(key, shard))
        if shard_manifest is None:  # another worker's, not finished yet: it publishes the set
            log.info("worker %d of %d done; %s is not finished yet, so the set is not published", worker, workers,
                     store.uri(join_key(key, shard)))  # fmt: skip
            return {**result, "digest": None, "num_samples": None, "skipped": False, "complete": False}
        files.update({f"{shard}/{rel}": entry for rel, entry in shard_manifest.files.items()})
    meta = {
        "kind": LATENTS_KIND,
        "latent_shape": latent_shape,
        "shards": [shard for shard, _, _ in jobs],
        "num_samples": sum(len(rows) for _, _, rows in jobs),
        "embeddings_uri": str(embeddings),
        "embeddings_digest": emb.digest,
        "encoder_sha256": enc_sha,
        **identity,
    }
    manifest = store.write_manifest(key, Manifest(files=files, meta=meta))
    return {**result, "digest": manifest.digest, "num_samples": meta["num_samples"], "skipped": False,
            "complete": True}  # fmt: skip


def _teacher_jobs(num_prompts: int, per_prompt: int, shard_size: int) -> list[tuple[str, str, list[int]]]:
    """(shard name, "teacher", sample ids); sample i is prompt i mod P with seed + i."""
    total = num_prompts * per_prompt
    return [
        (latent_shard_name(i, "teacher"), "teacher", list(range(start, min(total, start + shard_size))))
        for i, start in enumerate(range(0, total, shard_size))
    ]


def _image_jobs(pairs: list[tuple[Path, int]], shard_size: int) -> list[tuple[str, str, list[int]]]:
    return [
        (latent_shard_name(i, "images"), "images", list(range(start, min(len(pairs), start + shard_size))))
        for i, start in enumerate(range(0, len(pairs), shard_size))
    ]


class _ShardMaker:
    """Loads the teacher pipeline / VAE on first use and writes one shard's `latents.safetensors`."""

    def __init__(
        self,
        root: Path,
        emb: EmbeddingSet,
        pairs: list[tuple[Path, int]],
        device: torch.device,
        size: int,
        sampler: dict,
        batch_size: int,
    ) -> None:
        self.root, self.emb, self.pairs, self.device, self.size = root, emb, pairs, device, size
        self.sampler, self.batch_size = sampler, batch_size
        self._pipe: Any = None
        self._vae: Any = None

    def pipe(self) -> Any:
        if self._pipe is None:
            from wanlite.checkpoint.reader import TeacherReader

            reader = TeacherReader(self.root)
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            high, low = (compact_text_padding(reader.load_expert(e, dtype=dtype).to(self.device))
                         for e in reader.expert_names)  # fmt: skip
            self._pipe = build_pipeline(self.root, high, low, shift=self.sampler["shift"], with_text_encoder=False,
                                        with_vae=False)  # fmt: skip
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def vae(self) -> Any:
        if self._vae is None:
            self._vae = load_vae(self.root).to(self.device)
        return self._vae

    def write(self, folder: Path, source: str, rows: list[int]) -> None:
        latents, prompt_rows = [], []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            if source == "teacher":
                prompt_index = [i % len(self.emb.prompts) for i in batch]
                latents.append(self._sample(batch, prompt_index))
            else:
                prompt_index = [self.pairs[i][1] for i in batch]
                images = torch.stack([load_image(self.pairs[i][0], self.size) for i in batch])
                latents.append(encode_images(self.vae(), images).cpu())
            prompt_rows += prompt_index
        bad = [rows[i] for i, x in enumerate(torch.cat(latents)) if not torch.isfinite(x).all()]
        if bad:
            raise ValueError(
                f"teacher-data: {source} samples {bad[:8]} came out non-finite (NaN or inf); nothing of this shard "
                "was published (check --shift, the guidance scales and the teacher's weights)"
            )
        save_file(
            {"latents": torch.cat(latents).float().contiguous(), "prompt_index": torch.tensor(prompt_rows)},
            folder / LATENTS_FILE,
        )

    def _sample(self, samples: list[int], prompt_index: list[int]) -> torch.Tensor:
        s = self.sampler
        context, negative = self.emb.compact(torch.tensor(prompt_index), with_negative=True)  # compact experts
        context, negative = context.to(self.device), negative.to(self.device)
        generators = [torch.Generator().manual_seed(s["seed"] + i) for i in samples]
        latents = self.pipe()(
            prompt_embeds=context,
            negative_prompt_embeds=negative,
            height=self.size,
            width=self.size,
            num_frames=1,
            num_inference_steps=s["steps"],
            guidance_scale=s["guidance_high"],
            guidance_scale_2=s["guidance_low"],
            generator=generators,
            output_type="latent",
        ).frames
        return latents.float().cpu()
