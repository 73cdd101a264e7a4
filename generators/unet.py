"""The attention-copying generator: two U-Nets joined by copying blocks.

Jetchev, Yildirim, Bracher, Vollgraf 2021, "Grid Partitioned Attention", arXiv 2107.03742,
section 3: a source branch encodes the source image with its pose, a target branch encodes the
target pose; at every decoder level a copying block lets the target features query the source
features and concatenates what it copies. Small levels copy with exact attention, large ones
with the method under test (GPA in the paper). RGB outputs of every target decoder level are
up-sampled and summed, as in StyleGAN2's skip generator (Karras et al. 2020).

Layout, with ``c[i]`` the channels of level ``i`` (0 = smallest) and ``a`` = ``attn_channels``:

- Encoders (one per branch, separate weights): a 3x3 block at full resolution to ``c[-1]``,
  then per smaller level a 2x2 average pool and a 3x3 block to ``c[i]``.
- Source decoder, level i: ``s_i = block(cat[up(s_{i-1}), e^src_i])`` (level 0: ``block(e^src_0)``).
- Target decoder, level i: ``t_i = block(cat[up(t'_{i-1}), e^tgt_i])``, then the copy
  ``t'_i = cat[t_i, attention(q(t_i), k(s_i), v(s_i))]`` with ``c[i] + a`` channels; the next
  level and this level's toRGB (a 1x1 conv) both read ``t'_i``.
- Image: ``rgb_0 = toRGB_0(t'_0)``, ``rgb_i = up(rgb_{i-1}) + toRGB_i(t'_i)``; the output is the
  full-resolution sum, linear (no squashing): train with L1 against targets in [0, 1] and clamp
  to [0, 1] for metrics. ``up`` is bilinear x2.

What is shared: nothing between the branches — each has its own encoder and decoder with the
same channel counts (the source encoder's first conv reads image + pose channels, the target's
only pose channels; the target decoder's convs read the extra ``a`` copied channels and it alone
has toRGB layers). The attention implementations hold no trainable parameters, so the parameter
count is the same for every method, ``none`` included.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnbench import registry
from attnbench.generators.blocks import (
    AttentionCopy,
    ConvBlock,
    coordinate_channels,
    fourier_features,
)
from attnbench.generators.config import EXACT_ATTENTION, POSE_CODE_BANDS, GeneratorConfig
from attnbench.registry import UnsupportedError


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 up-sampling of [N, C, h, w] maps."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class UNetEncoder(nn.Module):
    """Full-resolution block, then pool-and-block down to the smallest level."""

    def __init__(self, in_channels: int, config: GeneratorConfig):
        super().__init__()
        c, cfg = config.channels, config
        opts = (cfg.norm, cfg.activation, cfg.norm_groups)
        self.stem = ConvBlock(in_channels, c[-1], *opts)
        # down[j] makes level L-2-j from level L-1-j.
        self.down = nn.ModuleList(
            ConvBlock(c[i + 1], c[i], *opts) for i in reversed(range(config.levels - 1))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of every level, smallest first."""
        feats = [self.stem(x)]
        for block in self.down:
            feats.append(block(F.avg_pool2d(feats[-1], 2)))
        return feats[::-1]


class UNetDecoder(nn.Module):
    """Decoder levels: ``block(cat[up(previous), skip])``; ``carried`` extra channels per level.

    ``carried`` is the number of channels a level's output gains after the block (the copied
    channels of the target branch; 0 for the source branch); the next level's block reads them.
    """

    def __init__(self, config: GeneratorConfig, carried: int = 0):
        super().__init__()
        c, cfg = config.channels, config
        opts = (cfg.norm, cfg.activation, cfg.norm_groups)
        self.blocks = nn.ModuleList(
            ConvBlock(c[i] + (c[i - 1] + carried if i else 0), c[i], *opts)
            for i in range(config.levels)
        )

    def level(self, i: int, previous: torch.Tensor | None, skip: torch.Tensor) -> torch.Tensor:
        """Level ``i``'s features from the previous level's output and the encoder skip."""
        x = skip if previous is None else torch.cat([upsample2(previous), skip], dim=1)
        return self.blocks[i](x)


class CopyingGenerator(nn.Module):
    """Two U-Nets (source on [image, pose], target on the target pose) joined by copying blocks.

    Args:
        config: the architecture (see :class:`GeneratorConfig`, or ``preset(name)``).
        attention: registry name used at the levels whose longer side exceeds
            ``config.full_attn_max``; smaller levels use ``config.small_attention``
            (``full.sdpa`` unless the config asks for no copying at all). ``"none"`` makes the
            large levels copy zeros while keeping every layer (and the parameter count).
        attention_params: parameters for ``attention``; GPA names get
            ``phase1_res=config.gpa_phase1_res`` unless ``downsample`` or ``phase1_res`` is given.

    Raises:
        ValueError: unknown implementation (the registry's message, with "did you mean") or
            bad parameters.
    """

    def __init__(
        self,
        config: GeneratorConfig,
        attention: str = EXACT_ATTENTION,
        attention_params: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.config = config
        self.attention = attention
        self.attention_params = config.large_level_params(attention, attention_params)
        registry.create(attention, **self.attention_params)  # validate even with no large level
        c, a, p = config.channels, config.attn_channels, config.pose_channels
        extra = 2 if config.coords == "inputs" else 0
        self.source_encoder = UNetEncoder(config.image_channels + p + extra, config)
        self.target_encoder = UNetEncoder(p + extra, config)
        self.source_decoder = UNetDecoder(config, carried=0)
        self.target_decoder = UNetDecoder(config, carried=a)
        copies = []
        for i, size in enumerate(config.level_sizes):
            if config.uses_exact_attention(i):
                impl = registry.create(config.small_attention)
            else:
                impl = registry.create(attention, **self.attention_params)
            copies.append(
                AttentionCopy(
                    c[i],
                    c[i],
                    a,
                    impl,
                    size,
                    code_channels=config.code_channels,
                    learn_temperature=config.learn_temperature,
                    temperature_init=config.temperature_init,
                    affinity=config.affinity,
                    zero_feature_init=config.copy_init != "default",
                    value_image_channels=(
                        config.image_channels if config.copy_init in ("copy", "match") else 0
                    ),
                    match_codes=config.copy_init == "match",
                )
            )
        self.copies = nn.ModuleList(copies)
        self.to_rgb = nn.ModuleList(
            nn.Conv2d(c[i] + a, config.image_channels, 1) for i in range(config.levels)
        )
        if config.copy_init in ("copy", "match"):  # each level adds its copy, 1 / levels each
            n = config.image_channels
            with torch.no_grad():
                for i, to_rgb in enumerate(self.to_rgb):
                    to_rgb.weight[:, c[i] : c[i] + n, 0, 0] = torch.eye(n) / config.levels

    def _check_inputs(self, source_image, source_pose, target_pose) -> None:
        h, w = self.config.image_size
        expected = {
            "source_image": self.config.image_channels,
            "source_pose": self.config.pose_channels,
            "target_pose": self.config.pose_channels,
        }
        batch = source_image.shape[0] if source_image.dim() == 4 else None
        for name, t in zip(expected, (source_image, source_pose, target_pose)):
            want = (batch, expected[name], h, w)
            if t.dim() != 4 or tuple(t.shape) != want:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)} (expected [N, {expected[name]}, {h}, {w}]"
                    f" with the same N for all inputs)"
                )

    def forward(
        self, source_image: torch.Tensor, source_pose: torch.Tensor, target_pose: torch.Tensor
    ) -> torch.Tensor:
        """The source image's content redrawn in the target pose.

        Args:
            source_image: [N, image_channels, H, W], values in [0, 1].
            source_pose: [N, pose_channels, H, W] pose of the source image.
            target_pose: [N, pose_channels, H, W] pose to draw.

        Returns:
            [N, image_channels, H, W], linear (clamp to [0, 1] for metrics).
        """
        self._check_inputs(source_image, source_pose, target_pose)
        source_in = torch.cat([source_image, source_pose], dim=1)
        target_in = target_pose
        if self.config.coords == "inputs":
            source_in = torch.cat([source_in, coordinate_channels(source_in)], dim=1)
            target_in = torch.cat([target_in, coordinate_channels(target_in)], dim=1)
        src_skips = self.source_encoder(source_in)
        tgt_skips = self.target_encoder(target_in)
        s = t = rgb = None
        for i, copy in enumerate(self.copies):
            s = self.source_decoder.level(i, s, src_skips[i])  # (N, c[i], h, w)
            t = self.target_decoder.level(i, t, tgt_skips[i])  # (N, c[i], h, w)
            codes = self.codes(t, s, source_pose, target_pose)
            image = None
            if copy.value_image_channels:
                image = F.adaptive_avg_pool2d(source_image, tuple(s.shape[-2:]))
            t = copy(t, s, codes, image)  # (N, c[i] + a, h, w)
            level_rgb = self.to_rgb[i](t)  # (N, image_channels, h, w)
            rgb = level_rgb if rgb is None else upsample2(rgb) + level_rgb
        return rgb

    def codes(
        self,
        target: torch.Tensor,
        source: torch.Tensor,
        source_pose: torch.Tensor,
        target_pose: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The positional codes a level's copying block reads (``config.coords``), or None."""
        if self.config.coords == "qk":
            return coordinate_channels(target), coordinate_channels(source)
        if self.config.coords != "pose":
            return None
        size = tuple(target.shape[-2:])
        return tuple(
            fourier_features(F.adaptive_avg_pool2d(pose[:, -2:], size), POSE_CODE_BANDS)
            for pose in (target_pose, source_pose)
        )

    def attention_blocks(self) -> list[tuple[str, AttentionCopy]]:
        """The copying blocks, smallest level first, named ``level{i}_{h}x{w}``."""
        return [
            (f"level{i}_{block.map_size[0]}x{block.map_size[1]}", block)
            for i, block in enumerate(self.copies)
        ]

    def attention_labels(self) -> dict[str, str]:
        """Each block's implementation label, map-dependent parameters resolved."""
        return {name: block.label for name, block in self.attention_blocks()}

    def attention_block_inputs(
        self,
        batch: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Random (target, source, codes, image) inputs for every block's ``attention_call``.

        Measure the paper's "attention memory" (all copying blocks, batch 1, forward and
        backward) by running ``block.attention_call(*inputs[name])`` and backward for each
        block. The shapes come from the config, no forward pass is needed.
        """
        if device is None or dtype is None:
            ref = next(self.parameters())
            device = ref.device if device is None else device
            dtype = ref.dtype if dtype is None else dtype
        inputs = {}
        for name, block in self.attention_blocks():
            target, source = (
                torch.randn(shape, device=device, dtype=dtype, generator=generator)
                for shape in block.feature_shapes(batch)
            )
            codes = None
            if block.code_channels:
                codes = tuple(
                    torch.randn(
                        x.shape[0], block.code_channels, *x.shape[2:], generator=generator
                    ).to(device=device, dtype=dtype)
                    for x in (target, source)
                )
            image = None
            if block.value_image_channels:
                image = torch.rand(
                    source.shape[0],
                    block.value_image_channels,
                    *source.shape[2:],
                    generator=generator,
                ).to(device=device, dtype=dtype)
            inputs[name] = (target, source, codes, image)
        return inputs

    def unsupported_reasons(
        self, device: str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 1
    ) -> list[str]:
        """Why some block's attention cannot run training on ``device`` ([] if all can)."""
        reasons = []
        for name, block in self.attention_blocks():
            spec = dataclasses.replace(block.spec(batch, dtype, device), requires_grad=True)
            reasons += [
                f"{name} ({block.label}): {r}" for r in block.attention.unsupported_reasons(spec)
            ]
        return reasons

    def check(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        """Raise :class:`UnsupportedError` naming every block that cannot train on ``device``."""
        reasons = self.unsupported_reasons(device, dtype)
        if reasons:
            raise UnsupportedError(f"CopyingGenerator({self.attention})", reasons)

    def n_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per part (encoders, decoders, copying blocks, toRGB)."""
        return {
            name: sum(p.numel() for p in module.parameters() if p.requires_grad)
            for name, module in self.named_children()
        }
