"""Layers of the attention-copying generator (Jetchev et al. 2021, arXiv 2107.03742).

- :class:`ConvBlock`: 3x3 convolution, normalisation, activation.
- :class:`AttentionCopy`: the paper's copying block. Three trainable 1x1 convolutions make the
  query from the target branch's decoder features and the key and value from the source
  branch's decoder features; one attention head copies values from the source map to every
  target pixel, and the result is concatenated to the target features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnbench.registry import Attention
from attnbench.spec import AttentionSpec


def make_norm(kind: str, channels: int, max_groups: int) -> nn.Module:
    """A normalisation layer: "group", "instance" (one group per channel) or "none"."""
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, max_groups), channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r} is not allowed (allowed: group, instance, none)")


def make_activation(kind: str) -> nn.Module:
    """An activation: "leaky_relu" (slope 0.2) or "silu"."""
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.2)
    if kind == "silu":
        return nn.SiLU()
    raise ValueError(f"activation={kind!r} is not allowed (allowed: leaky_relu, silu)")


class ConvBlock(nn.Sequential):
    """3x3 convolution (same size), normalisation, activation."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: str, activation: str, max_groups: int
    ):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none"),
            make_norm(norm, out_channels, max_groups),
            make_activation(activation),
        )


class AttentionCopy(nn.Module):
    """Copying block: target features attend to source features; output concatenated.

    ``q = conv1x1(target)``, ``k = conv1x1(source)``, ``v = conv1x1(source)``, each with
    ``attn_channels`` channels and one head; tokens are the pixels in row-major order, as the
    registry's call expects. ``forward`` returns ``cat([target, attention], dim=1)``, with
    ``target_channels + attn_channels`` channels whatever the implementation, so every method
    trains the same architecture. The implementation holds no trainable parameters in this
    project; if one is an ``nn.Module`` it is registered as a submodule so that its parameters
    are counted and trained.

    Attributes:
        attention: the registry implementation, called as ``attention(q, k, v, q_hw, kv_hw)``.
        map_size: (h, w) of the target and source maps at this level.
        last_shapes: shapes of (q, k, v) of the last call, e.g. ``[N, 1, h*w, C]``; None
            before the first call.
    """

    def __init__(
        self,
        target_channels: int,
        source_channels: int,
        attn_channels: int,
        attention: Attention,
        map_size: tuple[int, int],
    ):
        super().__init__()
        self.query = nn.Conv2d(target_channels, attn_channels, 1)
        self.key = nn.Conv2d(source_channels, attn_channels, 1)
        self.value = nn.Conv2d(source_channels, attn_channels, 1)
        self.attention = attention
        self.target_channels = target_channels
        self.source_channels = source_channels
        self.attn_channels = attn_channels
        self.map_size = tuple(map_size)
        self.last_shapes: tuple[torch.Size, torch.Size, torch.Size] | None = None

    @property
    def attention_name(self) -> str:
        """Registry name of the implementation (``full.sdpa``, ``gpa.torch``, ``none`` ...)."""
        return self.attention.name

    def spec(self, batch: int = 1, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        """The :class:`AttentionSpec` of this block's attention call for a batch size."""
        h, w = self.map_size
        return AttentionSpec(
            batch=batch,
            heads=1,
            q_tokens=h * w,
            kv_tokens=h * w,
            channels=self.attn_channels,
            v_channels=self.attn_channels,
            q_hw=(h, w),
            kv_hw=(h, w),
            dtype=dtype,
            device=device,
        )

    @property
    def label(self) -> str:
        """Implementation label with map-dependent parameters resolved (``gpa.torch(d=2,...)``)."""
        return self.attention.label_for(self.spec())

    def qkv_shapes(self, batch: int = 1) -> tuple[tuple[int, ...], ...]:
        """Shapes of q, k and v given to the implementation: [batch, 1, h*w, attn_channels]."""
        h, w = self.map_size
        shape = (batch, 1, h * w, self.attn_channels)
        return shape, shape, shape

    def feature_shapes(self, batch: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the (target, source) feature maps this block takes."""
        h, w = self.map_size
        return (batch, self.target_channels, h, w), (batch, self.source_channels, h, w)

    @staticmethod
    def _tokens(x: torch.Tensor) -> torch.Tensor:
        # (N, C, h, w) -> (N, 1, h*w, C): one head, pixels in row-major order.
        return x.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()

    def attention_call(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """The 1x1 convolutions and the attention alone: -> [N, attn_channels, h, w].

        Args:
            target: target-branch decoder features [N, target_channels, h, w] (queries).
            source: source-branch decoder features [N, source_channels, hs, ws] (keys, values).
        """
        n, _, h, w = target.shape
        hs, ws = source.shape[-2:]
        q = self._tokens(self.query(target))  # (N, 1, h*w, C)
        k = self._tokens(self.key(source))  # (N, 1, hs*ws, C)
        v = self._tokens(self.value(source))  # (N, 1, hs*ws, C)
        self.last_shapes = (q.shape, k.shape, v.shape)
        out = self.attention(q, k, v, q_hw=(h, w), kv_hw=(hs, ws))  # (N, 1, h*w, C)
        return out.squeeze(1).transpose(1, 2).reshape(n, self.attn_channels, h, w)

    def forward(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """cat([target, attention], dim=1): [N, target_channels + attn_channels, h, w]."""
        return torch.cat([target, self.attention_call(target, source)], dim=1)

    def extra_repr(self) -> str:
        h, w = self.map_size
        return f"map={h}x{w}, attention={self.label}"
