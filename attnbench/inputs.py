"""Input families for measuring attention: how the q, k, v of a case are made.

- ``gaussian``: independent N(0, 1) entries — no spatial structure, GPA's worst case.
- ``smooth``: spatially correlated fields (Gaussian-blurred noise, re-standardised per channel):
  neighbouring tokens are alike, as in image features.
- ``warp-copy``: keys are features of a random image, queries the same features of an affinely
  warped copy (A = I + U(-0.15, 0.15) on the 2 x 3 matrix, as in the GPA paper's
  self-supervision), values the source pixels (Cv = 3). Attention must copy: its output is an
  image, compared with the truly warped one (``copy_psnr``) where the warp stays inside the
  source. The dot product ranks keys by their norm as much as by their likeness, so no
  temperature makes exact attention copy well (about 21 dB at best on 64x64 maps, C = 64).
- ``warp-match``: the same source, warp, values and ``copy_psnr``, with distance-ranked scores
  of adjustable sharpness s > 0. The C - 1 feature channels f (warp-copy's features with one
  channel fewer) are multiplied by s; queries get a last channel 1, keys -|s f_k|^2 / 2, and
  both are multiplied by (C / (C - 1))^(1/4). The 1/sqrt(C) that implementations scale scores
  by then gives q.k / sqrt(C) = -s^2 |f_q - f_k|^2 / (2 sqrt(C - 1)) plus a term of the query
  alone, which softmax ignores: the nearest features win, the more so the larger s. Exact
  attention copies at about 22 dB at s = 1, 30-32 dB at 2.5 and 31-34 dB at 4 (64x64, C = 64).

Inputs are made in float64 on the CPU from a seed; every (batch, head) gets its own sample.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from attnbench.spec import AttentionSpec

FAMILIES = ("gaussian", "smooth", "warp-copy", "warp-match")
WARP_FAMILIES = ("warp-copy", "warp-match")  # values are the source's RGB pixels: Cv = 3
WARP_NOISE = 0.15  # A = I + U(-0.15, 0.15), the paper's affine self-supervision
DESCRIPTOR_SIGMAS = (0.02, 0.05, 0.1)  # blur scales of the copy features, relative to the width


@dataclasses.dataclass
class Inputs:
    """q, k, v in float64 on the CPU; for the warp families also the warped target and its valid
    mask."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    target: torch.Tensor | None = None  # (B, H, Nq, 3): the source warped by A
    valid: torch.Tensor | None = None  # (B, H, Nq): the warp samples inside the source


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of [N, C, h, w] with standard deviation ``sigma`` pixels."""
    if sigma < 0.3:
        return x
    radius = int(3 * sigma)  # a kernel of 2 radius + 1 taps, mirrored at the edges
    out = gaussian_filter(
        x.numpy(), sigma=(0, 0, sigma, sigma), mode="mirror", radius=(0, 0, radius, radius)
    )
    return torch.from_numpy(out).to(x.dtype)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per sample and channel over the map ([N, C, h, w])."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return (x - mean) / std


def to_tokens(x: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """[B*H, C, rows, cols] -> [B, H, rows*cols, C] (row-major tokens)."""
    n, c = x.shape[:2]
    return x.reshape(b, h, c, -1).transpose(2, 3).contiguous()


def random_images(n: int, hw: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """[n, 3, h, w] in (0, 1): colour fields with detail at several scales."""
    h, w = hw
    field = torch.zeros(n, 3, h, w, dtype=torch.float64)
    for rel in (0.02, 0.06, 0.15):
        noise = torch.randn(n, 3, h, w, generator=g, dtype=torch.float64)
        field += standardise(blur(noise, rel * w))
    return torch.sigmoid(field)


def descriptors(images: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Per-pixel features [n, C, h, w]: colours at several blur scales, randomly projected."""
    w = images.shape[-1]
    stack = torch.cat([images] + [blur(images, s * w) for s in DESCRIPTOR_SIGMAS], dim=1)
    return torch.einsum("dc,nchw->ndhw", projection, stack)


def random_affine(n: int, g: torch.Generator) -> torch.Tensor:
    """[n, 2, 3]: identity plus U(-0.15, 0.15) on every entry."""
    noise = (torch.rand(n, 2, 3, generator=g, dtype=torch.float64) * 2 - 1) * WARP_NOISE
    return torch.eye(2, 3, dtype=torch.float64) + noise


def warp_inputs(spec: AttentionSpec, g: torch.Generator, channels: int) -> Inputs:
    """``warp-copy`` with ``channels`` feature channels: keys the source image's features,
    queries those of its warped copy (standardised by the source's statistics), values its
    pixels."""
    b, h = spec.batch, spec.heads
    n = b * h
    source = random_images(n, spec.kv_hw, g)  # (n, 3, hk, wk)
    theta = random_affine(n, g)
    grid = F.affine_grid(theta, [n, 3, *spec.q_hw], align_corners=False)  # (n, hq, wq, 2)
    target = F.grid_sample(source, grid, align_corners=False, padding_mode="zeros")
    valid = (grid.abs() <= 1).all(dim=-1)  # (n, hq, wq)
    projection = torch.randn(
        channels, 3 * (1 + len(DESCRIPTOR_SIGMAS)), generator=g, dtype=torch.float64
    )
    keys = descriptors(source, projection)
    mean = keys.mean(dim=(2, 3), keepdim=True)
    std = keys.std(dim=(2, 3), keepdim=True)
    # Queries use the source's statistics, so matching pixels have matching features.
    queries = (descriptors(target, projection) - mean) / std
    keys = (keys - mean) / std
    return Inputs(
        q=to_tokens(queries, b, h),
        k=to_tokens(keys, b, h),
        v=to_tokens(source, b, h),
        target=to_tokens(target, b, h),
        valid=valid.reshape(b, h, -1),
    )


def distance_ranked(features: Inputs, sharpness: float) -> Inputs:
    """``warp-match`` from warp features with one channel fewer (see the module docstring)."""
    c = features.q.shape[-1] + 1
    gain = (c / (c - 1)) ** 0.25  # so that the implementations' 1/sqrt(C) acts as 1/sqrt(C - 1)
    fq, fk = sharpness * features.q, sharpness * features.k
    q = torch.cat([fq, torch.ones_like(fq[..., :1])], dim=-1)
    k = torch.cat([fk, -0.5 * fk.square().sum(dim=-1, keepdim=True)], dim=-1)
    return dataclasses.replace(features, q=gain * q, k=gain * k)


def make_inputs(family: str, spec: AttentionSpec, seed: int, sharpness: float = 1.0) -> Inputs:
    """The inputs of ``family`` for ``spec`` (its dtype and device are not applied here);
    ``sharpness`` is warp-match's s.

    Raises:
        ValueError: an unknown family, a spatial family without map shapes, a sharpness other
        than 1 outside warp-match or not above 0, or sizes the family cannot have.
    """
    if family not in FAMILIES:
        raise ValueError(f"inputs={family!r} (allowed: {', '.join(FAMILIES)})")
    if family == "warp-match" and not sharpness > 0:
        raise ValueError(f"sharpness={sharpness!r} (allowed: a number > 0)")
    if family != "warp-match" and sharpness != 1.0:
        raise ValueError(
            f"sharpness={sharpness!r} with inputs={family!r} (allowed: 1.0; only warp-match has "
            "a sharpness)"
        )
    g = torch.Generator().manual_seed(seed)
    b, h = spec.batch, spec.heads
    if family == "gaussian":
        shapes = [
            (b, h, spec.q_tokens, spec.channels),
            (b, h, spec.kv_tokens, spec.channels),
            (b, h, spec.kv_tokens, spec.v_channels),
        ]
        return Inputs(*(torch.randn(s, generator=g, dtype=torch.float64) for s in shapes))
    if spec.q_hw is None or spec.kv_hw is None:
        raise ValueError(f"inputs={family!r} needs q_hw and kv_hw (a spatial family)")
    if family == "smooth":
        sigma = max(spec.kv_hw) / 16

        def field(hw, c):
            noise = torch.randn(b * h, c, *hw, generator=g, dtype=torch.float64)
            return to_tokens(standardise(blur(noise, sigma)), b, h)

        return Inputs(
            field(spec.q_hw, spec.channels),
            field(spec.kv_hw, spec.channels),
            field(spec.kv_hw, spec.v_channels),
        )
    if spec.v_channels != 3:
        raise ValueError(
            f"inputs={family!r} copies RGB pixels: v_channels must be 3, got {spec.v_channels}"
        )
    if family == "warp-copy":
        return warp_inputs(spec, g, spec.channels)
    if spec.channels < 2:
        raise ValueError(
            f"inputs='warp-match' needs a feature channel besides its distance channel: "
            f"channels must be >= 2, got {spec.channels}"
        )
    return distance_ranked(warp_inputs(spec, g, spec.channels - 1), sharpness)
