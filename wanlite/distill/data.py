"""Training data on disk and in memory: prompt-embedding sets, latent sets, and the batch order.

Embedding set (`embeddings/<hash>/`, written by encode-prompts):
  `prompts.json` (prompts, negative prompt), `negative.safetensors` (`embeds`
  [L, D]), `shard-NNNNN.safetensors` (`embeds` [sum L_i, D]: each prompt's T5
  output trimmed to its real length, concatenated; `lengths` [n]). Trimmed
  storage is lossless: Wan zero-pads to 512 tokens before `text_embedding`,
  so padding is re-applied at batch time. Manifest meta records
  `encoder_sha256` (the T5 weights that produced them) and `prompts_sha256`.

Latent set (`data/<hash>/`, written by teacher-data):
  `shard-NNNNN/latents.safetensors` with `latents` [n, 16, 1, h, w] (clean x0
  in the VAE's normalised space) and `prompt_index` [n] (row in the embedding
  set). Each shard directory has its own manifest (a re-run skips finished
  shards); the set's manifest, written last, lists every shard file and
  records `latent_shape`, `embeddings_digest` and `encoder_sha256`.

Batch order: a fresh permutation per epoch from (seed, epoch), consumed as one
stream, so the position is just the number of samples seen: the global batch
of step s is stream[s*B, (s+1)*B), rank r takes its contiguous slice. Nothing
but the step needs saving for an exact resume.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from wanlite.pipeline import TEXT_LEN, local_path, pad_embeddings

EMBEDDINGS_KIND = "wanlite-embeddings"
LATENTS_KIND = "wanlite-teacher-data"
PROMPTS_FILE = "prompts.json"
NEGATIVE_FILE = "negative.safetensors"
LATENTS_FILE = "latents.safetensors"
MANIFEST = "_MANIFEST.json"


def embeddings_shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def latent_shard_name(index: int, source: str = "teacher") -> str:
    """Directory of one latent shard; image-encoded shards get their own prefix so both can coexist."""
    return f"{'shard' if source == 'teacher' else source}-{index:05d}"


def read_manifest_file(directory: Path) -> dict:
    """The parsed `_MANIFEST.json` of a local artifact directory, or a clear error naming it."""
    path = directory / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest: not a finished artifact") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def manifest_digest(manifest: dict) -> str:
    """sha256 of an artifact's file listing: its content identity (same rule as `storage.Manifest.digest`)."""
    listing = {rel: [e["size"], e["sha256"]] for rel, e in sorted(manifest["files"].items())}
    return hashlib.sha256(json.dumps(listing, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def artifact_digest(uri: str | Path) -> str:
    """Content identity of a published artifact, from its manifest alone (no data read)."""
    return manifest_digest(read_manifest_file(local_path(uri)))


def _expect_kind(directory: Path, manifest: dict, kind: str) -> dict:
    meta = manifest.get("meta", {})
    if meta.get("kind") != kind:
        raise ValueError(f"{directory / MANIFEST}: meta.kind: expected {kind!r}, found {meta.get('kind')!r}")
    return meta


# --- prompt embeddings ---------------------------------------------------------------


class ShardRows(Sequence[torch.Tensor]):
    """Every prompt's embedding [L_i, D] in fp32, read from the memory-mapped shards on access.

    What a rank holds of the set is its prompts' lengths, not their rows: the
    rows of a set encoded from a large prompt file (about 1 MB per prompt in
    fp32 at 60 tokens of T5-XXL width) never sit whole in memory.
    """

    def __init__(self, paths: list[Path]) -> None:
        self._files = [safe_open(str(path), framework="pt") for path in paths]  # memory maps, no descriptors held
        self._where: list[tuple[int, int]] = []
        self.lengths: list[int] = []
        for shard, (path, fh) in enumerate(zip(paths, self._files)):
            counts = fh.get_tensor("lengths").tolist()
            rows = fh.get_slice("embeds").get_shape()[0]
            if sum(counts) != rows:
                raise ValueError(f"{path}: lengths sum to {sum(counts)} but embeds has {rows} rows")
            self._where += [(shard, start) for start, _ in zip(itertools.accumulate(counts, initial=0), counts)]
            self.lengths += counts

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        shard, start = self._where[index]
        rows = self._files[shard].get_slice("embeds")[start : start + self.lengths[index]]
        return rows.float()  # bf16 from a GPU encoder; compute casts anyway


@dataclass
class EmbeddingSet:
    """Every prompt's trimmed T5 output plus the negative prompt's, with their provenance."""

    prompts: list[str]
    embeds: Sequence[torch.Tensor]
    negative: torch.Tensor
    encoder_sha256: str
    digest: str
    uri: str

    @classmethod
    def load(cls, uri: str | Path) -> EmbeddingSet:
        """The set at `uri`; embeddings are read from the shards when a batch asks for them (`ShardRows`)."""
        root = local_path(uri)
        manifest = read_manifest_file(root)
        meta = _expect_kind(root, manifest, EMBEDDINGS_KIND)
        prompts = json.loads((root / PROMPTS_FILE).read_text())["prompts"]
        embeds = ShardRows([root / embeddings_shard_name(index) for index in range(meta["num_shards"])])
        if len(embeds) != len(prompts):
            raise ValueError(f"{root}: {len(prompts)} prompts in {PROMPTS_FILE} but {len(embeds)} embeddings in shards")
        with safe_open(str(root / NEGATIVE_FILE), framework="pt") as fh:
            negative = fh.get_tensor("embeds").float()
        return cls(prompts, embeds, negative, meta["encoder_sha256"], manifest_digest(manifest), str(uri))

    @property
    def dim(self) -> int:
        return self.negative.shape[-1]

    def context(self, indices: torch.Tensor) -> torch.Tensor:
        """Zero-padded [len(indices), 512, D] context for the given prompt rows."""
        return pad_embeddings([self.embeds[i] for i in indices.tolist()], TEXT_LEN)

    def compact(self, indices: torch.Tensor, with_negative: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, the negative's repeated or None), zero-padded only to the longest of them.

        What a `compact_text_padding` model takes: it computes the same as on
        `context`/`negative_context`, and no 512-row tensors are built per batch.
        """
        embeds = [self.embeds[i] for i in indices.tolist()]
        length = max(len(e) for e in (*embeds, *([self.negative] if with_negative else [])))
        negative = pad_embeddings([self.negative], length).expand(len(embeds), -1, -1) if with_negative else None
        return pad_embeddings(embeds, length), negative

    def longest(self) -> int:
        """Tokens in the longest prompt, the negative prompt included."""
        counts = self.embeds.lengths if isinstance(self.embeds, ShardRows) else [len(e) for e in self.embeds]
        return max(max(counts), len(self.negative))

    def negative_context(self, n: int) -> torch.Tensor:
        """The negative prompt's padded context repeated n times."""
        return pad_embeddings([self.negative], TEXT_LEN).expand(n, -1, -1)


# --- latents -------------------------------------------------------------------------


@dataclass
class LatentSet:
    """Clean latents x0 [N, 16, 1, h, w] and the prompt row of each, read from the shards on demand.

    Only shapes and prompt rows are read at load time; `take` reads the rows a
    batch needs through safetensors' memory map, so a data set larger than
    host RAM trains as well as a small one.
    """

    shards: list[tuple[Path, int]]
    prompt_index: torch.Tensor
    latent_shape: tuple[int, ...]
    meta: dict
    digest: str
    uri: str

    @classmethod
    def load(cls, uri: str | Path, *, channels: int = 16) -> LatentSet:
        root = local_path(uri)
        manifest = read_manifest_file(root)
        meta = _expect_kind(root, manifest, LATENTS_KIND)
        expected = tuple(meta["latent_shape"])
        if len(expected) != 4 or expected[:2] != (channels, 1):
            raise ValueError(
                f"{root / MANIFEST}: latent_shape: expected [{channels}, 1, h, w] (one-frame Wan latents), "
                f"found {list(expected)}"
            )
        shards, index = [], []
        for shard in meta["shards"]:
            path = root / shard / LATENTS_FILE
            with safe_open(str(path), framework="pt") as fh:
                shape, rows = tuple(fh.get_slice("latents").get_shape()), fh.get_tensor("prompt_index")
            if shape[1:] != expected:
                raise ValueError(
                    f"{path}: latents: expected shape [n, {', '.join(map(str, expected))}], found {list(shape)}"
                )
            if tuple(rows.shape) != (shape[0],):
                raise ValueError(f"{path}: prompt_index: expected shape [{shape[0]}], found {list(rows.shape)}")
            shards.append((path, shape[0]))
            index.append(rows.long())
        if not shards:
            raise ValueError(f"{root / MANIFEST}: shards: expected at least one shard, found none")
        return cls(shards, torch.cat(index), expected, meta, manifest_digest(manifest), str(uri))

    def __len__(self) -> int:
        return self.prompt_index.shape[0]

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """Latents of the given sample rows, in that order, as float32 [len(rows), 16, 1, h, w]."""
        ends = torch.tensor([count for _, count in self.shards]).cumsum(0)
        shard_of = torch.searchsorted(ends, rows, right=True)
        out = torch.empty((len(rows), *self.latent_shape), dtype=torch.float32)
        for shard in shard_of.unique().tolist():
            path, _ = self.shards[shard]
            start = int(ends[shard - 1]) if shard else 0
            with safe_open(str(path), framework="pt") as fh:
                stored = fh.get_slice("latents")
                for i in (shard_of == shard).nonzero().flatten().tolist():
                    local = int(rows[i]) - start
                    out[i] = stored[local : local + 1][0].float()
        return out

    @cached_property
    def latents(self) -> torch.Tensor:
        """Every latent at once (for small sets: calibration, tests)."""
        return self.take(torch.arange(len(self)))

    def check_embeddings(self, embeddings: EmbeddingSet) -> None:
        """Refuse embeddings other than those the latents were sampled with (or from another T5)."""
        recorded = self.meta.get("encoder_sha256")
        if recorded != embeddings.encoder_sha256:
            raise ValueError(
                f"{embeddings.uri}: encoder_sha256: the latents in {self.uri} were made from embeddings of T5 "
                f"{recorded}, these come from {embeddings.encoder_sha256}"
            )
        top = int(self.prompt_index.max())
        if top >= len(embeddings.prompts):
            raise ValueError(
                f"{self.uri}: prompt_index: refers to prompt {top}, but {embeddings.uri} has {len(embeddings.prompts)}"
            )


# --- batch order ---------------------------------------------------------------------


class BatchOrder:
    """Which samples each rank sees at each step: a pure function of (seed, step), so resume is exact."""

    def __init__(self, num_samples: int, global_batch: int, world_size: int, seed: int) -> None:
        if global_batch % world_size:
            raise ValueError(
                f"batch_size: the global batch {global_batch} is not divisible by the world size {world_size}; "
                f"choose a multiple of {world_size}"
            )
        self.num_samples, self.global_batch, self.world_size, self.seed = num_samples, global_batch, world_size, seed
        self.per_rank = global_batch // world_size
        self._cache: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:  # keep the previous epoch too: a batch may straddle the boundary
            self._cache = {e: p for e, p in self._cache.items() if e == epoch - 1}
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cache[epoch] = torch.randperm(self.num_samples, generator=generator)
        return self._cache[epoch]

    def global_indices(self, step: int) -> torch.Tensor:
        """Sample indices of step's whole global batch, in rank order."""
        start = step * self.global_batch
        positions = torch.arange(start, start + self.global_batch)
        out = torch.empty(self.global_batch, dtype=torch.long)
        for epoch in positions.div(self.num_samples, rounding_mode="floor").unique().tolist():
            sel = positions.div(self.num_samples, rounding_mode="floor") == epoch
            out[sel] = self._permutation(epoch)[positions[sel] % self.num_samples]
        return out

    def rank_slice(self, rank: int) -> slice:
        return slice(rank * self.per_rank, (rank + 1) * self.per_rank)
