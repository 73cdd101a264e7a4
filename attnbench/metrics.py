"""Image metrics for the training tasks, from maintained libraries.

L1, SSIM and PSNR come from torchmetrics. LPIPS (Zhang et al. 2018) is torchmetrics' module,
whose linear heads ship with torchmetrics but whose backbone (VGG16, AlexNet or SqueezeNet 1.1)
is torchvision's ImageNet weights file, normally downloaded into torch's hub cache. FID (Heusel
et al. 2017) is pytorch-fid's: its InceptionV3 with the FID weights
``pt_inception-2015-12-05-6726825d.pth``, also from torch's hub cache. Nothing is downloaded
unless the user asks (``ALLOW_DOWNLOADS`` set to 1, or ``attnbench run --allow-downloads``):
when a file is missing the metric is unavailable, and the reason names the file and where it
was looked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

ALLOW_DOWNLOADS = "ATTNBENCH_ALLOW_DOWNLOADS"  # "1": metrics may download missing weights
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_DIMS = 2048  # pool3 features, the standard FID
FID_BIAS_SAMPLES = 2000  # FID from fewer images is biased upwards (and noisy)

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
    if not path.is_file() and not downloads_allowed():
        raise MetricUnavailable(
            f"unavailable: LPIPS-{net} needs torchvision's ImageNet weights {path.name} at "
            f"{path} (not found; set TORCH_HOME to a directory whose hub/checkpoints/ holds it, or "
            f"{ALLOW_DOWNLOADS}=1 to download it)"
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


def downloads_allowed() -> bool:
    """Whether the user allowed metrics to download missing weights (``ALLOW_DOWNLOADS``)."""
    return os.environ.get(ALLOW_DOWNLOADS, "") == "1"


def fid_weights_file() -> Path:
    """Where pytorch-fid's InceptionV3 weights are looked for: torch's hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS


def fid_model(device: str = "cpu") -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (pool3, 2048 features, inputs in [0, 1] resized to 299).

    Raises:
        MetricUnavailable: the weights file is not in torch's hub cache (and downloads are off).
    """
    path = fid_weights_file()
    if not path.is_file() and not downloads_allowed():
        raise MetricUnavailable(
            f"unavailable: FID needs pytorch-fid's Inception weights {FID_WEIGHTS} at {path} "
            "(not found; set TORCH_HOME to a directory whose hub/checkpoints/ holds it, or "
            f"{ALLOW_DOWNLOADS}=1 to download it)"
        )
    from pytorch_fid.inception import InceptionV3

    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FID_DIMS]], resize_input=True)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def fid(
    generated: torch.Tensor,
    real: torch.Tensor,
    model: torch.nn.Module | None = None,
    batch: int = 32,
    device: str = "cpu",
) -> float:
    """Fréchet Inception distance between two sets of images [N, 3, H, W] in [0, 1].

    pytorch-fid's features and Fréchet distance; each set needs at least 2 images. FID from
    fewer than ``FID_BIAS_SAMPLES`` images is biased upwards: compare values of one sample
    count only.
    """
    from pytorch_fid.fid_score import calculate_frechet_distance

    if len(generated) < 2 or len(real) < 2:
        raise ValueError(
            f"FID needs at least 2 images a set (got {len(generated)} and {len(real)})"
        )
    model = fid_model(device) if model is None else model

    def statistics(images: torch.Tensor):
        features = (
            torch.cat(
                [
                    model(images[i : i + batch].to(device).clamp(0, 1))[0].flatten(1).cpu()
                    for i in range(0, len(images), batch)
                ]
            )
            .double()
            .numpy()
        )
        return features.mean(axis=0), np.cov(features, rowvar=False)

    return float(calculate_frechet_distance(*statistics(generated), *statistics(real)))
