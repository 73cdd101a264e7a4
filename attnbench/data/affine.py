"""Affine self-supervision pairs: (M, B) -> (tau(M), tau(B)) with a random affine tau.

Grid Partitioned Attention (Jetchev et al. 2021, arXiv 2107.03742, section 3) trains its
attention-copying generator on pairs made from one image: the target is the image warped by
``A = identity + U(-0.15, 0.15)`` on the 2 x 3 matrix, the source is the image itself, and each
branch also sees its pose. Keypoints are moved with the same warp and their heatmaps redrawn; an
image without keypoints uses a 2-channel map of its own normalised (x, y) coordinates as its
"pose", which the warp turns into "where each target pixel comes from".

Conventions: ``theta`` is the 2 x 3 matrix of ``torch.nn.functional.affine_grid`` with
``align_corners=False``. It maps each OUTPUT pixel's normalised coordinates to the INPUT
coordinates it samples, so a keypoint moves by the inverse of theta's 3 x 3 extension. Pixel
(row i, column j) has its centre at (x, y) = (j, i) in pixel coordinates and at
((2 j + 1) / W - 1, (2 i + 1) / H - 1) in normalised ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnbench.data.pose import MISSING, check_keypoints, heatmaps, missing_mask

WARP_NOISE = 0.15  # A = I + U(-0.15, 0.15), the paper's affine self-supervision


def random_affine(generator: torch.Generator, noise: float = WARP_NOISE) -> torch.Tensor:
    """[2, 3] float32: the identity plus U(-noise, noise) on every entry."""
    if not 0 <= noise < 0.5:
        raise ValueError(f"noise={noise} (allowed: 0 <= noise < 0.5, so that A stays invertible)")
    jitter = (torch.rand(2, 3, generator=generator, dtype=torch.float64) * 2 - 1) * noise
    return (torch.eye(2, 3, dtype=torch.float64) + jitter).float()


def coordinate_map(size: tuple[int, int]) -> torch.Tensor:
    """[2, H, W] float32: every pixel centre's normalised (x, y) in (-1, 1), as affine_grid uses.

    Warping this map with theta gives, at each output pixel, the normalised source position it
    samples (zeros where that falls outside the source).
    """
    h, w = size
    xs = (2 * torch.arange(w, dtype=torch.float32) + 1) / w - 1
    ys = (2 * torch.arange(h, dtype=torch.float32) + 1) / h - 1
    return torch.stack([xs.expand(h, w), ys.unsqueeze(1).expand(h, w)])


def warp_image(
    image: torch.Tensor, theta: torch.Tensor, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Warp ``image`` [C, H, W] or [N, C, H, W] by ``theta`` [2, 3] or [N, 2, 3].

    Bilinear sampling, zeros outside the source. ``size`` is the output (H, W), default the
    input's. The result has the input's number of dimensions.
    """
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be [C, H, W] or [N, C, H, W], got {list(image.shape)}")
    batch = image if image.ndim == 4 else image.unsqueeze(0)
    n = batch.shape[0]
    if theta.shape == (2, 3):
        theta = theta.expand(n, 2, 3)
    if theta.shape != (n, 2, 3) or (image.ndim == 3 and n != 1):
        raise ValueError(
            f"theta {list(theta.shape)} does not fit image {list(image.shape)} "
            "(allowed: [2, 3], or [N, 2, 3] with an [N, C, H, W] image)"
        )
    out_hw = tuple(batch.shape[-2:]) if size is None else tuple(size)
    theta = theta.to(device=batch.device, dtype=batch.dtype)
    grid = F.affine_grid(theta, [n, batch.shape[1], *out_hw], align_corners=False)  # (N, H, W, 2)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out if image.ndim == 4 else out.squeeze(0)


def warp_keypoints(
    keypoints: torch.Tensor,
    theta: torch.Tensor,
    size: tuple[int, int],
    out_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Move keypoints [..., 18, 2] with the warp that ``warp_image`` applies for ``theta``.

    A feature at pixel p of the source lands at pixel p' of the warped image. Keypoints that are
    missing, or that land outside the output's pixel centres (x outside [0, W - 1] or y outside
    [0, H - 1]), become (-1, -1).

    Args:
        keypoints: (x, y) pixel coordinates in the source, negative for missing.
        theta: [2, 3] or [..., 2, 3] (affine_grid convention, align_corners=False).
        size: (H, W) of the source.
        out_size: (H, W) of the warped image; default ``size``.
    """
    check_keypoints(keypoints)
    h, w = size
    oh, ow = size if out_size is None else out_size
    kp = keypoints.to(torch.float64)
    theta = theta.to(torch.float64)
    # Pixel -> normalised source coordinates.
    src = torch.stack([(2 * kp[..., 0] + 1) / w - 1, (2 * kp[..., 1] + 1) / h - 1], dim=-1)
    # affine_grid maps output -> input: input = theta @ [output, 1]; invert the 3 x 3 extension.
    last_row = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(*theta.shape[:-2], 1, 3)
    inverse = torch.linalg.inv(torch.cat([theta, last_row], dim=-2))[..., :2, :]  # (..., 2, 3)
    dst = src @ inverse[..., :2].transpose(-1, -2) + inverse[..., 2].unsqueeze(-2)  # (..., 18, 2)
    out = torch.stack([((dst[..., 0] + 1) * ow - 1) / 2, ((dst[..., 1] + 1) * oh - 1) / 2], dim=-1)
    outside = (
        (out[..., 0] < 0) | (out[..., 0] > ow - 1) | (out[..., 1] < 0) | (out[..., 1] > oh - 1)
    )
    drop = (missing_mask(kp) | outside).unsqueeze(-1)
    return torch.where(drop, torch.full_like(out, MISSING), out).to(torch.float32)


def affine_pair(
    sample: dict,
    generator: torch.Generator,
    sigma: float,
    noise: float = WARP_NOISE,
    coords: bool = False,
) -> dict:
    """A training pair from one sample: the sample and its copy warped by a random affine.

    Args:
        sample: ``image`` [3, H, W] and ``keypoints`` [18, 2], or ``keypoints=None`` with
            ``heatmaps`` holding a pose map to warp (e.g. the coordinate map of an ImageFolder).
        generator: draws theta (``random_affine``).
        sigma: heatmap sigma in pixels for poses drawn from keypoints.
        noise: theta = identity + U(-noise, noise).
        coords: with keypoints, also append to the source pose its coordinate map and to the
            target pose that map warped like the image (2 channels each: where each target
            pixel comes from, zeros outside the source).

    Returns:
        ``source`` (the image), ``source_pose``, ``target`` (the warped image), ``target_pose``,
        ``theta`` [2, 3] and ``target_keypoints`` ([18, 2], None without keypoints). With
        keypoints both poses are heatmaps drawn with ``sigma``; without, ``source_pose`` is the
        sample's pose map and ``target_pose`` that map warped like the image.
    """
    image = sample["image"]
    size = tuple(image.shape[-2:])
    theta = random_affine(generator, noise)
    target = warp_image(image, theta)
    keypoints = sample.get("keypoints")
    if keypoints is None:
        source_pose = sample["heatmaps"]
        target_pose = warp_image(source_pose, theta)
        target_keypoints = None
    else:
        source_pose = heatmaps(keypoints, size, sigma)
        target_keypoints = warp_keypoints(keypoints, theta, size)
        target_pose = heatmaps(target_keypoints, size, sigma)
        if coords:
            grid = coordinate_map(size)
            source_pose = torch.cat([source_pose, grid])
            target_pose = torch.cat([target_pose, warp_image(grid, theta)])
    return {
        "source": image,
        "source_pose": source_pose,
        "target": target,
        "target_pose": target_pose,
        "theta": theta,
        "target_keypoints": target_keypoints,
    }
