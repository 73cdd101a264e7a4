"""The copy hit rate: how much of each target pixel's attention falls on its true source.

In an affine pair (Jetchev et al. 2021, arXiv 2107.03742, section 3) the target is the source
warped by theta, so target pixel x shows source point theta·[x, 1] (``affine_grid``'s
convention, ``align_corners=False``; see :mod:`attnbench.data.affine`). A copying block that
has learned to copy puts its attention mass there. For a block whose queries form an
hq x wq map and whose keys an hk x wk map, the hit rate at radius r is the share of each query's
attention mass on the keys whose pixel centres lie within r pixels (Euclidean, at the key map's
resolution) of the query's true source point, averaged over the queries whose source point
lies inside the key map (between the first and last pixel centres). A one-hot attention on the
true source has hit rate 1; uniform attention about (number of keys in the disc) / Nk.
"""

from __future__ import annotations

import torch

RADII = (1, 2)  # pixels at the block's own resolution


def pixel_centres(hw: tuple[int, int], device=None) -> torch.Tensor:
    """[h*w, 2] (x, y) = (column, row) of every pixel centre, row-major."""
    h, w = hw
    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)
    return torch.stack([cols, rows], dim=-1)


def source_points(
    theta: torch.Tensor, q_hw: tuple[int, int], kv_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where every query pixel's content comes from, in key-map pixels.

    Args:
        theta: [B, 2, 3] warps (output normalised coordinates -> input normalised coordinates).
        q_hw: the query (target) map.
        kv_hw: the key (source) map.

    Returns:
        points [B, Nq, 2] (x, y) in key-map pixel coordinates, and inside [B, Nq] bool: the
        point lies within the key map's pixel centres.
    """
    (hq, wq), (hk, wk) = q_hw, kv_hw
    centres = pixel_centres(q_hw, theta.device)  # (Nq, 2)
    norm = torch.stack([(2 * centres[:, 0] + 1) / wq - 1, (2 * centres[:, 1] + 1) / hq - 1], -1)
    theta = theta.to(torch.float64)
    src = norm @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]  # (B, Nq, 2) normalised
    points = torch.stack([((src[..., 0] + 1) * wk - 1) / 2, ((src[..., 1] + 1) * hk - 1) / 2], -1)
    inside = (
        (points[..., 0] >= 0)
        & (points[..., 0] <= wk - 1)
        & (points[..., 1] >= 0)
        & (points[..., 1] <= hk - 1)
    )
    return points, inside


def hit_mass(
    weights: torch.Tensor,
    theta: torch.Tensor,
    q_hw: tuple[int, int],
    kv_hw: tuple[int, int],
    radii: tuple[int, ...] = RADII,
) -> tuple[dict[int, float], int]:
    """Summed hit mass per radius over the inside queries, and how many queries were inside.

    Sums (not means) so that batches pool: hit rate = sum of masses / count over all batches.

    Args:
        weights: [B, H, Nq, Nk] attention matrix (``Attention.weights``); heads are averaged.
        theta: [B, 2, 3] the pairs' warps.
        q_hw, kv_hw: the maps of the block.
        radii: radii in key-map pixels.
    """
    b, _, nq, nk = weights.shape
    if nq != q_hw[0] * q_hw[1] or nk != kv_hw[0] * kv_hw[1] or theta.shape != (b, 2, 3):
        raise ValueError(
            f"weights {tuple(weights.shape)}, theta {tuple(theta.shape)} do not fit q_hw={q_hw},"
            f" kv_hw={kv_hw} (allowed: weights [B, H, hq*wq, hk*wk], theta [B, 2, 3])"
        )
    points, inside = source_points(theta.to(weights.device), q_hw, kv_hw)  # (B, Nq, 2), (B, Nq)
    return hit_mass_at(weights, points, inside, kv_hw, radii)


def correspondence_points(
    correspondence: torch.Tensor, q_hw: tuple[int, int], kv_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``source_points`` for pairs whose true source is a map rather than a warp.

    Args:
        correspondence: [B, 2, H, W] (x, y) source pixel of every full-resolution target pixel,
            negative where it has none (``Mannequin.correspondence``).
        q_hw, kv_hw: the block's query and key maps (each a whole-factor downscale of H x W).

    Returns:
        points [B, Nq, 2] in key-map pixel coordinates and inside [B, Nq]: the full-resolution
        target pixel nearest each query pixel's centre has a source.
    """
    b, _, h, w = correspondence.shape
    (hq, wq), (hk, wk) = q_hw, kv_hw
    centres = pixel_centres(q_hw, correspondence.device)  # (Nq, 2) in query-map pixels
    cols = ((centres[:, 0] + 0.5) * w / wq - 0.5).round().long().clamp(0, w - 1)
    rows = ((centres[:, 1] + 0.5) * h / hq - 0.5).round().long().clamp(0, h - 1)
    full = correspondence[:, :, rows, cols].to(torch.float64).transpose(1, 2)  # (B, Nq, 2)
    inside = (full >= 0).all(-1)
    scale = torch.tensor([wk / w, hk / h], dtype=torch.float64, device=full.device)
    return (full + 0.5) * scale - 0.5, inside


def hit_mass_at(
    weights: torch.Tensor,
    points: torch.Tensor,
    inside: torch.Tensor,
    kv_hw: tuple[int, int],
    radii: tuple[int, ...] = RADII,
) -> tuple[dict[int, float], int]:
    """``hit_mass`` given every query's true source ``points`` [B, Nq, 2] (key-map pixels) and
    which of them count, ``inside`` [B, Nq]."""
    if (
        points.shape != (*weights.shape[:1], weights.shape[2], 2)
        or inside.shape != points.shape[:2]
    ):
        raise ValueError(
            f"points {tuple(points.shape)}, inside {tuple(inside.shape)} do not fit weights "
            f"{tuple(weights.shape)} (allowed: points [B, Nq, 2], inside [B, Nq])"
        )
    hk, wk = kv_hw
    mean_weights = weights.mean(dim=1)  # (B, Nq, Nk); only the picked entries go to float64
    masses = {}
    for r in radii:
        # The keys within r of a point lie in the (2r + 2)² pixels from floor(point) - r.
        offsets = torch.arange(-r, r + 2, device=weights.device, dtype=torch.float64)
        base = points.floor()  # (B, Nq, 2)
        cols = base[..., 0, None, None] + offsets[None, :]  # (B, Nq, 1, 2r+2)
        rows = base[..., 1, None, None] + offsets[:, None]  # (B, Nq, 2r+2, 1)
        near = (cols - points[..., 0, None, None]) ** 2 + (rows - points[..., 1, None, None]) ** 2
        valid = (near <= r * r) & (cols >= 0) & (cols <= wk - 1) & (rows >= 0) & (rows <= hk - 1)
        index = (rows.clamp(0, hk - 1) * wk + cols.clamp(0, wk - 1)).long()  # (B, Nq, ., .)
        picked = mean_weights.gather(-1, index.flatten(2)).to(torch.float64)  # (B, Nq, (2r+2)²)
        mass = (picked * valid.flatten(2)).sum(-1)  # (B, Nq)
        masses[r] = float(mass[inside].sum())
    return masses, int(inside.sum())
