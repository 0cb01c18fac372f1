"""The showcase's world: procedurally drawn coloured shapes, the small pixel-space
denoiser that learns them, and the pixel statistic that says which colour an image is.

Images are 3×16×16 in [-1, 1] on a black background: one square, disc or triangle of
one flat colour. Conditioning is two one-hot tokens, ``[2, 8]``: token 0 names the
shape (dims 0-3), token 1 the colour (dims 4-7). The base model is pretrained on red,
green and blue only; the colour slot ``yellow`` is never used until the LoRA teaches it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 16
SHAPES = ("square", "disc", "triangle")
COLOURS = {  # RGB in [-1, 1]
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
BASE_COLOURS = ("red", "green", "blue")
NEW_COLOUR = "yellow"
COND_DIM = 8


# -- data -------------------------------------------------------------------------------

def conditioning(shape: str, colour: str) -> torch.Tensor:
    """The ``[2, 8]`` one-hot conditioning of a (shape, colour) prompt."""
    c = torch.zeros(2, COND_DIM)
    c[0, SHAPES.index(shape)] = 1.0
    c[1, 4 + list(COLOURS).index(colour)] = 1.0
    return c


def draw(shape: str, colour: str, cy: float, cx: float, r: float) -> torch.Tensor:
    """One image: ``shape`` of half-size ``r`` centred at (cy, cx) in ``colour``."""
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5,
                            indexing="ij")
    dy, dx = ys - cy, xs - cx
    if shape == "square":
        mask = (dy.abs() <= r) & (dx.abs() <= r)
    elif shape == "disc":
        mask = dy * dy + dx * dx <= r * r
    else:  # an upright triangle: apex at the top, base at the bottom
        mask = (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
    img = torch.full((3, SIZE, SIZE), -1.0)
    rgb = torch.tensor(COLOURS[colour]).view(3, 1, 1).expand(3, SIZE, SIZE)
    return torch.where(mask, rgb, img)


def make_images(n: int, colours: tuple[str, ...], generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random shapes in ``colours``: images ``[n,3,16,16]`` and conditioning
    ``[n,2,8]``, drawn only from ``generator``."""
    images, conds = [], []
    for _ in range(n):
        shape = SHAPES[int(torch.randint(len(SHAPES), (), generator=generator))]
        colour = colours[int(torch.randint(len(colours), (), generator=generator))]
        r = 2.5 + 2.0 * float(torch.rand((), generator=generator))
        cy, cx = (r + 1 + (SIZE - 2 * r - 2) * torch.rand(2, generator=generator)).tolist()
        images.append(draw(shape, colour, cy, cx, r))
        conds.append(conditioning(shape, colour))
    return torch.stack(images), torch.stack(conds)


# -- the pixel statistic ----------------------------------------------------------------

def dominant_colour(images: torch.Tensor) -> list[str | None]:
    """The palette colour nearest to the mean of each image's foreground pixels (those
    whose brightest channel is above the mid level); ``None`` for an empty image."""
    palette = torch.tensor(list(COLOURS.values()))
    names = list(COLOURS)
    out: list[str | None] = []
    for img in images.float():
        fg = img.flatten(1).T  # [pixels, 3]
        fg = fg[fg.max(dim=1).values > 0.0]
        if fg.shape[0] < 4:
            out.append(None)
            continue
        mean = fg.mean(dim=0)
        out.append(names[int(((palette - mean) ** 2).sum(dim=1).argmin())])
    return out


def adoption(images: torch.Tensor, colour: str) -> float:
    """Share of ``images`` whose dominant colour is ``colour``."""
    found = dominant_colour(images)
    return sum(c == colour for c in found) / max(len(found), 1)


# -- the denoiser -----------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int = 32) -> torch.Tensor:
    """Sinusoidal features of the model timestep (σ·1000 for flow)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """Two 3×3 convolutions with the time/conditioning embedding added in between."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class ShapesDenoiser(nn.Module):
    """A two-level conv UNet for 3×16×16 images, called as ``model(x_t, t, cond)``
    (the ``module`` model family's convention)."""

    def __init__(self, ch: int = 16, emb: int = 64):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(32, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.cond_mlp = nn.Sequential(nn.Linear(2 * COND_DIM, emb), nn.SiLU(),
                                      nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = ResBlock(ch, ch, emb)
        self.downsample = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.mid1 = ResBlock(2 * ch, 2 * ch, emb)
        self.mid2 = ResBlock(2 * ch, 2 * ch, emb)
        self.upsample = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.up = ResBlock(2 * ch, ch, emb)
        self.norm_out = nn.GroupNorm(8, ch)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t).to(x.dtype))
        emb = F.silu(emb + self.cond_mlp(cond.flatten(1).to(x.dtype)))
        h0 = self.down(self.conv_in(x), emb)
        h = self.downsample(h0)
        h = self.mid2(self.mid1(h, emb), emb)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up(torch.cat([h, h0], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
