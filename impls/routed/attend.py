"""Phase 2 of the block-routed attentions: every query attends, with one exact softmax, to the
keys of the blocks its group kept (:mod:`.router`).

A band of groups at a time: the band's queries [B*H, band, group², C] against the keys and values
of their kept blocks gathered into [B*H, band, κ block², C], through
``scaled_dot_product_attention`` batched over groups. With autograd each band runs under
activation checkpointing, so its gathered keys and values are gathered again in the backward
instead of being kept (κ block² C per query would otherwise stay in memory). Gradients reach
q, k and v here; the routing carries none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attnbench.impls.routed.router import BlockGrid, tile_of_token, tile_tokens

ATTEND_BLOCK_BYTES = 1 << 24  # gathered keys + values per band (16 MiB)


def kept_tokens(kept: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Kept block indices [..., κ] -> the row-major key tokens of those blocks [..., κ block²]."""
    blocks = tile_tokens(grid.kv_hw, grid.block, kept.device)  # (NB, block²)
    return blocks[kept].flatten(-2)


def expand_heads(kept: torch.Tensor, heads: int) -> torch.Tensor:
    """Routings shared by consecutive heads [B, H', G, κ] -> one per head [B, H, G, κ]."""
    return kept.repeat_interleave(heads // kept.shape[1], dim=1)


def attend_band(q_band, k, v, tokens, scale: float) -> torch.Tensor:
    """q_band [BH, g, n, C] attends to the keys ``tokens`` [BH, g, K] of k, v [BH, Nk, C]."""
    bh, g, width = tokens.shape
    rows = torch.arange(bh, device=tokens.device)[:, None]
    flat = tokens.reshape(bh, g * width)
    k_band = k[rows, flat].reshape(bh, g, width, -1)  # (BH, g, K, C)
    v_band = v[rows, flat].reshape(bh, g, width, -1)  # (BH, g, K, Cv)
    return F.scaled_dot_product_attention(q_band, k_band, v_band, scale=scale)


def attend(q, k, v, kept: torch.Tensor, grid: BlockGrid, scale: float) -> torch.Tensor:
    """The output [B, H, Nq, Cv] of every query over its group's kept blocks ``kept``."""
    b, heads, nq, c = q.shape
    cv = v.shape[-1]
    groups = tile_tokens(grid.q_hw, grid.group, q.device)  # (G, group²)
    q_groups = q.reshape(b * heads, nq, c)[:, groups]  # (BH, G, group², C)
    k_flat, v_flat = k.reshape(b * heads, -1, c), v.reshape(b * heads, -1, cv)
    tokens = kept_tokens(expand_heads(kept, heads), grid).reshape(b * heads, grid.n_groups, -1)
    per_group = tokens.shape[-1] * (c + cv) * k.element_size() * b * heads
    band = max(1, ATTEND_BLOCK_BYTES // per_group)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for start in range(0, grid.n_groups, band):
        args = (q_groups[:, start : start + band], k_flat, v_flat, tokens[:, start : start + band])
        if grad:
            outs.append(checkpoint(attend_band, *args, scale, use_reentrant=False))
        else:
            outs.append(attend_band(*args, scale))
    out = torch.cat(outs, dim=1).reshape(b * heads, nq, cv)  # group-major token order
    order = torch.argsort(groups.reshape(-1))
    return out[:, order].reshape(b, heads, nq, cv)


def kept_mask(kept: torch.Tensor, grid: BlockGrid, heads: int) -> torch.Tensor:
    """[B, H, Nq, Nk] bool: True where a query's group kept the key's block."""
    b = kept.shape[0]
    tokens = kept_tokens(expand_heads(kept, heads), grid)  # (B, H, G, K)
    nk = grid.kv_hw[0] * grid.kv_hw[1]
    mask = torch.zeros(b, heads, grid.n_groups, nk, dtype=torch.bool, device=kept.device)
    mask.scatter_(-1, tokens, True)
    return mask[:, :, tile_of_token(grid.q_hw, grid.group, kept.device)]
