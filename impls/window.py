"""Swin window attention (Liu et al., "Swin Transformer", ICCV 2021), registered as
``window.torch``.

The map is cut into ``window`` x ``window`` windows whose boundaries lie at s, s + w, s + 2w, …
along both axes (s = ``shift``; s = 0: at 0, w, 2w, …). With a shift, the strips [0, s) and
[L - w + s, L) at the edges are windows of their own (no wrap-around). Every query attends exactly
to the keys of its own window. Query and key maps have the same size, each side a multiple of w.

Computed as Swin computes it: the map is rolled by -s so that the windows become aligned w x w
tiles, the tiles form a batch for ``scaled_dot_product_attention``, and a region mask keeps the
pieces of a tile that came from different windows apart (the tiles of the last row and column
hold up to four); the result is rolled back. Pure PyTorch: CPU and CUDA, forward and backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnbench.impls.common import SCALE, softmax_scale
from attnbench.registry import Attention, Param, register
from attnbench.spec import HW, AttentionSpec


def window_ids(length: int, window: int, shift: int, device=None) -> torch.Tensor:
    """Window index along one axis of every position (boundaries at shift + multiples of w)."""
    return torch.div(
        torch.arange(length, device=device) + window - shift, window, rounding_mode="floor"
    )


def window_sizes(length: int, window: int, shift: int) -> list[int]:
    """Sizes of the windows along one axis: [s, w, …, w, w - s], or all w without a shift."""
    if shift == 0:
        return [window] * (length // window)
    return [shift] + [window] * (length // window - 1) + [window - shift]


def window_mask(hw: HW, window: int, shift: int, device=None) -> torch.Tensor:
    """[N, N] bool: True where the query (row) and the key (column) share a window."""
    h, w = hw
    rows = window_ids(h, window, shift, device)
    cols = window_ids(w, window, shift, device)
    ids = (rows[:, None] * (w + 1) + cols[None, :]).reshape(-1)
    return ids[:, None] == ids[None, :]


def to_windows(x: torch.Tensor, hw: HW, window: int) -> torch.Tensor:
    """[B, H, h*w, C] -> [B*H, windows, w², C] (aligned tiles, row-major within and across)."""
    b, heads, n, c = x.shape
    h, w = hw
    tiles = x.reshape(b * heads, h // window, window, w // window, window, c)
    return tiles.permute(0, 1, 3, 2, 4, 5).reshape(b * heads, -1, window * window, c)


def from_windows(x: torch.Tensor, hw: HW, window: int, batch: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`: [B*H, windows, w², C] -> [B, H, h*w, C]."""
    h, w = hw
    c = x.shape[-1]
    tiles = x.reshape(-1, h // window, w // window, window, window, c)
    return tiles.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, h * w, c)


def region_mask(hw: HW, window: int, shift: int, device=None) -> torch.Tensor:
    """[windows, w², w²] bool for the tiles of the map rolled by -shift: same original window."""
    h, w = hw
    rows = window_ids(h, window, shift, device).roll(-shift)  # ids at rolled positions
    cols = window_ids(w, window, shift, device).roll(-shift)
    ids = (rows[:, None] * (w + 1) + cols[None, :]).reshape(1, 1, h * w, 1).to(torch.float32)
    tiles = to_windows(ids, hw, window)[0, :, :, 0]  # (windows, w²)
    return tiles[:, :, None] == tiles[:, None, :]


@register("window.torch")
class WindowAttention(Attention):
    """(Shifted) window attention: windows as a batch through SDPA, a region mask when shifted."""

    PARAMS = {
        "window": Param(8, int, low=1, doc="w: side of a window (map sides are multiples of w)"),
        "shift": Param(0, int, low=0, doc="s: window boundaries at s, s + w, ... (0 <= s < w)"),
        "scale": SCALE,
    }
    NEEDS_SPATIAL = True

    def __init__(self, **params: Any):
        super().__init__(**params)
        window, shift = self.params["window"], self.params["shift"]
        if shift >= window:
            raise ValueError(
                f"{self.name}: parameter shift={shift} is not allowed "
                f"(allowed: 0 <= shift < window={window})"
            )

    def unsupported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if spec.q_hw is None or spec.kv_hw is None:
            return reasons
        if tuple(spec.q_hw) != tuple(spec.kv_hw):
            (hq, wq), (hk, wk) = spec.q_hw, spec.kv_hw
            return reasons + [
                f"q map {hq}x{wq} differs from kv map {hk}x{wk} "
                "(allowed: maps of the same size; windows pair query and key positions)"
            ]
        window = self.params["window"]
        for what, side in (("height", spec.q_hw[0]), ("width", spec.q_hw[1])):
            if side % window:
                reasons.append(
                    f"map {what} {side} is not a multiple of window={window} "
                    f"(allowed: map sides that are multiples of {window})"
                )
        return reasons

    @property
    def label(self) -> str:
        """``window.torch(window=8)``; ``shift=`` and ``scale=`` when set."""
        p = self.params
        parts = [f"window={p['window']}"]
        if p["shift"]:
            parts.append(f"shift={p['shift']}")
        if p["scale"] is not None:
            parts.append(f"scale={p['scale']:g}")
        return f"{self.name}({','.join(parts)})"

    def forward(self, q, k, v, spec):
        window, shift = self.params["window"], self.params["shift"]
        hw = spec.q_hw
        scale = softmax_scale(self.params["scale"], spec.channels)

        def tiles(x):
            if shift:
                x = x.reshape(*x.shape[:2], *hw, x.shape[-1]).roll((-shift, -shift), dims=(2, 3))
            return to_windows(x.reshape(*x.shape[:2], -1, x.shape[-1]), hw, window)

        mask = region_mask(hw, window, shift, q.device) if shift else None
        out = F.scaled_dot_product_attention(
            tiles(q), tiles(k), tiles(v), attn_mask=mask, scale=scale
        )  # (B*H, windows, w², Cv)
        out = from_windows(out, hw, window, spec.batch)  # (B, H, N, Cv), rolled
        if shift:
            out = out.reshape(*out.shape[:2], *hw, out.shape[-1]).roll((shift, shift), dims=(2, 3))
        return out.reshape(spec.batch, spec.heads, spec.q_tokens, spec.v_channels)

    def kept_keys(self, q, k, spec):
        mask = window_mask(spec.q_hw, self.params["window"], self.params["shift"], q.device)
        return mask.expand(spec.batch, spec.heads, -1, -1)  # (B, H, N, N)

    def dense_weights(self, q, k, spec):
        # Softmax over each query's window, zeros elsewhere.
        mask = self.kept_keys(q, k, spec)
        scale = softmax_scale(self.params["scale"], spec.channels)
        scores = scale * torch.matmul(q, k.transpose(-2, -1))  # (B, H, N, N)
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)

    def flops(self, spec: AttentionSpec, backward: bool = False) -> int:
        # Useful FLOPs: each query against the keys of its own window, 2 (C + Cv) per pair; the
        # pairs of a window of a x b pixels are (a b)², so the map's are (sum a²)(sum b²) over
        # the window sizes of the two axes. The masked pairs of shifted tiles are not counted.
        # Backward: two matmuls per forward matmul, fwd+bwd = 3 x fwd.
        window, shift = self.params["window"], self.params["shift"]
        h, w = spec.q_hw
        pairs = sum(a * a for a in window_sizes(h, window, shift)) * sum(
            b * b for b in window_sizes(w, window, shift)
        )
        fwd = spec.batch * spec.heads * pairs * 2 * (spec.channels + spec.v_channels)
        return 3 * fwd if backward else fwd

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        # Tiled (and, with a shift, rolled) copies of q, k, v; the output in tiles, un-tiled and
        # rolled back; one float32 log-sum-exp per query. With a shift, the region mask and the
        # masked path's scores and probabilities (w² per query). Backward adds the gradients of
        # the tiled copies and of the inputs.
        window, shift = self.params["window"], self.params["shift"]
        bh, n = spec.batch * spec.heads, spec.q_tokens
        copies = (2 if shift else 1) * spec.input_bytes
        outputs = (3 if shift else 2) * spec.output_bytes
        lse = bh * n * 4
        masked = 0
        if shift:
            masked = n * window * window + 2 * bh * n * window * window * spec.element_size
        grads = 2 * spec.input_bytes if backward else 0
        return copies + outputs + lse + masked + grads

    def exact_params(self, spec: AttentionSpec) -> dict[str, Any] | None:
        # One window covering a square map is exact attention.
        if spec.q_hw is None or tuple(spec.q_hw) != tuple(spec.kv_hw or ()):
            return None
        h, w = spec.q_hw
        return {"window": h, "shift": 0} if h == w else None
