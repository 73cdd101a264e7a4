"""``neighborhood.flex``: neighbourhood attention as compiled FlexAttention (rule and parameters
in :mod:`attnbench.impls.neighborhood.common`).

FlexAttention with a block mask: the key blocks any query of a block can reach are found from
the neighbourhood rule, and the rule itself is the mask function on those blocks. Compiled
(``dynamic=False``), one compiled function and block mask per shape. On CPU the compiled kernel
is forward-only; on CUDA forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from attnbench.impls.common import RECOMPILE_LIMIT, softmax_scale
from attnbench.impls.neighborhood.common import (
    NeighbourhoodBase,
    neighbour_positions,
    window_starts,
)
from attnbench.registry import register
from attnbench.spec import HW, AttentionSpec

FLEX_BLOCK = 128  # FlexAttention query and key block size (tokens)


def flex_block_mask(hw: HW, kernel: int, dilation: int, device, backward: bool):
    """The FlexAttention BlockMask of a neighbourhood on an h x w map (row-major tokens).

    A key block is visited by a query block when some query of it has a key row whose column
    span (first to last neighbour column) reaches into the key block; the neighbourhood rule
    is the mask function inside visited blocks.
    """
    from torch.nn.attention.flex_attention import BlockMask

    h, w = hw
    n, block = h * w, FLEX_BLOCK
    blocks = -(-n // block)
    key_rows = neighbour_positions(h, kernel, dilation, device)  # (h, k)
    col_first = window_starts(w, kernel, dilation, device)  # (w,)
    row_base = key_rows[:, None, :] * w  # (h, 1, k)
    col_last = col_first + (kernel - 1) * dilation
    # (h, w, k): the key blocks at the two ends of each key row's column span
    first = torch.div(row_base + col_first[None, :, None], block, rounding_mode="floor")
    last = torch.div(row_base + col_last[None, :, None], block, rounding_mode="floor")
    q_block = torch.div(torch.arange(n, device=device), block, rounding_mode="floor")
    q_block = q_block.view(h, w, 1).expand_as(first).reshape(-1)
    ones = torch.ones(q_block.numel(), dtype=torch.int32, device=device)
    edges = torch.zeros(blocks, blocks + 1, dtype=torch.int32, device=device)
    edges.index_put_((q_block, first.reshape(-1)), ones, accumulate=True)
    edges.index_put_((q_block, last.reshape(-1) + 1), -ones, accumulate=True)
    visited = edges.cumsum(dim=-1)[:, :blocks] > 0  # (q blocks, kv blocks)
    counts = visited.sum(dim=-1).to(torch.int32)
    order = torch.argsort((~visited).to(torch.int8), dim=-1, stable=True).to(torch.int32)

    def mask_mod(b, head, q_idx, kv_idx):
        return _inside(q_idx // w, kv_idx // w, h) & _inside(q_idx % w, kv_idx % w, w)

    def _inside(i, key, length):
        group = i % dilation
        start = torch.clamp(i // dilation - kernel // 2, min=0)
        start = torch.minimum(start, (length - group + dilation - 1) // dilation - kernel)
        pos = key // dilation
        return (key % dilation == group) & (pos >= start) & (pos < start + kernel)

    return BlockMask.from_kv_blocks(
        counts[None, None],
        order[None, None],
        BLOCK_SIZE=(block, block),
        mask_mod=mask_mod,
        seq_lengths=(n, n),
        compute_q_blocks=backward,  # the transposed indices serve backward only
    )


_FLEX_PLANS: dict[tuple, tuple[Any, Callable]] = {}
_FLEX_PLANS_KEPT = 8


def _flex_plan(key: tuple, hw: HW, kernel: int, dilation: int, device, backward: bool):
    """(block mask, compiled flex_attention) for one shape, built on first use."""
    if key not in _FLEX_PLANS:
        from torch.nn.attention.flex_attention import flex_attention

        if len(_FLEX_PLANS) >= _FLEX_PLANS_KEPT:
            _FLEX_PLANS.pop(next(iter(_FLEX_PLANS)))
        mask = flex_block_mask(hw, kernel, dilation, device, backward)
        _FLEX_PLANS[key] = mask, torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _FLEX_PLANS[key]


@register("neighborhood.flex")
class NeighbourhoodFlex(NeighbourhoodBase):
    """Neighbourhood attention as compiled FlexAttention over a neighbourhood block mask."""

    REQUIRES = ("torch.nn.attention.flex_attention",)
    DTYPES = (torch.float16, torch.bfloat16, torch.float32)
    BACKWARD_DEVICES = ("cuda",)
    BACKWARD_LIMIT = "FlexAttention's compiled CPU kernel is forward-only"

    def forward(self, q, k, v, spec):
        p = self.params
        key = (
            tuple(q.shape), v.shape[-1], q.dtype, str(q.device), spec.requires_grad,
            spec.q_hw, p["kernel"], p["dilation"],
        )  # fmt: skip
        mask, run = _flex_plan(
            key, spec.q_hw, p["kernel"], p["dilation"], q.device, spec.requires_grad
        )
        scale = softmax_scale(p["scale"], spec.channels)
        try:
            with torch._dynamo.config.patch(
                recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
            ):
                return run(q, k, v, block_mask=mask, scale=scale)  # (B, H, N, Cv)
        except Exception:
            _FLEX_PLANS.pop(key, None)  # the next call of this shape starts afresh
            raise

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        # The output and one float32 log-sum-exp per query; the block indices (q blocks x kv
        # blocks int32, twice with the transposed ones for backward); backward adds the input
        # gradients.
        bh, n = spec.batch * spec.heads, spec.q_tokens
        blocks = -(-n // FLEX_BLOCK)
        indices = blocks * blocks * 4 * (2 if backward else 1)
        grads = spec.input_bytes if backward else 0
        return spec.output_bytes + bh * n * 4 + indices + grads
