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
import torch.nn.functional as F
from torch import nn

from attnbench.data.affine import coordinate_map
from attnbench.impls.gpa.pytorch import euclid_augment
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


def fourier_features(coords: torch.Tensor, bands: int) -> torch.Tensor:
    """[N, 2, h, w] coordinates in (-1, 1) -> [N, 4 bands, h, w]: sin and cos of 2^b π x, y.

    The dot product of two such codes is a sum of cosines of the coordinate differences, peaked
    where the coordinates agree (the finest band's period is 2^(2 - bands) of the map's side).
    """
    freqs = math.pi * 2.0 ** torch.arange(bands, device=coords.device, dtype=coords.dtype)
    angles = coords[:, :, None] * freqs[:, None, None]  # (N, 2, bands, h, w)
    return torch.cat([angles.sin(), angles.cos()], dim=1).flatten(1, 2)  # (N, 4 bands, h, w)


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """[N, 2, h, w]: the normalised (x, y) of every pixel centre of x's map, in (-1, 1)."""
    grid = coordinate_map(tuple(x.shape[-2:])).to(device=x.device, dtype=x.dtype)
    return grid.expand(x.shape[0], -1, -1, -1)


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
    registry's call expects. With ``code_channels`` the query and key convolutions also read
    positional codes of the target and source pixels (``codes``: the pixels' own coordinates, or
    Fourier features of where the pose says they lie); the queries are multiplied by a
    temperature, trainable with
    ``learn_temperature`` (a sharper or softer softmax for every implementation alike).
    ``forward`` returns ``cat([target, attention], dim=1)``, with
    ``target_channels + attn_channels`` channels whatever the implementation, so every method
    trains the same architecture. The implementation holds no trainable parameters in this
    project; if one is an ``nn.Module`` it is registered as a submodule so that its parameters
    are counted and trained.

    Attributes:
        attention: the registry implementation, called as ``attention(q, k, v, q_hw, kv_hw)``.
        map_size: (h, w) of the target and source maps at this level.
        last_shapes: shapes of (q, k, v) of the last call, e.g. ``[N, 1, h*w, C]``; None
            before the first call.
        record: when True, every call keeps its (q, k), detached, in ``recorded`` (for the
            attention weights: ``attention.weights(*recorded, map_size, map_size)``).
    """

    def __init__(
        self,
        target_channels: int,
        source_channels: int,
        attn_channels: int,
        attention: Attention,
        map_size: tuple[int, int],
        code_channels: int = 0,
        learn_temperature: bool = False,
        temperature_init: float = 1.0,
        affinity: str = "dot",
        zero_feature_init: bool = False,
        value_image_channels: int = 0,
        match_codes: bool = False,
    ):
        super().__init__()
        extra = code_channels
        # euclid appends one channel to q and k: the convolutions make one fewer, so that the
        # implementation sees attn_channels (a width its kernels are fast at: 32, not 33).
        qk = attn_channels - (1 if affinity == "euclid" else 0)
        self.query = nn.Conv2d(target_channels + extra, qk, 1)
        self.key = nn.Conv2d(source_channels + extra, qk, 1)
        self.value = nn.Conv2d(source_channels + value_image_channels, attn_channels, 1)
        self.value_image_channels = value_image_channels
        with torch.no_grad():
            if zero_feature_init:  # the codes alone set the first attention
                self.query.weight[:, :target_channels].zero_()
                self.key.weight[:, :source_channels].zero_()
            if match_codes:  # q and k start as the codes: each query matches its coded key
                if code_channels > qk:
                    raise ValueError(
                        f"match_codes needs code_channels={code_channels} <= the {qk} channels "
                        "of q and k"
                    )
                for conv, offset in ((self.query, target_channels), (self.key, source_channels)):
                    conv.weight.zero_()
                    conv.bias.zero_()
                    conv.weight[:code_channels, offset:, 0, 0] = torch.eye(code_channels)
            if value_image_channels:  # the first copied channels start as the source image
                n = value_image_channels
                self.value.weight[:n].zero_()
                self.value.weight[:n, source_channels:, 0, 0] = torch.eye(n)
                self.value.bias[:n].zero_()
        self.code_channels = code_channels
        self.euclid = affinity == "euclid"
        self.cosine = affinity == "cosine"
        log_t = torch.tensor(math.log(temperature_init))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.attention = attention
        self.target_channels = target_channels
        self.source_channels = source_channels
        self.attn_channels = attn_channels
        self.map_size = tuple(map_size)
        self.last_shapes: tuple[torch.Size, torch.Size, torch.Size] | None = None
        self.record = False
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None

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

    def attention_call(
        self,
        target: torch.Tensor,
        source: torch.Tensor,
        codes: tuple[torch.Tensor, torch.Tensor] | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The 1x1 convolutions and the attention alone: -> [N, attn_channels, h, w].

        Args:
            target: target-branch decoder features [N, target_channels, h, w] (queries).
            source: source-branch decoder features [N, source_channels, hs, ws] (keys, values).
            codes: (target code [N, code_channels, h, w], source code [N, code_channels, hs,
                ws]) read by the query and key convolutions; required when code_channels > 0.
            image: the source image at the source map's size [N, value_image_channels, hs,
                ws], read by the value convolution; required when value_image_channels > 0.
        """
        n, _, h, w = target.shape
        hs, ws = source.shape[-2:]
        q_in, k_in = target, source
        if self.code_channels:
            if codes is None:
                raise ValueError(
                    f"this block reads {self.code_channels} code channels: pass codes="
                    "(target code, source code)"
                )
            q_in = torch.cat([target, codes[0]], dim=1)
            k_in = torch.cat([source, codes[1]], dim=1)
        q = self._tokens(self.query(q_in))  # (N, 1, h*w, C)
        k = self._tokens(self.key(k_in))  # (N, 1, hs*ws, C)
        if self.cosine:  # unit q and k: scores T cos(q, k) after the implementation's 1/sqrt(C)
            q = F.normalize(q, dim=-1) * math.sqrt(self.attn_channels)
            k = F.normalize(k, dim=-1)
        if self.euclid:  # q*.k* = -|q - k|² + |q|² (constant along a softmax row): (., C)
            q, k = euclid_augment(q, k)
        q = q * self.log_temperature.exp()
        v_in = source
        if self.value_image_channels:
            if image is None:
                raise ValueError(
                    f"this block's values read the source image ({self.value_image_channels} "
                    "channels): pass image="
                )
            v_in = torch.cat([source, image], dim=1)
        v = self._tokens(self.value(v_in))  # (N, 1, hs*ws, C)
        self.last_shapes = (q.shape, k.shape, v.shape)
        if self.record:
            self.recorded = (q.detach(), k.detach())
        out = self.attention(q, k, v, q_hw=(h, w), kv_hw=(hs, ws))  # (N, 1, h*w, C)
        return out.squeeze(1).transpose(1, 2).reshape(n, self.attn_channels, h, w)

    def forward(
        self,
        target: torch.Tensor,
        source: torch.Tensor,
        codes: tuple[torch.Tensor, torch.Tensor] | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """cat([target, attention], dim=1): [N, target_channels + attn_channels, h, w]."""
        return torch.cat([target, self.attention_call(target, source, codes, image)], dim=1)

    def extra_repr(self) -> str:
        h, w = self.map_size
        return f"map={h}x{w}, attention={self.label}"
