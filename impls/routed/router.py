"""Phase 1 of the block-routed attentions: the key blocks each group of queries keeps.

GPA (Jetchev et al. 2021) introduced the scheme its relatives share: pool keys into blocks,
score the blocks for each group of queries, keep the top κ, attend exactly to their keys
(:mod:`.attend`). The relatives differ only in the choices made here:

- the key block: a ``block`` x ``block`` square of the key map; the query group: a ``group`` x
  ``group`` square of the query map (``group`` 1: every query routes on its own);
- the score of a block for a group (:data:`RULES`): ``pooled`` — mean query of the group ·
  mean key of the block (BiFormer's BRA, VSA); ``token`` — the query · mean key (MoBA);
  ``softmax`` — the softmax over blocks of scale · query · mean key (NSA's selection);
- heads: each head routes on its own, or ``heads_per_route`` heads share one routing, their
  scores summed (BRA routes once for all heads on all channels, which is this sum; NSA sums
  the probabilities of the query heads that share keys);
- ``keep_own``: the block under a query is always kept and counts toward κ (MoBA, NSA).

Top-κ ties go to the lower block index, as GPA's do. Maps are row-major token grids; blocks and
groups are numbered row-major. Routing runs without gradient, a band of groups at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnbench.impls.gpa.pytorch import top_keys
from attnbench.spec import HW

RULES = ("pooled", "token", "softmax")
ROUTE_BLOCK_ELEMS = 1 << 22  # scores per routing step (16 MiB in fp32)


@dataclass(frozen=True)
class BlockGrid:
    """Query groups (``group`` x ``group`` squares of the q map) and key blocks (``block`` x
    ``block`` squares of the kv map) of one call."""

    group: int
    block: int
    q_hw: HW
    kv_hw: HW

    @property
    def groups_hw(self) -> HW:
        return self.q_hw[0] // self.group, self.q_hw[1] // self.group

    @property
    def blocks_hw(self) -> HW:
        return self.kv_hw[0] // self.block, self.kv_hw[1] // self.block

    @property
    def n_groups(self) -> int:
        return self.groups_hw[0] * self.groups_hw[1]

    @property
    def n_blocks(self) -> int:
        return self.blocks_hw[0] * self.blocks_hw[1]


def grid_problems(q_hw: HW, kv_hw: HW, group: int, block: int, topk: int) -> list[str]:
    """Why a grid of these sizes cannot be cut, or κ cannot be kept ([] if it can)."""
    problems = []
    for what, hw, side, name in (("q", q_hw, group, "group"), ("kv", kv_hw, block, "block")):
        for axis, size in zip(("height", "width"), hw):
            if size % side:
                problems.append(
                    f"{what} map {axis} {size} is not divisible by the {name} side {side}"
                )
    n_blocks = (kv_hw[0] // block) * (kv_hw[1] // block)
    if not problems and topk > n_blocks:
        problems.append(
            f"topk={topk} exceeds the {n_blocks} key blocks (kv map {kv_hw[0]}x{kv_hw[1]} / "
            f"block {block}; allowed: topk <= {n_blocks})"
        )
    return problems


def tile_tokens(hw: HW, side: int, device=None) -> torch.Tensor:
    """[tiles, side²]: the row-major tokens of each ``side`` x ``side`` tile, tiles row-major."""
    h, w = hw
    rows = torch.arange(h // side, device=device)[:, None, None, None] * side
    cols = torch.arange(w // side, device=device)[None, :, None, None] * side
    offsets_r = torch.arange(side, device=device)[None, None, :, None]
    offsets_c = torch.arange(side, device=device)[None, None, None, :]
    tokens = (rows + offsets_r) * w + cols + offsets_c  # (th, tw, side, side)
    return tokens.reshape(-1, side * side)


def tile_of_token(hw: HW, side: int, device=None) -> torch.Tensor:
    """[h*w]: the tile (row-major) of every token of the map."""
    tiles = tile_tokens(hw, side, device)
    index = torch.empty(hw[0] * hw[1], dtype=torch.long, device=device)
    index[tiles.reshape(-1)] = torch.arange(len(tiles), device=device).repeat_interleave(side**2)
    return index


def pool_tiles(x: torch.Tensor, hw: HW, side: int) -> torch.Tensor:
    """Mean of x [B, H, h*w, C] over each ``side`` x ``side`` tile -> [B, H, tiles, C]."""
    b, heads, _, c = x.shape
    h, w = hw
    tiles = x.reshape(b, heads, h // side, side, w // side, side, c)
    return tiles.mean(dim=(3, 5)).reshape(b, heads, -1, c)


def own_blocks(grid: BlockGrid, device=None) -> torch.Tensor:
    """[n_groups]: the key block under each query group's top-left query, the kv map scaled to
    the q map (the same position when both maps have one size)."""
    gh, gw = grid.groups_hw
    rows = torch.arange(gh, device=device) * grid.group * grid.kv_hw[0] // grid.q_hw[0]
    cols = torch.arange(gw, device=device) * grid.group * grid.kv_hw[1] // grid.q_hw[1]
    bw = grid.blocks_hw[1]
    return ((rows // grid.block)[:, None] * bw + (cols // grid.block)[None, :]).reshape(-1)


def share_heads(scores: torch.Tensor, heads_per_route: int) -> torch.Tensor:
    """[B, H, G, NB] scores summed over consecutive groups of heads -> [B, H / that, G, NB]."""
    if heads_per_route == 1:
        return scores
    b, heads, g, nb = scores.shape
    return scores.reshape(b, heads // heads_per_route, heads_per_route, g, nb).sum(dim=2)


@torch.no_grad()
def route(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: BlockGrid,
    rule: str,
    topk: int,
    scale: float,
    heads_per_route: int = 1,
    keep_own: bool = False,
) -> torch.Tensor:
    """The kept key blocks [B, H / heads_per_route, n_groups, topk], ascending per group."""
    work = torch.promote_types(q.dtype, torch.float32)
    k_blocks = pool_tiles(k.to(work), grid.kv_hw, grid.block)  # (B, H, NB, C)
    queries = pool_tiles(q.to(work), grid.q_hw, grid.group) if rule == "pooled" else q.to(work)
    own = own_blocks(grid, q.device) if keep_own else None
    b, heads = q.shape[:2]
    band = max(1, ROUTE_BLOCK_ELEMS // (b * heads * grid.n_blocks))
    kept = []
    for start in range(0, grid.n_groups, band):
        scores = scale * queries[:, :, start : start + band] @ k_blocks.transpose(-2, -1)
        if rule == "softmax":
            scores = scores.softmax(dim=-1)  # (B, H, band, NB)
        scores = share_heads(scores, heads_per_route)
        if own is not None:
            index = own[start : start + band].expand(*scores.shape[:2], -1)[..., None]
            scores.scatter_(-1, index, float("inf"))
        kept.append(top_keys(scores, topk))
    return torch.cat(kept, dim=2)
