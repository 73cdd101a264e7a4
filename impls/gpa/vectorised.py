"""``gpa.torch``: Grid Partitioned Attention in vectorised PyTorch, for CPU and CUDA.

Jetchev et al. 2021 (arXiv 2107.03742); the steps are listed in
:mod:`attnbench.impls.gpa.common`. Both phases run over bands of cell rows so that the working
set of a step stays in cache and memory stays bounded on large maps:

- Phase 1 (:func:`select_keys`, no gradient): pooled queries of a band against all pooled
  keys, softmax, relevance summed per cell, top-κ — a [G, band, nk/d²] block at a time. The
  pooled queries are reordered cell-major and pre-scaled once, so a cell's relevance is a sum
  over one contiguous axis and no pass over the scores applies the scale.
- Phase 2 (:func:`grid_attention`): the band's queries, cell-major, attend to the κ d² keys
  gathered for their cell. Keys and values are gathered one band at a time (never m κ d² C
  elements at once), straight from the row-major inputs. Without autograd, every band reuses
  one set of buffers (bmm, in-place softmax, bmm with ``out=``): fresh large tensors are
  page-faulted in (zero-filled by the kernel) on every step, and on CPU this unfused path is
  faster than fused SDPA for these small per-cell problems. With autograd, fused SDPA per band.

Every (batch, head) selects its own keys; gradients reach q, k and v through phase 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnbench.impls.gpa.common import Geometry, GPABase
from attnbench.registry import register
from attnbench.spec import AttentionSpec

PHASE1_BLOCK_ELEMS = 1 << 21  # low-res scores per phase-1 step (8 MiB in fp32)
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
    s = geom.s
    rows, cols = geom.cells_hw
    nk = geom.nk_low
    k_low = pool(k, geom.kv_hw, geom.d, work).reshape(g, nk, c)  # (G, nk', C)
    k_low_t = k_low.transpose(1, 2)
    # Low-res queries cell-major, (G, rows, cols, s, s, C), and pre-scaled: each cell's s² rows
    # are then adjacent (its relevance is a sum over one contiguous axis) and the scale costs
    # one pass over n/d² C elements instead of one over the scores.
    q_low = pool(q, geom.q_hw, geom.d, work).view(g, rows, s, cols, s, c)
    q_cells = q_low.new_empty(g, rows, cols, s, s, c)
    factor = scale if affinity == "dot" else 2 * scale
    torch.mul(q_low.permute(0, 1, 3, 2, 4, 5), factor, out=q_cells)
    q_cells = q_cells.view(g, -1, c)  # (G, rows cols s², C)
    if affinity == "euclid":
        # -scale |q - k|² = scale (2 q.k - |k|²) - scale |q|²; the last term is constant along
        # each softmax row and drops out.
        bias = -scale * (k_low * k_low).sum(-1)[:, None, :]  # (G, 1, nk')

    band = max(1, PHASE1_BLOCK_ELEMS // (g * cols * s * s * nk))  # cell rows per step
    # One scores buffer for every band: fresh large tensors are page-faulted in on each step.
    scores_buf = q_low.new_empty(g * min(band, rows) * cols * s * s * nk)
    keys = torch.empty(g, rows, cols, geom.topk, dtype=torch.long, device=q.device)
    kept = (
        torch.empty(g, rows, cols, geom.topk, dtype=work, device=q.device)
        if with_relevance
        else None
    )
    per_row = cols * s * s  # low-res queries per cell row
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        q_band = q_cells[:, r0 * per_row : r1 * per_row]  # (G, band cols s², C)
        scores = scores_buf[: g * q_band.shape[1] * nk].view(g, -1, nk)
        if affinity == "euclid":
            torch.baddbmm(bias, q_band, k_low_t, out=scores)
        else:
            torch.bmm(q_band, k_low_t, out=scores)
        torch.softmax(scores, dim=-1, out=scores)  # in place
        relevance = scores.view(g, r1 - r0, cols, s * s, nk).sum(3)  # (G, band, cols, nk')
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


def phase2_band_rows(geom: Geometry, g: int, c: int, cv: int, element_size: int) -> int:
    """Cell rows per phase-2 step: gathered keys + values near ``PHASE2_BLOCK_BYTES``, >= 1."""
    per_cell_bytes = geom.keys_per_cell * (c + cv) * element_size
    return max(1, PHASE2_BLOCK_BYTES // (g * geom.cells_hw[1] * per_cell_bytes))


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
    scale = c**-0.5 if scale is None else scale

    # Everything is laid out cell-row-major, (rows, G, cols, ...), so that a band of cell rows
    # is a leading slice: a prefix of each buffer, and one contiguous run of ``index``.
    # Key segments (d tokens each, over all batches and heads) of every cell: (rows, G cols κ d).
    n_segments = k.shape[2] // d
    segments = block_segments(geom, q.device)[keys].reshape(g, rows, cols, geom.topk * d)
    segments = segments + (torch.arange(g, device=q.device) * n_segments)[:, None, None, None]
    index = segments.transpose(0, 1).reshape(rows, -1)
    k_seg = k.reshape(g * n_segments, d * c)
    v_seg = v.reshape(g * n_segments, d * cv)
    # Cell (r, c) of (batch, head) i is q_rows[r, i, c], its side x side queries: (side, side, C).
    q_rows = q.reshape(g, rows, side, cols, side, c).permute(1, 0, 3, 2, 4, 5)
    band = phase2_band_rows(geom, g, c, cv, q.element_size())

    track = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if track:
        pieces = []
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            cells = (r1 - r0) * g * cols
            q_cells = q_rows[r0:r1].reshape(cells, 1, side * side, c)
            k_cells = k_seg.index_select(0, index[r0:r1].reshape(-1)).view(cells, 1, n_keys, c)
            v_cells = v_seg.index_select(0, index[r0:r1].reshape(-1)).view(cells, 1, n_keys, cv)
            if affinity == "euclid":
                q_cells, k_cells = euclid_augment(q_cells, k_cells)
            o = F.scaled_dot_product_attention(q_cells, k_cells, v_cells, scale=scale)
            pieces.append(o.view(r1 - r0, g, cols, side, side, cv))
        out = torch.cat(pieces).permute(1, 0, 3, 2, 4, 5)  # (G, rows, side, cols, side, Cv)
        return out.reshape(b, h, nq, cv)

    if affinity == "euclid":
        # scale (2 q.k - |k|²) as one baddbmm: q is pre-scaled by 2 scale, and the |k|² of the
        # gathered keys come from one gather of per-segment norms.
        k_norm_seg = (k * k).sum(-1).reshape(g * n_segments, d)
    max_cells = min(band, rows) * g * cols
    q_buf = q.new_empty(max_cells, side, side, c)
    kv_buf = q.new_empty(max_cells * n_keys * max(c, cv))  # keys, then values over them
    s_buf = q.new_empty(max_cells, side * side, n_keys)
    o_buf = q.new_empty(max_cells, side * side, cv)
    out = q.new_empty(g, rows, side, cols, side, cv)
    out_rows = out.permute(1, 0, 3, 2, 4, 5)  # (rows, G, cols, side, side, Cv), like q_rows
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        cells = (r1 - r0) * g * cols
        band_index = index[r0:r1].reshape(-1)
        # The cell-major reorder of the queries and the softmax scale in one pass.
        q_cells = q_buf[:cells].view(r1 - r0, g, cols, side, side, c)
        torch.mul(q_rows[r0:r1], scale if affinity == "dot" else 2 * scale, out=q_cells)
        q_cells = q_cells.view(cells, side * side, c)
        k_cells = torch.index_select(
            k_seg, 0, band_index, out=kv_buf[: cells * n_keys * c].view(-1, d * c)
        ).view(cells, n_keys, c)
        scores = s_buf[:cells]
        if affinity == "euclid":
            k_norm = k_norm_seg.index_select(0, band_index).view(cells, 1, n_keys)
            torch.baddbmm(k_norm, q_cells, k_cells.transpose(1, 2), beta=-scale, out=scores)
        else:
            torch.bmm(q_cells, k_cells.transpose(1, 2), out=scores)
        torch.softmax(scores, dim=-1, out=scores)  # in place
        v_cells = torch.index_select(
            v_seg, 0, band_index, out=kv_buf[: cells * n_keys * cv].view(-1, d * cv)
        ).view(cells, n_keys, cv)
        o = torch.bmm(scores, v_cells, out=o_buf[:cells])
        out_rows[r0:r1] = o.view(r1 - r0, g, cols, side, side, cv)
    return out.reshape(b, h, nq, cv)


@register("gpa.torch")
class GPATorch(GPABase):
    """Vectorised PyTorch GPA: banded phase 1, and phase 2 over gathered blocks of keys."""

    def forward(self, q, k, v, spec):
        geom = self.geometry(spec)
        scale = self.scale_for(spec.channels)
        affinity = self.params["affinity"]
        keys = select_keys(q, k, geom, affinity, scale)
        return grid_attention(q, k, v, keys, geom, affinity, scale)

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        # Forward without gradient: the output, one phase-2 band's buffers (queries, gathered
        # keys then values, scores, outputs) and one band of phase-1 scores.
        # With gradient, autograd keeps every band's gathered keys, values and queries
        # (m κ d² (C + Cv) + n C elements), the cell-major output and the input gradients.
        geom = self.geometry(spec)
        es = spec.element_size
        bh = spec.batch * spec.heads
        c, cv = spec.channels, spec.v_channels
        phase1 = 4 * PHASE1_BLOCK_ELEMS
        if not backward:
            rows, cols = geom.cells_hw
            cells = min(phase2_band_rows(geom, bh, c, cv, es), rows) * bh * cols
            n_keys, queries = geom.keys_per_cell, geom.cell_side**2
            per_cell = queries * (c + n_keys + cv) + n_keys * max(c, cv)
            return spec.output_bytes + cells * per_cell * es + phase1
        gathered = bh * geom.m * geom.keys_per_cell * (c + cv) * es
        queries = bh * spec.q_tokens * c * es
        band = 2 * PHASE2_BLOCK_BYTES + phase1
        return gathered + queries + 2 * spec.output_bytes + spec.input_bytes + band
