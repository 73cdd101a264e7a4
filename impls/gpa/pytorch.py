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

    NaN ranks above every number (as in ``torch.sort``). ``torch.topk`` does not order ties;
    where the κ-th and (κ+1)-th values are equal or both NaN, the row is redone with a stable
    sort, which keeps equal values (and NaNs) in index order.
    """
    n = relevance.shape[-1]
    if topk == n:
        return torch.arange(n, device=relevance.device).expand(relevance.shape).clone()
    values, index = relevance.topk(topk + 1, dim=-1)  # descending
    # NaN ranks first, so a NaN (κ+1)-th value means a NaN κ-th one: a tie that == misses.
    tied = (values[..., topk - 1] == values[..., topk]) | values[..., topk].isnan()
    if tied.any():
        order = torch.sort(relevance[tied], dim=-1, descending=True, stable=True).indices
        index[tied] = order[..., : topk + 1]
    return index[..., :topk].sort(dim=-1).values


def euclid_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [..., C] and their squared norms [...] for the euclid expansion 2 q.k - |k|².

    A key whose |k|² is infinite (an infinite channel) has its channels zeroed, so that its
    score is 0 - inf = -inf, as -|q - k|² is, instead of ±inf - inf = NaN. A NaN stays NaN.
    The check runs over the norms only; keys are copied only when one is infinite.
    """
    norms = (k * k).sum(-1)
    infinite = norms.isinf()
    if infinite.any():
        k = k.masked_fill(infinite[..., None], 0)
    return k, norms


@torch.no_grad()
def low_res_inputs(
    q: torch.Tensor, k: torch.Tensor, geom: Geometry, affinity: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Phase 1's operands: pooled queries, pooled keys and (euclid) the bias on every score.

    Returns q_cells [G, m s², C]: the low-res queries cell-major (each cell's s² rows
    adjacent, so its relevance is a sum over one contiguous axis) and pre-scaled (the scale
    costs one pass over n/d² C elements instead of one over the scores); k_low [G, nk', C];
    and for euclid, bias [G, 1, nk'] = -scale |k'|², else None. With these, the scores are
    q_cells k_low^T + bias. Half inputs are pooled in float32.
    """
    b, h, _, c = q.shape
    g = b * h
    work = torch.promote_types(q.dtype, torch.float32)
    s = geom.s
    rows, cols = geom.cells_hw
    k_low = pool(k, geom.kv_hw, geom.d, work).reshape(g, geom.nk_low, c)
    if affinity == "euclid":
        k_low, k_norms = euclid_keys(k_low)
    q_low = pool(q, geom.q_hw, geom.d, work).view(g, rows, s, cols, s, c)
    q_cells = q_low.new_empty(g, rows, cols, s, s, c)
    factor = scale if affinity == "dot" else 2 * scale
    torch.mul(q_low.permute(0, 1, 3, 2, 4, 5), factor, out=q_cells)
    # euclid: -scale |q - k|² = scale (2 q.k - |k|²) - scale |q|²; the last term is constant
    # along each softmax row and drops out.
    bias = -scale * k_norms[:, None, :] if affinity == "euclid" else None
    return q_cells.view(g, -1, c), k_low, bias


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
    s = geom.s
    rows, cols = geom.cells_hw
    nk = geom.nk_low
    q_cells, k_low, bias = low_res_inputs(q, k, geom, affinity, scale)
    k_low_t = k_low.transpose(1, 2)
    work = q_cells.dtype
    band = max(1, PHASE1_BLOCK_ELEMS // (g * cols * s * s * nk))  # cell rows per step
    # One scores buffer for every band: fresh large tensors are page-faulted in on each step.
    scores_buf = q_cells.new_empty(g * min(band, rows) * cols * s * s * nk)
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
        if bias is not None:
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
    """Cell rows per phase-2 step, >= 1: a step's working set near ``PHASE2_BLOCK_BYTES``.

    Per cell: its queries and outputs, its gathered keys and values, and two score-sized
    tensors (scores and, in backward, their gradient) — with few channels and large blocks
    (d = 8: 256 queries x 768 keys per cell) the scores dominate.
    """
    queries, n_keys = geom.cell_side**2, geom.keys_per_cell
    per_cell = (queries + n_keys) * (c + cv) + 2 * queries * n_keys
    return max(1, PHASE2_BLOCK_BYTES // (g * geom.cells_hw[1] * per_cell * element_size))


def euclid_augment(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k -> q*, k* with q*.k* = 2 q.k - |k|² = -|q - k|² + |q|² (|q|² drops out of softmax).

    A key with an infinite |k|² scores -inf, as in :func:`euclid_keys`; here its channels are
    zeroed in place in k* without a check first (which would wait for a GPU).
    """
    q_aug = torch.cat([2 * q, -torch.ones_like(q[..., :1])], dim=-1)
    norms = (k * k).sum(-1, keepdim=True)
    k_aug = torch.cat([k, norms], dim=-1)
    k_aug[..., :-1].masked_fill_(norms.isinf(), 0)
    return q_aug, k_aug


class Phase2:
    """Phase 2's layout and its bands, shared by the forward and the backward pass.

    Everything is laid out cell-row-major, (rows, G, cols, ...), so that a band of cell rows is a
    leading slice: a prefix of each buffer, and one contiguous run of ``index``. Scores are
    ``q_s k^T`` (+ ``-scale |k|²`` for euclid) with the queries pre-scaled, q_s = ``factor`` q:
    the scale is applied in the pass that reorders the queries, never over the scores.
    """

    def __init__(self, q, k, v, keys, geom: Geometry, affinity: str, scale: float):
        b, h, nq, c = q.shape
        self.shape = (b, h, nq)
        self.g, self.d, self.c, self.cv = b * h, geom.d, c, v.shape[-1]
        self.side = geom.cell_side
        self.rows, self.cols = geom.cells_hw
        self.n_keys = geom.keys_per_cell
        self.affinity, self.scale = affinity, scale
        self.factor = scale if affinity == "dot" else 2 * scale
        g, d = self.g, self.d
        # Key segments (d tokens each, over all batches and heads) of every cell, cell-row-major:
        # (rows, G cols κ d).
        self.n_segments = k.shape[2] // d
        segments = block_segments(geom, q.device)[keys].reshape(g, self.rows, self.cols, -1)
        segments = (
            segments + (torch.arange(g, device=q.device) * self.n_segments)[:, None, None, None]
        )
        self.index = segments.transpose(0, 1).reshape(self.rows, -1)
        self.band = phase2_band_rows(geom, g, c, self.cv, q.element_size())
        self.max_cells = min(self.band, self.rows) * g * self.cols

    def by_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, Nq, X] -> its cells as a view (rows, G, cols, side, side, X)."""
        g, side = self.g, self.side
        return x.reshape(g, self.rows, side, self.cols, side, -1).permute(1, 0, 3, 2, 4, 5)

    def bands(self):
        """(first row, end row, cells, segment index) of each band."""
        for r0 in range(0, self.rows, self.band):
            r1 = min(self.rows, r0 + self.band)
            yield r0, r1, (r1 - r0) * self.g * self.cols, self.index[r0:r1].reshape(-1)

    def gather(self, x_seg: torch.Tensor, index: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """The segments ``index`` of ``x_seg`` [S, d X] into ``buf``, as (cells, κ d², X)."""
        x = torch.index_select(
            x_seg, 0, index, out=buf[: index.numel() * x_seg.shape[1]].view(-1, x_seg.shape[1])
        )
        return x.view(-1, self.n_keys, x_seg.shape[1] // self.d)

    def keys(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The keys the scores use and, for euclid, |k|² per segment [S, d] (else None)."""
        if self.affinity != "euclid":
            return k, None
        k, norms = euclid_keys(k)
        return k, norms.reshape(-1, self.d)

    def scores(self, q_cells, k_cells, k_norm_seg, index, out) -> torch.Tensor:
        """q_s k^T, minus scale |k|² for euclid, into ``out`` (cells, side², κ d²)."""
        if self.affinity == "euclid":
            k_norm = k_norm_seg.index_select(0, index).view(-1, 1, self.n_keys)
            return torch.baddbmm(
                k_norm, q_cells, k_cells.transpose(1, 2), beta=-self.scale, out=out
            )
        return torch.bmm(q_cells, k_cells.transpose(1, 2), out=out)

    def queries(self, q_rows, r0, r1, cells, buf) -> torch.Tensor:
        """The band's queries, cell-major and pre-scaled, in ``buf``: (cells, side², C)."""
        q_cells = buf[: cells * self.side**2 * self.c].view(
            r1 - r0, self.g, self.cols, self.side, self.side, self.c
        )
        torch.mul(q_rows[r0:r1], self.factor, out=q_cells)
        return q_cells.view(cells, self.side**2, self.c)


def phase2_forward(
    q, k, v, keys, geom: Geometry, affinity: str, scale: float, with_lse: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Phase 2 without autograd: the output, and with ``with_lse`` each query's log-sum-exp.

    Every band reuses one set of buffers (bmm, in-place softmax, bmm with ``out=``): fresh large
    tensors would be page-faulted in (zero-filled by the kernel) on every step.
    """
    p = Phase2(q, k, v, keys, geom, affinity, scale)
    g, d, c, cv, side, n_keys = p.g, p.d, p.c, p.cv, p.side, p.n_keys
    k, k_norm_seg = p.keys(k)
    k_seg = k.reshape(g * p.n_segments, d * c)
    v_seg = v.reshape(g * p.n_segments, d * cv)
    q_rows = p.by_rows(q)
    q_buf = q.new_empty(p.max_cells * side * side * c)
    kv_buf = q.new_empty(p.max_cells * n_keys * max(c, cv))  # keys, then values over them
    s_buf = q.new_empty(p.max_cells, side * side, n_keys)
    o_buf = q.new_empty(p.max_cells, side * side, cv)
    out = q.new_empty(*p.shape, cv)
    out_rows = p.by_rows(out)
    lse = q.new_empty(p.rows, g * p.cols * side * side, 1) if with_lse else None
    for r0, r1, cells, index in p.bands():
        q_cells = p.queries(q_rows, r0, r1, cells, q_buf)
        k_cells = p.gather(k_seg, index, kv_buf)
        scores = p.scores(q_cells, k_cells, k_norm_seg, index, s_buf[:cells])
        if with_lse:
            top = scores.amax(dim=-1, keepdim=True)
            scores.sub_(top).exp_()
            total = scores.sum(dim=-1, keepdim=True)
            scores.div_(total)
            lse[r0:r1] = (top + total.log_()).view(r1 - r0, -1, 1)
        else:
            torch.softmax(scores, dim=-1, out=scores)  # in place
        v_cells = p.gather(v_seg, index, kv_buf)
        o = torch.bmm(scores, v_cells, out=o_buf[:cells])
        out_rows[r0:r1] = o.view(r1 - r0, g, p.cols, side, side, cv)
    return out, lse


def phase2_backward(q, k, v, keys, out, lse, grad_out, geom: Geometry, affinity: str, scale: float):
    """Phase 2's gradients (dq, dk, dv), band by band, gathering keys and values again.

    Per band, with P = exp(S - lse) recomputed: dV = P^T dO, dS = P (dO V^T - rowsum(dO O)),
    dQ = factor dS K, dK = dS^T q_s (and, for euclid, - 2 scale k colsum(dS) from the
    -scale |k|² term); dK and dV are added to their segments with ``index_add_``.
    """
    p = Phase2(q, k, v, keys, geom, affinity, scale)
    g, d, c, cv, side = p.g, p.d, p.c, p.cv, p.side
    k_used, k_norm_seg = p.keys(k)
    k_seg = k_used.reshape(g * p.n_segments, d * c)
    v_seg = v.reshape(g * p.n_segments, d * cv)
    q_rows, out_rows, grad_rows = p.by_rows(q), p.by_rows(out), p.by_rows(grad_out)
    grad_q = torch.empty_like(q)
    grad_q_rows = p.by_rows(grad_q)
    grad_k_seg = torch.zeros_like(k_seg)
    grad_v_seg = torch.zeros_like(v_seg)
    q_buf = q.new_empty(p.max_cells * side * side * c)
    k_buf = q.new_empty(p.max_cells * p.n_keys * c)
    v_buf = q.new_empty(p.max_cells * p.n_keys * cv)
    do_buf = q.new_empty(p.max_cells, side, side, cv)
    for r0, r1, cells, index in p.bands():
        q_cells = p.queries(q_rows, r0, r1, cells, q_buf)
        k_cells = p.gather(k_seg, index, k_buf)
        v_cells = p.gather(v_seg, index, v_buf)
        probs = p.scores(q_cells, k_cells, k_norm_seg, index, None)
        probs.sub_(lse[r0:r1].view(cells, side * side, 1)).exp_()
        do_cells = do_buf[:cells].view(r1 - r0, g, p.cols, side, side, cv)
        do_cells.copy_(grad_rows[r0:r1])
        do_cells = do_cells.view(cells, side * side, cv)
        delta = (do_cells * out_rows[r0:r1].reshape(cells, side * side, cv)).sum(-1)
        grad_v_seg.index_add_(0, index, torch.bmm(probs.transpose(1, 2), do_cells).view(-1, d * cv))
        grad_s = torch.bmm(do_cells, v_cells.transpose(1, 2))
        grad_s.sub_(delta.unsqueeze(-1)).mul_(probs)
        grad_k = torch.bmm(grad_s.transpose(1, 2), q_cells)
        if p.affinity == "euclid":
            grad_k.sub_(k_cells * (2 * p.scale * grad_s.sum(1)).unsqueeze(-1))
        grad_k_seg.index_add_(0, index, grad_k.view(-1, d * c))
        grad_q_cells = torch.bmm(grad_s, k_cells).mul_(p.factor)
        grad_q_rows[r0:r1] = grad_q_cells.view(r1 - r0, g, p.cols, side, side, c)
    return grad_q, grad_k_seg.view_as(k), grad_v_seg.view_as(v)


class GridAttention(torch.autograd.Function):
    """Phase 2 as an autograd function whose backward pass recomputes what it needs.

    Saves only the inputs, the output, the selected keys and each query's log-sum-exp, so
    forward+backward memory stays bounded like the forward (autograd through the bands would
    keep every band's gathered copies). The forward pass is ``phase2`` (:func:`phase2_forward`,
    or another with its signature and results: ``gpa.cpp``'s kernel), the backward pass
    ``phase2_grad`` (:func:`phase2_backward`, or ``gpa.cpp``'s).
    """

    @staticmethod
    def forward(ctx, q, k, v, keys, geom, affinity, scale, phase2, phase2_grad):
        out, lse = phase2(q, k, v, keys, geom, affinity, scale, with_lse=True)
        ctx.save_for_backward(q, k, v, keys, out, lse)
        ctx.geom, ctx.affinity, ctx.scale, ctx.phase2_grad = geom, affinity, scale, phase2_grad
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, keys, out, lse = ctx.saved_tensors
        geom, affinity, scale = ctx.geom, ctx.affinity, ctx.scale
        grads = ctx.phase2_grad(q, k, v, keys, out, lse, grad_out, geom, affinity, scale)
        return *grads, None, None, None, None, None, None


def grid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    geom: Geometry,
    affinity: str = "dot",
    scale: float | None = None,
    phase2=phase2_forward,
    phase2_grad=phase2_backward,
) -> torch.Tensor:
    """Phase 2: each cell's queries attend exactly to the d x d blocks of its kept keys.

    Differentiable in q, k and v (:class:`GridAttention`); without autograd, the forward alone.

    Args:
        q: [B, H, Nq, C]; k: [B, H, Nk, C]; v: [B, H, Nk, Cv] (row-major maps).
        keys: [B, H, m, κ] low-res keys per cell, from :func:`select_keys`.
        phase2: the forward pass, (q, k, v, keys, geom, affinity, scale, with_lse) ->
            (output, log-sum-exp or None); :func:`phase2_forward` by default.
        phase2_grad: its backward pass, (q, k, v, keys, out, lse, grad_out, geom, affinity,
            scale) -> (dq, dk, dv); :func:`phase2_backward` by default.

    Returns:
        [B, H, Nq, Cv].
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    track = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if track:
        return GridAttention.apply(q, k, v, keys, geom, affinity, scale, phase2, phase2_grad)
    return phase2(q, k, v, keys, geom, affinity, scale, with_lse=False)[0]


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
        # Forward: the output, one phase-2 band's buffers (queries, gathered keys then values,
        # scores, outputs) and one band of phase-1 scores. Backward (GridAttention) adds what it
        # saves (output, log-sum-exp), the output and input gradients, and one band's buffers
        # and temporaries: queries, keys, values, output gradients, probabilities and their
        # gradients, key, value and query gradients.
        geom = self.geometry(spec)
        es = spec.element_size
        bh = spec.batch * spec.heads
        c, cv = spec.channels, spec.v_channels
        rows, cols = geom.cells_hw
        cells = min(phase2_band_rows(geom, bh, c, cv, es), rows) * bh * cols
        n_keys, queries = geom.keys_per_cell, geom.cell_side**2
        per_cell = queries * (c + n_keys + cv) + n_keys * max(c, cv)
        forward = spec.output_bytes + cells * per_cell * es + 4 * PHASE1_BLOCK_ELEMS
        if not backward:
            return forward
        lse = bh * spec.q_tokens * es
        per_cell = queries * (2 * c + 2 * cv + 2 * n_keys) + 2 * n_keys * (c + cv)
        return forward + lse + 2 * spec.output_bytes + spec.input_bytes + cells * per_cell * es
