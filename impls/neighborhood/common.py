"""The neighbourhood rule, the parameters and the checks shared by the neighbourhood backends.

2-D neighbourhood attention (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023;
dilation: Hassani & Shi, "Dilated Neighborhood Attention Transformer", 2022), with NATTEN's
semantics.

Every query attends to exactly ``kernel`` x ``kernel`` keys of the same-sized key map. Along one
axis of length L, with kernel k (odd) and dilation δ:

- the query at position i belongs to the sub-grid g = i mod δ, the positions g, g + δ, g + 2δ, …
  (L_g = ceil((L - g) / δ) of them); i is position p = i // δ of its sub-grid;
- on its sub-grid it takes the k consecutive positions starting at
  start = clamp(p - k // 2, 0, L_g - k): centred on p where the window fits, shifted inward (never
  shrunk) at the borders;
- so its keys along that axis are g + δ (start + t), t = 0 … k - 1.

The 2-D neighbourhood is the product of the row and column rules. ``kernel · dilation`` must not
exceed either side, so every sub-grid holds at least ``kernel`` positions. Query and key maps
have the same size (self-attention geometry; q and k may come from different maps of that size).
"""

from __future__ import annotations

from typing import Any

import torch

from attnbench.impls.common import SCALE, softmax_scale
from attnbench.registry import Attention, Param
from attnbench.spec import HW, AttentionSpec


def window_starts(length: int, kernel: int, dilation: int, device=None) -> torch.Tensor:
    """First key position along one axis for every query position: [length] int64."""
    i = torch.arange(length, device=device)
    group = i % dilation
    group_len = torch.div(length - group + dilation - 1, dilation, rounding_mode="floor")
    start = (torch.div(i, dilation, rounding_mode="floor") - kernel // 2).clamp(min=0)
    start = torch.minimum(start, group_len - kernel)
    return group + dilation * start


def neighbour_positions(length: int, kernel: int, dilation: int, device=None) -> torch.Tensor:
    """Key positions along one axis for every query position: [length, kernel] int64."""
    starts = window_starts(length, kernel, dilation, device)
    return starts[:, None] + dilation * torch.arange(kernel, device=device)


def neighbour_tokens(hw: HW, kernel: int, dilation: int, device=None) -> torch.Tensor:
    """Key tokens of every query of the map: [N, kernel²] int64 (row-major tokens)."""
    h, w = hw
    key_rows = neighbour_positions(h, kernel, dilation, device)  # (h, k)
    key_cols = neighbour_positions(w, kernel, dilation, device)  # (w, k)
    tokens = key_rows[:, None, :, None] * w + key_cols[None, :, None, :]  # (h, w, k, k)
    return tokens.reshape(h * w, kernel * kernel)


def neighbourhood_mask(hw: HW, kernel: int, dilation: int, device=None) -> torch.Tensor:
    """[N, N] bool: True where the query (row) attends to the key (column)."""
    n = hw[0] * hw[1]
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    return mask.scatter_(1, neighbour_tokens(hw, kernel, dilation, device), True)


def geometry_problems(q_hw: HW, kv_hw: HW, kernel: int, dilation: int) -> list[str]:
    """Why a neighbourhood of this kernel and dilation does not fit these maps ([] if it does)."""
    if tuple(q_hw) != tuple(kv_hw):
        return [
            f"q map {q_hw[0]}x{q_hw[1]} differs from kv map {kv_hw[0]}x{kv_hw[1]} (allowed: "
            "maps of the same size; neighbourhood attention maps each query to its own position)"
        ]
    reach = kernel * dilation
    return [
        f"kernel*dilation = {kernel}*{dilation} = {reach} exceeds the map {what} {side} "
        f"(allowed: kernel*dilation <= {min(q_hw)}, the map's shorter side)"
        for what, side in (("height", q_hw[0]), ("width", q_hw[1]))
        if reach > side
    ]


class NeighbourhoodBase(Attention):
    """Parameters, checks, cost and labels common to the neighbourhood backends."""

    PARAMS = {
        "kernel": Param(7, int, low=1, doc="side of the key window, odd (NATTEN's kernel_size)"),
        "dilation": Param(1, int, low=1, doc="δ: keys every δ pixels (kernel*δ <= map sides)"),
        "scale": SCALE,
    }
    NEEDS_SPATIAL = True

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.params["kernel"] % 2 == 0:
            raise ValueError(
                f"{self.name}: parameter kernel={self.params['kernel']} is not allowed "
                "(allowed: an odd integer >= 1)"
            )

    def unsupported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if spec.q_hw is not None and spec.kv_hw is not None:
            p = self.params
            reasons += geometry_problems(spec.q_hw, spec.kv_hw, p["kernel"], p["dilation"])
        return reasons

    @property
    def label(self) -> str:
        """``neighborhood.torch(kernel=7)``; ``dilation=`` and ``scale=`` when set."""
        p = self.params
        parts = [f"kernel={p['kernel']}"]
        if p["dilation"] != 1:
            parts.append(f"dilation={p['dilation']}")
        if p["scale"] is not None:
            parts.append(f"scale={p['scale']:g}")
        return f"{self.name}({','.join(parts)})"

    def kept_keys(self, q, k, spec):
        p = self.params
        mask = neighbourhood_mask(spec.q_hw, p["kernel"], p["dilation"], q.device)  # (N, N)
        return mask.expand(spec.batch, spec.heads, -1, -1)

    def dense_weights(self, q, k, spec):
        # Softmax over each query's kernel² keys, zeros elsewhere.
        mask = self.kept_keys(q, k, spec)
        scale = softmax_scale(self.params["scale"], spec.channels)
        scores = scale * torch.matmul(q, k.transpose(-2, -1))  # (B, H, N, N)
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)

    def flops(self, spec: AttentionSpec, backward: bool = False) -> int:
        # Every query against kernel² keys: 2 k² (C + Cv) per query; backward as exact attention's
        # (two matmuls per forward matmul), so fwd+bwd = 3 x fwd. Recomputation is not counted.
        keys = self.params["kernel"] ** 2
        fwd = spec.batch * spec.heads * spec.q_tokens * 2 * keys * (spec.channels + spec.v_channels)
        return 3 * fwd if backward else fwd

    def exact_params(self, spec: AttentionSpec) -> dict[str, Any] | None:
        # A kernel as large as a square map with an odd side covers every key.
        if spec.q_hw is None or tuple(spec.q_hw) != tuple(spec.kv_hw or ()):
            return None
        h, w = spec.q_hw
        return {"kernel": h, "dilation": 1} if h == w and h % 2 else None
