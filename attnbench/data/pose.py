"""Pose keypoints in OpenPose-18 order and their Gaussian heatmaps.

Keypoints are float32 ``[18, 2]`` tensors in pixel coordinates ``(x, y) = (column, row)``, with
integer coordinates at pixel centres; a missing keypoint is ``(-1, -1)`` (any negative coordinate
counts as missing). A pose is fed to a network as 18 heatmaps, one Gaussian
``exp(-d^2 / (2 sigma^2))`` per keypoint, as in the pose-morphing task of Grid Partitioned
Attention (Jetchev et al. 2021, arXiv 2107.03742) and the DeepFashion pose-transfer work before it.
"""

from __future__ import annotations

import torch

KEYPOINT_NAMES = (
    "nose",
    "neck",
    "r_shoulder",
    "r_elbow",
    "r_wrist",
    "l_shoulder",
    "l_elbow",
    "l_wrist",
    "r_hip",
    "r_knee",
    "r_ankle",
    "l_hip",
    "l_knee",
    "l_ankle",
    "r_eye",
    "l_eye",
    "r_ear",
    "l_ear",
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)
MISSING = -1.0

# OpenPose-18 limbs (index pairs), for drawing a skeleton.
SKELETON = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip


def missing_mask(keypoints: torch.Tensor) -> torch.Tensor:
    """Boolean ``[..., 18]``: True where a keypoint is missing (a negative coordinate)."""
    return (keypoints < 0).any(dim=-1)


def default_sigma(size: tuple[int, int]) -> float:
    """A heatmap sigma in pixels that scales with the canvas: min(H, W) / 40, at least 1."""
    return max(1.0, min(size) / 40)


def check_keypoints(keypoints: torch.Tensor) -> None:
    """Raise ValueError unless ``keypoints`` has shape ``[..., 18, 2]``."""
    if keypoints.ndim < 2 or tuple(keypoints.shape[-2:]) != (NUM_KEYPOINTS, 2):
        raise ValueError(
            f"keypoints must have shape [..., {NUM_KEYPOINTS}, 2] (x, y), "
            f"got {list(keypoints.shape)}"
        )


def heatmaps(keypoints: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Gaussian heatmaps ``[..., 18, H, W]`` in [0, 1] for keypoints ``[..., 18, 2]``.

    Channel k is ``exp(-|p - keypoint_k|^2 / (2 sigma^2))`` over pixel centres p = (column, row),
    so it peaks (value 1) at the pixel nearest the keypoint; a missing keypoint gives zeros.

    Args:
        keypoints: (x, y) pixel coordinates, negative for missing.
        size: (H, W) of the heatmaps.
        sigma: standard deviation in pixels, > 0.
    """
    check_keypoints(keypoints)
    if not sigma > 0:
        raise ValueError(f"sigma={sigma} (must be > 0)")
    h, w = size
    kp = keypoints.to(torch.float32)
    xs = torch.arange(w, dtype=torch.float32)
    ys = torch.arange(h, dtype=torch.float32)
    scale = -0.5 / float(sigma) ** 2
    gx = torch.exp(scale * (xs - kp[..., 0:1]) ** 2)  # (..., 18, W)
    gy = torch.exp(scale * (ys - kp[..., 1:2]) ** 2)  # (..., 18, H)
    gy = gy * (~missing_mask(kp)).unsqueeze(-1)  # zero channels for missing keypoints
    return gy.unsqueeze(-1) * gx.unsqueeze(-2)  # (..., 18, H, W)


def limb_flow(
    source_keypoints: torch.Tensor,
    target_keypoints: torch.Tensor,
    size: tuple[int, int],
    radius: float | None = None,
) -> torch.Tensor:
    """[2, H, W]: where each target pixel's content lies in the source, estimated from keypoints.

    The limb-wise affine estimate of deformable skip connections (Siarohin et al. 2018): a
    target pixel near a limb (a ``SKELETON`` bone whose two keypoints are present in both poses)
    takes the nearest such limb, its position along it (fraction t of the bone) and its offset
    across it in pixels, and lands at the same t and offset of that limb in the source. Pixels
    farther than ``radius`` from every limb (the background) stay where they are. Coordinates
    are normalised like ``coordinate_map`` (pixel centres in (-1, 1)), clamped to the image.

    Args:
        source_keypoints, target_keypoints: [18, 2] (x, y) pixel coordinates, negative for missing.
        size: (H, W) of both images.
        radius: in pixels; default min(H, W) / 10.
    """
    check_keypoints(source_keypoints)
    check_keypoints(target_keypoints)
    h, w = size
    radius = min(h, w) / 10 if radius is None else float(radius)
    if not radius > 0:
        raise ValueError(f"radius={radius} (must be > 0)")
    src, tgt = source_keypoints.to(torch.float64), target_keypoints.to(torch.float64)
    present = ~(missing_mask(src) | missing_mask(tgt))
    limbs = [(i, j) for i, j in SKELETON if present[i] and present[j]]
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    pixels = torch.stack([xs, ys], dim=-1)  # (H, W, 2)
    flow = pixels.clone()
    if limbs:
        i, j = torch.tensor(limbs).T
        a_t, bone_t = tgt[i], tgt[j] - tgt[i]  # (L, 2)
        a_s, bone_s = src[i], src[j] - src[i]
        d = pixels.unsqueeze(-2) - a_t  # (H, W, L, 2)
        t = (d * bone_t).sum(-1) / (bone_t * bone_t).sum(-1).clamp_min(1e-6)  # (H, W, L)
        distance = (d - t.clamp(0, 1).unsqueeze(-1) * bone_t).norm(dim=-1)
        nearest = distance.argmin(-1, keepdim=True)  # (H, W, 1)

        def normal(bone: torch.Tensor) -> torch.Tensor:
            unit = bone / bone.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            return torch.stack([unit[:, 1], -unit[:, 0]], dim=-1)

        across = (d * normal(bone_t)).sum(-1)  # (H, W, L) pixels
        mapped = a_s + t.unsqueeze(-1) * bone_s + across.unsqueeze(-1) * normal(bone_s)
        mapped = mapped.gather(-2, nearest.unsqueeze(-1).expand(h, w, 1, 2)).squeeze(-2)
        near = distance.gather(-1, nearest) <= radius  # (H, W, 1)
        flow = torch.where(near, mapped, pixels)
    flow = torch.stack([flow[..., 0].clamp(0, w - 1), flow[..., 1].clamp(0, h - 1)])
    scale = torch.tensor([w, h], dtype=torch.float64).view(2, 1, 1)
    return ((2 * flow + 1) / scale - 1).to(torch.float32)
