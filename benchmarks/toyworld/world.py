"""The toy world: prompts naming (size, colour, shape), rendered into 16-channel Wan latents.

A sample is drawn by painting one shape on a small RGB canvas (random place
and brightness, so each prompt is a distribution, not a
point) and pushing the canvas through a FIXED random 3x3 convolution to 16
channels, plus a little noise. The map is seeded and never trained, so the
latent distribution is a pure function of the prompt: the teacher has to learn
it, and a decoder trained on it can read the attributes back.

Why size and not position: the first version named four quadrants, and after
600 steps the teacher placed shapes at chance (27 % position accuracy) while it
got colour right 98 % of the time. Wan's only positional signal is 3D RoPE,
which is relative; a model learns absolute placement only from border effects,
slowly. The world is therefore translation-invariant (the shape lands anywhere)
and the third attribute is one the architecture can learn in minutes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES = ("square", "disc", "cross", "frame")
COLOURS = {"red": (1.0, -0.6, -0.6), "green": (-0.6, 1.0, -0.6), "blue": (-0.6, -0.6, 1.0), "yellow": (1.0, 1.0, -0.6)}
SIZES = {"small": 3, "medium": 5, "large": 7}
"""Radius in latent pixels: one 2x2 patch token apart, and 3 at the least, where the four shapes differ in
more than their corners. The first world's radii 2/3/4/5 were half a token apart: its teacher confused the
middle two sizes, and small squares with small discs (BENCHMARKS.md, the toy-teacher section)."""
STROKE = 2
"""Width of the cross's bars and the frame's border, in latent pixels. With 1-pixel strokes (the second
world) the teacher drew crosses as one bar, fragments or nothing, and frames broken: a line thinner than a
2x2 patch token is the hardest thing for a patch transformer to commit to (BENCHMARKS.md, the toy teacher).
Two pixels, a token's width: 3 would fill the smallest frame and make the smallest cross a disc."""
ATTRIBUTES = ("shape", "colour", "size")
CHANNELS = 16
MAP_SEED = 1234
NOISE_STD = 0.05
LATENT_GAIN = 3.5
"""Brings the latents to about unit standard deviation, like normalised VAE latents."""


@dataclass(frozen=True)
class Attributes:
    """Class indices of one prompt's shape, colour and size."""

    shape: int
    colour: int
    size: int

    @property
    def prompt(self) -> str:
        return f"a {list(SIZES)[self.size]} {list(COLOURS)[self.colour]} {SHAPES[self.shape]}"

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.shape, self.colour, self.size)


def all_attributes() -> list[Attributes]:
    """Every (shape, colour, size) combination: 48 prompts, in a fixed order."""
    sizes = (len(SHAPES), len(COLOURS), len(SIZES))
    return [Attributes(*combo) for combo in itertools.product(*(range(n) for n in sizes))]


def prompts() -> list[str]:
    return [a.prompt for a in all_attributes()]


def _mask(shape: int, size: int, cy: int, cx: int, radius: int) -> torch.Tensor:
    """Boolean [size, size] mask of one shape centred at (cy, cx)."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    dy, dx = (y - cy).abs(), (x - cx).abs()
    if SHAPES[shape] == "square":
        return (dy <= radius) & (dx <= radius)
    if SHAPES[shape] == "disc":
        return (dy**2 + dx**2) <= radius**2 + 1
    if SHAPES[shape] == "cross":
        bar_y, bar_x = (y - cy >= 0) & (y - cy < STROKE), (x - cx >= 0) & (x - cx < STROKE)
        return ((dy <= radius) & bar_x) | ((dx <= radius) & bar_y)
    return ((dy <= radius) & (dx <= radius)) & ((dy > radius - STROKE) | (dx > radius - STROKE))  # frame


class World:
    """Renders latents [16, 1, size, size] for attribute triples (size = latent side, image side / 8).

    `seed` draws the fixed colour-to-latent map: another seed is another world
    with the same prompts, so a recipe tuned on one world can be checked on others.
    """

    def __init__(self, size: int = 16, seed: int = MAP_SEED) -> None:
        if size < 16 or size % 4:
            raise ValueError(f"latent size: expected a multiple of 4 that is >= 16, found {size}")
        self.size, self.seed = size, seed
        gen = torch.Generator().manual_seed(seed)
        self.kernel = torch.randn(CHANNELS, 4, 3, 3, generator=gen) / 6.0  # 4 inputs: RGB + coverage
        self.bias = 0.1 * torch.randn(CHANNELS, generator=gen)

    def canvas(self, attrs: Attributes, gen: torch.Generator) -> torch.Tensor:
        """[4, size, size]: RGB in [-1, 1] where the shape is (0 elsewhere) and its coverage mask; anywhere it fits."""
        radius = list(SIZES.values())[attrs.size]
        cy, cx = (int(c) for c in torch.randint(radius, self.size - radius, (2,), generator=gen))
        mask = _mask(attrs.shape, self.size, cy, cx, radius).float()
        brightness = 0.8 + 0.2 * float(torch.rand(1, generator=gen))
        rgb = torch.tensor(list(COLOURS.values())[attrs.colour]).view(3, 1, 1) * brightness
        return torch.cat([rgb * mask, mask[None]])

    def render(self, attrs: list[Attributes], gen: torch.Generator) -> torch.Tensor:
        """Clean latents x0 [n, 16, 1, size, size] for the given prompts (one random draw each)."""
        canvases = torch.stack([self.canvas(a, gen) for a in attrs])
        latents = F.conv2d(canvases, self.kernel, self.bias, padding=1) * LATENT_GAIN
        latents = latents + NOISE_STD * torch.randn(latents.shape, generator=gen)
        return latents.unsqueeze(2)

    def render_rows(self, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Clean latents for prompt rows into `prompts()` (one random draw each)."""
        table = all_attributes()
        return self.render([table[i] for i in rows.tolist()], gen)

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n random prompts: (latents [n, 16, 1, s, s], prompt rows [n] into `prompts()`)."""
        rows = torch.randint(0, len(all_attributes()), (n,), generator=gen)
        return self.render_rows(rows, gen), rows


def attribute_labels(rows: torch.Tensor) -> torch.Tensor:
    """[n, 3] (shape, colour, position) class indices of prompt rows."""
    table = all_attributes()
    return torch.tensor([table[i].as_tuple() for i in rows.tolist()])
