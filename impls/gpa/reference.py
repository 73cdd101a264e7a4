"""``gpa.reference``: Grid Partitioned Attention as a plain loop over query cells.

Reads like Algorithm 1 of Jetchev et al. 2021 (arXiv 2107.03742) and the step list in
:mod:`attnbench.impls.gpa.common`. It is the oracle the fast backends are tested against, so
it favours clarity over speed: one (batch, head) and one cell at a time. Fast backends never
import it.
"""

from __future__ import annotations

import torch

from attnbench.impls.gpa.common import Geometry, GPABase
from attnbench.registry import register

DIFFERENCE_ELEMENTS = 1 << 22  # entries of one chunk of q - k differences (16 MiB in float32)


def affinity_scores(q: torch.Tensor, k: torch.Tensor, affinity: str, scale: float) -> torch.Tensor:
    """Scores of queries q [n, C] against keys k [m, C]: scale q.k or -scale |q - k|².

    The differences are formed for a chunk of queries at a time (``DIFFERENCE_ELEMENTS``), so
    the memory is that of the [n, m] scores whatever C; summing the squared differences (not
    |q|² + |k|² - 2 q.k) keeps the exact values and the inf semantics of the definition.
    """
    if affinity == "dot":
        return scale * q @ k.T
    rows = max(1, DIFFERENCE_ELEMENTS // max(1, k.numel()))
    chunks = [((q[i : i + rows, None] - k[None]) ** 2).sum(-1) for i in range(0, len(q), rows)]
    return -scale * (torch.cat(chunks) if chunks else q.new_zeros(0, len(k)))


def average_pool(x: torch.Tensor, hw: tuple[int, int], d: int) -> torch.Tensor:
    """Tokens x [h*w, C] of an h x w map -> mean over d x d blocks, [(h/d)*(w/d), C]."""
    h, w = hw
    grid = x.reshape(h // d, d, w // d, d, -1)  # (h/d, d, w/d, d, C)
    return grid.mean(dim=(1, 3)).reshape((h // d) * (w // d), -1)


def block_tokens(r: int, c: int, d: int, width: int) -> list[int]:
    """Full-resolution tokens of the d x d block that low-res key (r, c) stands for."""
    return [(r * d + a) * width + (c * d + b) for a in range(d) for b in range(d)]


def gpa_single(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geom: Geometry,
    affinity: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPA for one (batch, head): q [Nq, C], k [Nk, C], v [Nk, Cv] -> ([Nq, Cv], keys [m, κ])."""
    d, s = geom.d, geom.s
    lw = geom.q_low[1]
    kw = geom.kv_low[1]
    wq, wk = geom.q_hw[1], geom.kv_hw[1]

    # Phase 1, without gradient: low-resolution attention A' [nq_low, nk_low].
    # Half-precision inputs select their keys in float32.
    work = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        q_low = average_pool(q.to(work), geom.q_hw, d)
        k_low = average_pool(k.to(work), geom.kv_hw, d)
        attn_low = affinity_scores(q_low, k_low, affinity, scale).softmax(dim=-1)

    out = torch.zeros(q.shape[0], v.shape[1], dtype=v.dtype, device=v.device)
    selected = []
    for cell_r in range(geom.cells_hw[0]):
        for cell_c in range(geom.cells_hw[1]):
            # The cell's s x s low-res queries, and their relevance summed per low-res key.
            low_queries = [
                (cell_r * s + a) * lw + (cell_c * s + b) for a in range(s) for b in range(s)
            ]
            relevance = attn_low[low_queries].sum(dim=0)  # (nk_low,)
            # Top-κ, ties to the lower index: a stable sort keeps equal values in index order.
            order = torch.sort(relevance, descending=True, stable=True).indices
            keep = torch.sort(order[: geom.topk]).values
            selected.append(keep)

            # Up-sample each kept key to its d x d block of full-resolution keys.
            key_tokens = [t for i in keep.tolist() for t in block_tokens(i // kw, i % kw, d, wk)]
            # The cell's (s d) x (s d) full-resolution queries.
            side = s * d
            query_tokens = [
                (cell_r * side + a) * wq + (cell_c * side + b)
                for a in range(side)
                for b in range(side)
            ]
            # Phase 2: exact softmax attention over the selected keys.
            scores = affinity_scores(q[query_tokens], k[key_tokens], affinity, scale)
            out[query_tokens] = scores.softmax(dim=-1) @ v[key_tokens]
    return out, torch.stack(selected)


@register("gpa.reference")
class GPAReference(GPABase):
    """The readable oracle: a loop over (batch, head) and query cells. CPU only."""

    DEVICES = ("cpu",)

    def timed_parts(self, q, k, v, spec):
        return {}  # phase 1 runs inside the per-cell loop; it cannot be timed apart

    def forward(self, q, k, v, spec):
        return self.run(q, k, v, spec)[0]

    def run(self, q, k, v, spec) -> tuple[torch.Tensor, torch.Tensor]:
        """Output [B, H, Nq, Cv] and the selected low-res keys [B, H, m, κ] (ascending)."""
        geom = self.geometry(spec)
        scale = self.scale_for(spec.channels)
        outs, keys = [], []
        for b in range(spec.batch):
            for h in range(spec.heads):
                o, sel = gpa_single(q[b, h], k[b, h], v[b, h], geom, self.params["affinity"], scale)
                outs.append(o)
                keys.append(sel)
        shape = (spec.batch, spec.heads)
        out = torch.stack(outs).reshape(*shape, spec.q_tokens, spec.v_channels)
        return out, torch.stack(keys).reshape(*shape, geom.m, geom.topk)
