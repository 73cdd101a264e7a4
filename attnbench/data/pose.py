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
