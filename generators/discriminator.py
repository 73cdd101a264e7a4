"""The pose task's discriminator: StyleGAN2's residual design on (image, pose) pairs.

Karras et al. 2020 (StyleGAN2, the "resnet" discriminator): a 1x1 convolution from the input,
then one residual block per halving of the map (two 3x3 convolutions with leaky ReLU, the
second followed by 2x2 average pooling; a 1x1 skip of the pooled input; the sum scaled by
1/sqrt(2)) down to 4x4, a minibatch standard-deviation channel, a 3x3 convolution and two
linear layers to one logit. The pose-morphing task of Jetchev et al. 2021 (arXiv 2107.03742,
section 3.1) conditions it on the pose: its input is the image concatenated with its pose maps.
Not included: StyleGAN2's equalised learning rate and blur filters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FINAL_SIZE = 4  # the map side the blocks stop at
STDDEV_GROUP = 4  # minibatch standard deviation over groups of up to 4 samples


class DiscriminatorBlock(nn.Module):
    """Two 3x3 convolutions and a 2x2 average pooling, plus a pooled 1x1 skip."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.conv0(x), 0.2)
        y = F.avg_pool2d(F.leaky_relu(self.conv1(y), 0.2), 2)
        return (y + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


def minibatch_stddev(x: torch.Tensor, group: int = STDDEV_GROUP) -> torch.Tensor:
    """Append one channel: the mean standard deviation of the features within sample groups.

    Groups are of ``min(group, N)`` samples (N must divide by it, else the whole batch is one
    group), so that the discriminator sees how varied a batch is.
    """
    n, c, h, w = x.shape
    g = min(group, n) if n % min(group, n) == 0 else n
    y = x.view(g, n // g, c, h, w)
    y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()  # (N/g, C, H, W)
    y = y.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1).repeat(g, 1, h, w)  # (N, 1, H, W)
    return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """Logits [N] for (image [N, image_channels, H, W], pose [N, pose_channels, H, W]) pairs.

    Args:
        image_size: (H, W); each side a power of two times ``FINAL_SIZE`` (e.g. 64: 4 blocks).
        pose_channels: channels of the pose maps.
        channels: output channels of the blocks, from the full-resolution block down; as many
            as there are halvings from the image to 4x4.
        image_channels: 3 for RGB.
    """

    def __init__(
        self,
        image_size: tuple[int, int],
        pose_channels: int,
        channels: tuple[int, ...],
        image_channels: int = 3,
    ) -> None:
        super().__init__()
        h, w = image_size
        halvings = math.log2(min(h, w) / FINAL_SIZE)
        if (
            halvings < 1
            or halvings != int(halvings)
            or h % 2 ** int(halvings)
            or w % 2 ** int(halvings)
        ):
            raise ValueError(
                f"image_size={tuple(image_size)} (allowed: a shorter side of {FINAL_SIZE} times a "
                "power of two, which both sides divide by, e.g. 64x64 or 512x256)"
            )
        if len(channels) != int(halvings):
            raise ValueError(
                f"channels={list(channels)} has {len(channels)} entries (allowed: "
                f"{int(halvings)}, one per halving from {h}x{w} to the {FINAL_SIZE}-pixel side)"
            )
        self.image_size = (h, w)
        self.from_input = nn.Conv2d(image_channels + pose_channels, channels[0], 1)
        widths = (channels[0], *channels)
        self.blocks = nn.Sequential(
            *(DiscriminatorBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        )
        final = (h >> int(halvings)) * (w >> int(halvings))
        self.conv = nn.Conv2d(channels[-1] + 1, channels[-1], 3, padding=1)
        self.fc = nn.Linear(channels[-1] * final, channels[-1])
        self.out = nn.Linear(channels[-1], 1)

    def forward(self, image: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.from_input(torch.cat([image, pose], dim=1)), 0.2)
        x = minibatch_stddev(self.blocks(x))
        x = F.leaky_relu(self.conv(x), 0.2)
        return self.out(F.leaky_relu(self.fc(x.flatten(1)), 0.2)).squeeze(1)
