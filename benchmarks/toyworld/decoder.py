"""A fixed attribute decoder: reads (shape, colour, size) back from a latent.

Trained once, on latents rendered by the world itself (never on model samples),
then frozen: it is the ruler that scores the teacher, the distilled students
and the random-init student alike. Its penultimate features are also the space
in which the Fréchet distance between student and teacher samples is measured,
the way FID uses an Inception network.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from benchmarks.toyworld.world import ATTRIBUTES, CHANNELS, COLOURS, SHAPES, SIZES, World, attribute_labels

log = logging.getLogger(__name__)

FEATURES = 64
DEFAULT_STEPS = 1500
CLASSES = (len(SHAPES), len(COLOURS), len(SIZES))


class AttributeDecoder(nn.Module):
    """A small CNN with one softmax head per attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(CHANNELS, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.GELU(),
            nn.Flatten(), nn.LazyLinear(FEATURES), nn.GELU(),
        )  # fmt: skip
        self.heads = nn.ModuleList(nn.Linear(FEATURES, n) for n in CLASSES)

    def features(self, latents: torch.Tensor) -> torch.Tensor:
        """[n, FEATURES] for latents [n, 16, 1, h, w]."""
        return self.body(latents[:, :, 0].float())

    def forward(self, latents: torch.Tensor) -> list[torch.Tensor]:
        feats = self.features(latents)
        return [head(feats) for head in self.heads]

    @torch.no_grad()
    def predict(self, latents: torch.Tensor) -> torch.Tensor:
        """[n, 3] predicted class indices."""
        return torch.stack([logits.argmax(-1) for logits in self(latents)], dim=1)


def accuracy(decoder: AttributeDecoder, latents: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-attribute accuracy, and `all`: the share of samples with every attribute right."""
    correct = decoder.predict(latents) == labels
    out = {name: float(correct[:, i].float().mean()) for i, name in enumerate(ATTRIBUTES)}
    out["all"] = float(correct.all(dim=1).float().mean())
    return out


def train_decoder(world: World, *, steps: int, batch_size: int = 128, seed: int = 0) -> AttributeDecoder:
    """Fit the decoder on freshly rendered latents (an endless, exact supply of labelled data)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    decoder = AttributeDecoder()
    decoder(world.sample(2, gen)[0])  # materialise the lazy layer before the optimizer sees it
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        latents, rows = world.sample(batch_size, gen)
        labels = attribute_labels(rows)
        loss = sum(loss_fn(logits, labels[:, i]) for i, logits in enumerate(decoder(latents)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return decoder.eval().requires_grad_(False)


def load_or_train(path: Path, world: World, *, steps: int, seed: int = 0) -> AttributeDecoder:
    """The cached decoder at `path`, else a freshly trained one (saved there; its held-out accuracy logged)."""
    if path.is_file():
        decoder = AttributeDecoder()
        decoder(world.sample(2, torch.Generator().manual_seed(0))[0])
        decoder.load_state_dict(torch.load(path, weights_only=True))
        return decoder.eval().requires_grad_(False)
    decoder = train_decoder(world, steps=steps, seed=seed)
    latents, rows = world.sample(1024, torch.Generator().manual_seed(seed + 10_000))
    log.info(
        "attribute decoder: accuracy on fresh rendered latents %s", accuracy(decoder, latents, attribute_labels(rows))
    )
    tmp = path.with_suffix(".partial")
    torch.save(decoder.state_dict(), tmp)
    tmp.rename(path)
    return decoder
