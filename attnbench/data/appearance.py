"""The mannequin's appearance: textures, colours, the chest logo and the background.

A part is filled with a texture evaluated in part-local coordinates (u along the bone, v across
it, both in body units, so about 1 = the figure's height), hence a texture stays fixed to its
part when the pose changes: the same appearance can be drawn in any pose. Textures are stripes,
checks or dots on the clothes, skin, hair, shoes, and a 5 x 5 two-colour glyph on the chest (the
"logo") that is unique per appearance. An appearance (body proportions, textures, logo,
background) is derived from its integer id alone.
"""

from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass

import torch

from attnbench.data.body import random_body

# Texture kinds. SPLIT is two-tone along the bone (hair on the head).
SOLID, STRIPES, CHECKS, DOTS, SPLIT = 0, 1, 2, 3, 4

LOGO_CELLS = 5
LOGO_CELL = 0.02  # side of one logo cell in body units (the figure is about 1 tall)
LOGO_TOP = 0.075  # distance of the logo below the top of the torso, body units


def logo_glyph(appearance: int) -> list[list[int]]:
    """The 5 x 5 binary glyph of an appearance id.

    A bijection of the id's low 25 bits (odd multiplications and xor-shifts modulo 2^25), so two
    ids that differ modulo 2^25 never share a glyph.
    """
    mask = (1 << LOGO_CELLS * LOGO_CELLS) - 1
    x = appearance & mask
    for multiplier in (0x1A7F3B5, 0x0F2C9D3):
        x = (x * multiplier) & mask
        x ^= x >> 13
    return [[(x >> (r * LOGO_CELLS + c)) & 1 for c in range(LOGO_CELLS)] for r in range(LOGO_CELLS)]


@dataclass(frozen=True)
class Texture:
    """A part's texture in part-local body units.

    ``angle`` and ``period`` orient and space stripes, checks and dots; ``param`` is the stripe
    duty cycle, the dot radius (fraction of the period) or the split point (fraction of the bone).
    """

    kind: int
    colour0: tuple[float, float, float]
    colour1: tuple[float, float, float]
    angle: float = 0.0
    period: float = 0.05
    param: float = 0.5


@dataclass(frozen=True)
class Appearance:
    """Everything about a figure that does not depend on its pose."""

    id: int
    body: dict[str, float]  # bone lengths and widths, body units
    textures: dict[str, Texture]  # by part name
    logo: tuple[tuple[int, ...], ...]  # 5 x 5 bits, row 0 at the top
    logo_colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    background: tuple[tuple[float, float, float], ...]  # corner colours: tl, tr, bl, br
    background_pattern: Texture  # in canvas units (1 = the shorter side); contrast in param


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))


def _colour_pair(rng: random.Random) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Two colours that differ clearly in hue and brightness."""
    h, s, v = rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.25, 1.0)
    v1 = v - rng.uniform(0.35, 0.6) if v > 0.6 else v + rng.uniform(0.35, 0.6)
    return _hsv(h, s, v), _hsv(h + rng.uniform(0.2, 0.8), rng.uniform(0.2, 1.0), v1)


def _cloth(rng: random.Random) -> Texture:
    kind = rng.choice((STRIPES, STRIPES, CHECKS, DOTS))
    c0, c1 = _colour_pair(rng)
    param = rng.uniform(0.35, 0.65) if kind == STRIPES else rng.uniform(0.2, 0.35)
    return Texture(kind, c0, c1, rng.uniform(0.0, math.pi), rng.uniform(0.045, 0.09), param)


def make_appearance(appearance: int) -> Appearance:
    """The appearance with this id: body proportions, garments, logo and background."""
    rng = random.Random(appearance)
    body = random_body(rng)

    skin_colour = _hsv(rng.uniform(0.02, 0.11), rng.uniform(0.25, 0.6), rng.uniform(0.35, 0.95))
    skin = Texture(SOLID, skin_colour, skin_colour)
    hair_colour = _hsv(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.6))
    head = Texture(SPLIT, skin.colour0, hair_colour, param=rng.uniform(0.55, 0.72))
    shirt = _cloth(rng)
    sleeve = shirt if rng.random() < 0.5 else _cloth(rng)
    trousers = _cloth(rng)
    shoe_colour = _hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.05, 0.4))
    shoes = Texture(SOLID, shoe_colour, shoe_colour)
    long_sleeves, shorts = rng.random() < 0.5, rng.random() < 0.3
    textures = {"torso": shirt, "neck": skin, "head": head}
    for side in "rl":
        textures[f"{side}_upper_arm"] = sleeve
        textures[f"{side}_lower_arm"] = sleeve if long_sleeves else skin
        textures[f"{side}_hand"] = skin
        textures[f"{side}_upper_leg"] = trousers
        textures[f"{side}_lower_leg"] = skin if shorts else trousers
        textures[f"{side}_foot"] = shoes

    glyph = tuple(tuple(row) for row in logo_glyph(appearance))
    logo_colours = _colour_pair(rng)
    base = _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.5, 1.0))
    corners = tuple(
        tuple(min(max(c + rng.uniform(-0.25, 0.25), 0.0), 1.0) for c in base) for _ in range(4)
    )
    pattern_kind = rng.choice((SOLID, SOLID, STRIPES, CHECKS))
    angle, period, contrast = (
        rng.uniform(0, math.pi),
        rng.uniform(0.08, 0.2),
        rng.uniform(0.05, 0.12),
    )
    pattern = Texture(pattern_kind, (0, 0, 0), (1, 1, 1), angle, period, contrast)
    return Appearance(appearance, body, textures, glyph, logo_colours, corners, pattern)


def pattern_weight(
    kind: torch.Tensor, s: torch.Tensor, t: torch.Tensor, param: torch.Tensor, px: torch.Tensor
) -> torch.Tensor:
    """Blend weight of colour1 for stripes, checks or dots at period coordinates (s, t).

    ``px`` is the number of pixels per period: edges are anti-aliased over about one pixel.
    """
    ds = (s - s.round()).abs()  # distance to the nearest integer, in [0, 0.5]
    dt = (t - t.round()).abs()
    stripes = 0.5 * param - ds  # signed distance to a stripe's edge, periods
    checks = 4 * (ds - 0.25) * (dt - 0.25)
    dots = param - torch.hypot(ds, dt)
    edge = torch.where(kind == STRIPES, stripes, torch.where(kind == CHECKS, checks, dots))
    return (0.5 + edge * px).clamp(0, 1) * (kind != SOLID)


def per_part(values) -> torch.Tensor:
    """P values, one per part, as a float32 (P, 1, 1) tensor (broadcasts over a part's window)."""
    values = torch.as_tensor(values, dtype=torch.float32)
    return values.view(len(values), 1, 1)


def texture_colours(
    textures: list[Texture], u: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """(P, 3, h, w): every part's texture at part-local body units ``u`` along the bone and
    ``v`` across it (P, h, w each), for bones ``lengths`` (P, 1, 1) long in body units drawn at
    ``scale`` pixels per body unit (edges anti-aliased over about one pixel)."""
    n = len(textures)
    angle, period = per_part([t.angle for t in textures]), per_part([t.period for t in textures])
    kind, param = per_part([t.kind for t in textures]), per_part([t.param for t in textures])
    ca, sa = torch.cos(angle), torch.sin(angle)
    s = (u * ca + v * sa) / period
    t = (v * ca - u * sa) / period
    weight = pattern_weight(kind, s, t, param, period * scale)
    split = (0.5 + (u - param * lengths) * scale).clamp(0, 1)
    weight = torch.where(kind == SPLIT, split, weight)
    c0 = torch.tensor([t.colour0 for t in textures], dtype=torch.float32).view(n, 3, 1, 1)
    c1 = torch.tensor([t.colour1 for t in textures], dtype=torch.float32).view(n, 3, 1, 1)
    return c0 + weight.unsqueeze(1) * (c1 - c0)


def paint_logo(
    colour: torch.Tensor, u: torch.Tensor, v: torch.Tensor, appearance: Appearance
) -> None:
    """Paint the appearance's glyph into the torso's colour [3, h, w] (in place).

    ``u`` and ``v`` are body units down from the top of the torso and across it.
    """
    row = ((u - LOGO_TOP) / LOGO_CELL).floor()
    col = (v / LOGO_CELL + LOGO_CELLS / 2).floor()
    inside = (row >= 0) & (row < LOGO_CELLS) & (col >= 0) & (col < LOGO_CELLS)
    glyph = torch.tensor(appearance.logo, dtype=torch.bool)
    bit = glyph[row.clamp(0, LOGO_CELLS - 1).long(), col.clamp(0, LOGO_CELLS - 1).long()]
    fg, bg = (torch.tensor(c, dtype=torch.float32).view(3, 1, 1) for c in appearance.logo_colours)
    logo = torch.where(bit, fg, bg)
    colour.copy_(torch.where(inside, logo, colour))
