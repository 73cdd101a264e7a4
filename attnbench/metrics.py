"""Image metrics for the training tasks, from maintained libraries.

L1, SSIM and PSNR come from torchmetrics. LPIPS (Zhang et al. 2018) is torchmetrics' module,
whose linear heads ship with torchmetrics but whose backbone (VGG16, AlexNet or SqueezeNet 1.1)
is torchvision's ImageNet weights file, normally downloaded into torch's hub cache. Nothing is
downloaded here: when the file is missing the metric is unavailable, and the reason names the
file and where it was looked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch

# LPIPS backbone: torchmetrics' net_type -> the torchvision weights enum it loads.
LPIPS_BACKBONES = {
    "vgg": "VGG16_Weights",
    "alex": "AlexNet_Weights",
    "squeeze": "SqueezeNet1_1_Weights",
}


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here; the message says which file is missing and where."""


def lpips_weights_file(net: str = "vgg") -> Path:
    """Where torchvision keeps the ImageNet weights of LPIPS backbone ``net``."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net={net!r} (allowed: {', '.join(LPIPS_BACKBONES)})")
    from torchvision import models

    url = getattr(models, LPIPS_BACKBONES[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def lpips_model(net: str = "vgg") -> torch.nn.Module:
    """torchmetrics' LPIPS on images in [0, 1], built only from weights already on disk.

    Raises:
        MetricUnavailable: the backbone's weights file is not in torch's hub cache.
    """
    path = lpips_weights_file(net)
    if not path.is_file():
        raise MetricUnavailable(
            f"unavailable: LPIPS-{net} needs torchvision's ImageNet weights {path.name} at "
            f"{path} (not found; set TORCH_HOME to a directory whose checkpoints/ holds it)"
        )
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    model = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
    return model.eval().requires_grad_(False)


def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean L1, SSIM and PSNR (data range 1) of images [N, 3, H, W] in [0, 1]."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    pred = pred.clamp(0, 1)
    return {
        "l1": (pred - target).abs().mean().item(),
        "ssim": structural_similarity_index_measure(pred, target, data_range=1.0).item(),
        "psnr": peak_signal_noise_ratio(pred, target, data_range=1.0).item(),
    }
