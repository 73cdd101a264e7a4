"""``gpa.torch``: Grid Partitioned Attention in vectorised PyTorch, for CPU and CUDA.

Jetchev et al. 2021 (arXiv 2107.03742); the steps are listed in
:mod:`attnbench.impls.gpa.common`. Both phases run over bands of cell rows so that the working
set of a step stays in cache and memory stays bounded on large maps:

- Phase 1 (:func:`select_keys`, no gradient): pooled queries of a band against all pooled
  keys, softmax, relevance summed per cell, top-κ — a [G, band, nk/d²] block at a time.
- Phase 2 (:func:`grid_attention`): the band's queries, cell-major, attend through fused SDPA
  to the κ d² keys gathered for their cell. Keys and values are gathered one band at a time
  (never m κ d² C elements at once), straight from the row-major inputs.

Every (batch, head) selects its own keys; gradients reach q, k and v through phase 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnbench.impls.gpa.common import Geometry, GPABase
from attnbench.registry import register
from attnbench.spec import AttentionSpec

PHASE1_BLOCK_ELEMS = 1 << 19  # low-res scores per phase-1 step (2 MiB in fp32)
PHASE2_BLOCK_BYTES = 1 << 22  # gathered keys + values per phase-2 step (4 MiB)


def pool(x: torch.Tensor, hw: tuple[int, int], d: int, dtype: torch.dtype) -> torch.Tensor:
    """Average-pool tokens x [B, H, h*w, C] of an h x w map by d -> [B*H, h/d, w/d, C]."""
    b, h_, _, c = x.shape
    h, w = hw
    # A channels-last view: avg_pool2d pools it in place of a (slow) mean over strided axes.
    grid = x.reshape(b * h_, h, w, c).to(dtype).permute(0, 3, 1, 2)  # (G, C, h, w)
    return F.avg_pool2d(grid, d).permute(0, 2, 3, 1)  # (G, h/d, w/d, C)


def top_keys(relevance: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices of the ``topk`` largest values along the last dim, ascending; ties to lower index.

    ``torch.topk`` does not order ties; where the κ-th and (κ+1)-th values are equal, the row is
    redone with a stable sort, which keeps equal values in index order.
    """
    n = relevance.shape[-1]
    if topk == n:
        return torch.arange(n, device=relevance.device).expand(relevance.shape).clone()
    values, index = relevance.topk(topk + 1, dim=-1)  # descending
    tied = values[..., topk - 1] == values[..., topk]
    if tied.any():
        order = torch.sort(relevance[tied], dim=-1, descending=True, stable=True).indices
        index[tied] = order[..., : topk + 1]
    return index[..., :topk].sort(dim=-1).values


def cell_sums(attn: torch.Tensor) -> torch.Tensor:
    """Sum each cell's s x s low-res query rows: (G, R, s, cols, s, nk') -> (G, R, cols, nk').

    Written as s - 1 additions of contiguous slices per axis: a ``sum`` over the strided
    axes (2, 4) is several times slower on CPU.
    """
    s = attn.shape[2]
    rows = attn[:, :, 0]
    for i in range(1, s):
        rows = rows + attn[:, :, i]  # (G, R, cols, s, nk')
    cells = rows[:, :, :, 0]
    for i in range(1, s):
        cells = cells + rows[:, :, :, i]
    return cells


@torch.no_grad()
def select_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    geom: Geometry,
    affinity: str = "dot",
    scale: float | None = None,
    with_relevance: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Phase 1: the low-res keys each query cell keeps.

    Args:
        q: [B, H, Nq, C] queries of the ``geom.q_hw`` map.
        k: [B, H, Nk, C] keys of the ``geom.kv_hw`` map.
        geom: resolved geometry (:meth:`GPABase.geometry`).
        affinity: "dot" or "euclid".
        scale: softmax scale (default 1/sqrt(C)).
        with_relevance: also return each kept key's relevance (summed low-res attention).

    Returns:
        keys [B, H, m, κ] (int64, ascending; low-res key i is row i // (wk/d), column
        i % (wk/d)), and with ``with_relevance`` the relevances [B, H, m, κ].
    """
    b, h, _, c = q.shape
    g = b * h
    scale = c**-0.5 if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)  # half inputs select in float32
    q_low = pool(q, geom.q_hw, geom.d, work)  # (G, hq/d, wq/d, C)
    k_low = pool(k, geom.kv_hw, geom.d, work).reshape(g, geom.nk_low, c)  # (G, nk', C)
    k_low_t = k_low.transpose(1, 2)
    if affinity == "euclid":
        # -scale |q - k|² = scale (2 q.k - |k|²) - scale |q|²; the last term is constant along
        # each softmax row and drops out.
        bias = -scale * (k_low * k_low).sum(-1)[:, None, :]  # (G, 1, nk')

    s = geom.s
    rows, cols = geom.cells_hw
    band = max(1, PHASE1_BLOCK_ELEMS // (g * s * s * cols * geom.nk_low))  # cell rows per step
    keys = torch.empty(g, rows, cols, geom.topk, dtype=torch.long, device=q.device)
    kept = (
        torch.empty(g, rows, cols, geom.topk, dtype=work, device=q.device)
        if with_relevance
        else None
    )
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        q_band = q_low[:, r0 * s : r1 * s].reshape(g, -1, c)  # (G, band s wq/d, C)
        if affinity == "euclid":
            scores = torch.baddbmm(bias, q_band, k_low_t, alpha=2 * scale)
        else:
            scores = torch.bmm(q_band * scale, k_low_t)  # (G, band s wq/d, nk')
        attn = scores.softmax(dim=-1)
        relevance = cell_sums(attn.view(g, r1 - r0, s, cols, s, geom.nk_low))
        keys[:, r0:r1] = top_keys(relevance, geom.topk)
        if kept is not None:
            kept[:, r0:r1] = relevance.gather(-1, keys[:, r0:r1])
    keys = keys.reshape(b, h, geom.m, geom.topk)
    if kept is None:
        return keys
    return keys, kept.reshape(b, h, geom.m, geom.topk)


def block_segments(geom: Geometry, device: torch.device) -> torch.Tensor:
    """[nk', d]: for each low-res key, its d x d block as d row segments of d tokens.

    The key map is viewed as segments of d consecutive tokens, (hk * wk/d) of them, row-major;
    low-res key (r, c) covers segments (r d + a) * (wk/d) + c for a = 0 .. d-1. Gathering
    whole segments moves d C contiguous elements at a time instead of C.
    """
    d = geom.d
    kh, kw = geom.kv_low
    first = (torch.arange(kh, device=device) * d * kw)[:, None] + torch.arange(kw, device=device)
    return first.reshape(-1, 1) + (torch.arange(d, device=device) * kw).reshape(1, -1)


def euclid_augment(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k -> q*, k* with q*.k* = 2 q.k - |k|² = -|q - k|² + |q|² (|q|² drops out of softmax)."""
    q_aug = torch.cat([2 * q, -torch.ones_like(q[..., :1])], dim=-1)
    k_aug = torch.cat([k, (k * k).sum(-1, keepdim=True)], dim=-1)
    return q_aug, k_aug


def grid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    geom: Geometry,
    affinity: str = "dot",
    scale: float | None = None,
) -> torch.Tensor:
    """Phase 2: each cell's queries attend exactly to the d x d blocks of its kept keys.

    Args:
        q: [B, H, Nq, C]; k: [B, H, Nk, C]; v: [B, H, Nk, Cv] (row-major maps).
        keys: [B, H, m, κ] low-res keys per cell, from :func:`select_keys`.

    Returns:
        [B, H, Nq, Cv].
    """
    b, h, nq, c = q.shape
    cv = v.shape[-1]
    g, d = b * h, geom.d
    side = geom.cell_side
    rows, cols = geom.cells_hw
    n_keys = geom.keys_per_cell

    # Key segments (d tokens each, over all batches and heads) of every cell: (G, m, κ d).
    n_segments = k.shape[2] // d
    segments = block_segments(geom, q.device)[keys].reshape(g, geom.m, geom.topk * d)
    segments = segments + (torch.arange(g, device=q.device) * n_segments)[:, None, None]
    k_seg = k.reshape(g * n_segments, d * c)
    v_seg = v.reshape(g * n_segments, d * cv)
    q_grid = q.reshape(g, rows, side, cols, side, c)  # cell (r, c) = q_grid[:, r, :, c, :]

    per_cell_bytes = n_keys * (c + cv) * q.element_size()
    band = max(1, PHASE2_BLOCK_BYTES // (g * cols * per_cell_bytes))  # cell rows per step
    track = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not track:
        # Without autograd, every band reuses the same buffers: fresh ones would be page-faulted
        # in on every step.
        max_cells = g * min(band, rows) * cols
        k_buf = q.new_empty(max_cells * n_keys * c)
        v_buf = q.new_empty(max_cells * n_keys * cv)
        out = q.new_empty(g, rows, side, cols, side, cv)
    pieces = []
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        cells = g * (r1 - r0) * cols
        # (G, band, side, cols, side, C) -> cell-major (G band cols, 1, side², C)
        q_cells = q_grid[:, r0:r1].permute(0, 1, 3, 2, 4, 5).reshape(cells, 1, side * side, c)
        index = segments[:, r0 * cols : r1 * cols].reshape(-1)
        if track:
            k_cells = k_seg.index_select(0, index)
            v_cells = v_seg.index_select(0, index)
        else:
            k_cells = torch.index_select(
                k_seg, 0, index, out=k_buf[: index.numel() * d * c].view(-1, d * c)
            )
            v_cells = torch.index_select(
                v_seg, 0, index, out=v_buf[: index.numel() * d * cv].view(-1, d * cv)
            )
        k_cells = k_cells.view(cells, 1, n_keys, c)
        v_cells = v_cells.view(cells, 1, n_keys, cv)
        if affinity == "euclid":
            q_cells, k_cells = euclid_augment(q_cells, k_cells)
        o = F.scaled_dot_product_attention(q_cells, k_cells, v_cells, scale=scale)
        o = o.view(g, r1 - r0, cols, side, side, cv).permute(0, 1, 3, 2, 4, 5)
        if track:
            pieces.append(o)
        else:
            out[:, r0:r1] = o
    if track:
        out = torch.cat(pieces, dim=1)
    return out.reshape(b, h, nq, cv)


@register("gpa.torch")
class GPATorch(GPABase):
    """Vectorised PyTorch GPA: banded phase 1 and phase 2 via gathered blocks and fused SDPA."""

    def forward(self, q, k, v, spec):
        geom = self.geometry(spec)
        scale = self.scale_for(spec.channels)
        affinity = self.params["affinity"]
        keys = select_keys(q, k, geom, affinity, scale)
        return grid_attention(q, k, v, keys, geom, affinity, scale)

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        # Forward without gradient: the output, plus one band of gathered keys and values,
        # its queries and output, and one band of phase-1 scores (the module constants).
        # With gradient, autograd keeps every band's gathered keys, values and queries
        # (m κ d² (C + Cv) + n C elements), the cell-major output and the input gradients.
        geom = self.geometry(spec)
        es = spec.element_size
        bh = spec.batch * spec.heads
        band = 2 * PHASE2_BLOCK_BYTES + 4 * PHASE1_BLOCK_ELEMS
        if not backward:
            return spec.output_bytes + band
        gathered = bh * geom.m * geom.keys_per_cell * (spec.channels + spec.v_channels) * es
        queries = bh * spec.q_tokens * spec.channels * es
        return gathered + queries + 2 * spec.output_bytes + spec.input_bytes + band
