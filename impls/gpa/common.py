"""Grid Partitioned Attention: parameters, geometry and cost, shared by every GPA backend.

GPA (Jetchev, Yildirim, Bracher, Vollgraf 2021, arXiv 2107.03742):

1. Phase 1 (no gradient): average-pool q and k by d; A' = softmax(scale q' k'^T) over the
   low-resolution keys ("euclid": -scale * squared distance, as in the authors' module).
2. Partition the low-resolution query grid into s x s cells, row-major; m cells.
3. Relevance of low-res key i for cell l = sum of A'[j, i] over the cell's queries j; keep the
   top-κ keys per cell (ties to the lower index).
4. Each kept key (r, c) stands for its d x d block of full-resolution keys.
5. Phase 2: every full-resolution query of cell l (an (s d) x (s d) square) attends with exact
   softmax, under the same affinity, to those κ d² keys. Gradients reach q, k, v here.

The backends (``gpa.reference``, ``gpa.torch``, ``gpa.cpp``, ``gpa.flex``) share this class for
their parameters, input checks, FLOP counts and labels; they differ only in how they compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnbench.registry import Attention, Param
from attnbench.spec import AttentionSpec

PIVOT_PHASE1_RES = 64  # the paper's DeepFashion pivot: phase 1 at 64 x 64, cells 2 x 2, κ = 12


@dataclass(frozen=True)
class Geometry:
    """Sizes of one GPA call: maps, low-resolution grids and cells.

    Attributes:
        d: downsampling factor (side of a low-res key's block of full-res keys).
        s: side of a query cell on the low-res grid.
        topk: κ, the low-res keys kept per cell.
        q_hw: full-resolution query map (hq, wq).
        kv_hw: full-resolution key/value map (hk, wk).
    """

    d: int
    s: int
    topk: int
    q_hw: tuple[int, int]
    kv_hw: tuple[int, int]

    @property
    def q_low(self) -> tuple[int, int]:
        """Low-resolution query grid (hq/d, wq/d)."""
        return self.q_hw[0] // self.d, self.q_hw[1] // self.d

    @property
    def kv_low(self) -> tuple[int, int]:
        """Low-resolution key grid (hk/d, wk/d)."""
        return self.kv_hw[0] // self.d, self.kv_hw[1] // self.d

    @property
    def cells_hw(self) -> tuple[int, int]:
        """Grid of query cells (hq/(d s), wq/(d s))."""
        return self.q_low[0] // self.s, self.q_low[1] // self.s

    @property
    def m(self) -> int:
        """Number of query cells."""
        return self.cells_hw[0] * self.cells_hw[1]

    @property
    def nk_low(self) -> int:
        """Number of low-resolution keys."""
        return self.kv_low[0] * self.kv_low[1]

    @property
    def cell_side(self) -> int:
        """Side of a cell in full-resolution pixels, s d."""
        return self.s * self.d

    @property
    def keys_per_cell(self) -> int:
        """Full-resolution keys each query attends to, κ d²."""
        return self.topk * self.d * self.d


def geometry_problems(
    q_hw: tuple[int, int],
    kv_hw: tuple[int, int],
    downsample: int | None,
    phase1_res: int | None,
    cell: int,
    topk: int,
) -> tuple[Geometry | None, list[str]]:
    """Resolve d and check every size; returns (geometry or None, problems)."""
    hq, wq = q_hw
    hk, wk = kv_hw
    if downsample is not None:
        d = downsample
    else:
        res = PIVOT_PHASE1_RES if phase1_res is None else phase1_res
        side = max(hq, wq)
        if res > side:
            return None, [
                f"phase1_res={res} is larger than the query map's longer side {side} "
                f"(q map {hq}x{wq}; allowed: a divisor of {side})"
            ]
        if side % res:
            return None, [
                f"phase1_res={res} does not divide the query map's longer side {side} "
                f"(d = {side} / {res} must be an integer; allowed: a divisor of {side})"
            ]
        d = side // res
    problems = []
    for what, size in (("height", hq), ("width", wq)):
        if size % d:
            problems.append(f"q map {what} {size} is not divisible by downsample d={d}")
    for what, size in (("height", hk), ("width", wk)):
        if size % d:
            problems.append(f"kv map {what} {size} is not divisible by downsample d={d}")
    if problems:
        return None, problems
    geom = Geometry(d=d, s=cell, topk=topk, q_hw=(hq, wq), kv_hw=(hk, wk))
    lh, lw = geom.q_low
    if cell > min(lh, lw):
        problems.append(
            f"cell={cell} is larger than the low-res query grid {lh}x{lw} (q map {hq}x{wq} / d={d})"
        )
    else:
        for what, size in (("height", hq), ("width", wq)):
            if size % (d * cell):
                problems.append(
                    f"q map {what} {size} is not divisible by d*s = {d}*{cell} = {d * cell}"
                )
    if topk > geom.nk_low:
        kh, kw = geom.kv_low
        problems.append(
            f"topk={topk} exceeds the {geom.nk_low} low-res keys "
            f"(kv map {hk}x{wk} / d={d} -> {kh}x{kw}; allowed: topk <= {geom.nk_low})"
        )
    return (None if problems else geom), problems


def kept_key_mask(keys: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """[B, H, Nq, Nk] bool: True where a query's cell kept the key's low-res block.

    ``keys`` [B, H, m, κ] are phase 1's low-res key indices; each stands for its d x d block of
    full-resolution keys, and every query of a cell attends to its cell's blocks.
    """
    b, h, m, topk = keys.shape
    d, (hq, wq), (hk, wk) = geom.d, geom.q_hw, geom.kv_hw
    kw = geom.kv_low[1]
    offsets = torch.arange(d, device=keys.device)
    rows = (keys // kw)[..., None, None] * d + offsets[:, None]  # (B, H, m, κ, d, 1)
    cols = (keys % kw)[..., None, None] * d + offsets  # (B, H, m, κ, 1, d)
    tokens = (rows * wk + cols).reshape(b, h, m, topk * d * d)  # (B, H, m, κ d²)
    cell_mask = torch.zeros(b, h, m, hk * wk, dtype=torch.bool, device=keys.device)
    cell_mask.scatter_(-1, tokens, True)
    side = geom.cell_side
    q_rows = torch.arange(hq, device=keys.device) // side
    q_cols = torch.arange(wq, device=keys.device) // side
    cell_of_query = (q_rows[:, None] * geom.cells_hw[1] + q_cols).reshape(-1)  # (Nq,)
    return cell_mask[:, :, cell_of_query]  # (B, H, Nq, Nk)


class GPABase(Attention):
    """Parameters, checks, cost and labels common to the GPA backends."""

    PARAMS = {
        "downsample": Param(None, int, low=1, optional=True, doc="d; default from phase1_res"),
        "phase1_res": Param(
            None, int, low=1, optional=True, doc="d = max(hq, wq) // phase1_res (default 64)"
        ),
        "cell": Param(2, int, low=1, doc="s: side of a query cell on the low-res grid"),
        "topk": Param(12, int, low=1, doc="κ: low-res keys kept per cell"),
        "affinity": Param("dot", str, choices=("dot", "euclid"), doc="similarity"),
        "scale": Param(None, float, low=0.0, optional=True, doc="default 1/sqrt(C)"),
    }
    NEEDS_SPATIAL = True

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.params["downsample"] is not None and self.params["phase1_res"] is not None:
            raise ValueError(
                f"{self.name}: give downsample or phase1_res, not both "
                f"(got downsample={self.params['downsample']}, "
                f"phase1_res={self.params['phase1_res']})"
            )

    def _resolve(self, spec: AttentionSpec) -> tuple[Geometry | None, list[str]]:
        p = self.params
        return geometry_problems(
            spec.q_hw, spec.kv_hw, p["downsample"], p["phase1_res"], p["cell"], p["topk"]
        )

    def geometry(self, spec: AttentionSpec) -> Geometry:
        """The resolved geometry for ``spec``; ValueError naming every problem."""
        geom, problems = self._resolve(spec)
        if geom is None:
            raise ValueError(f"{self.label}: " + "; ".join(problems))
        return geom

    def unsupported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if spec.q_hw is not None and spec.kv_hw is not None:
            reasons += self._resolve(spec)[1]
        return reasons

    def scale_for(self, channels: int) -> float:
        """The softmax scale: the ``scale`` parameter, else 1/sqrt(C)."""
        return channels**-0.5 if self.params["scale"] is None else self.params["scale"]

    def _label(self, d_text: str) -> str:
        p = self.params
        parts = [d_text, f"s={p['cell']}", f"k={p['topk']}"]
        if p["affinity"] != "dot":
            parts.append(p["affinity"])
        if p["scale"] is not None:
            parts.append(f"scale={p['scale']:g}")
        return f"{self.name}({','.join(parts)})"

    @property
    def label(self) -> str:
        """``gpa.torch(d=4,s=2,k=12)``, or ``res=64`` in place of d until a map fixes it."""
        p = self.params
        if p["downsample"] is not None:
            return self._label(f"d={p['downsample']}")
        return self._label(f"res={p['phase1_res'] or PIVOT_PHASE1_RES}")

    def label_for(self, spec: AttentionSpec) -> str:
        """The label with d resolved for ``spec`` (``gpa.torch(d=4,s=2,k=12)``)."""
        geom, _ = self._resolve(spec)
        return self.label if geom is None else self._label(f"d={geom.d}")

    def select_keys(self, q, k, geom: Geometry, scale: float):
        """Phase 1 as this backend runs it (``gpa.torch``'s unless a backend has its own)."""
        from attnbench.impls.gpa.pytorch import select_keys

        return select_keys(q, k, geom, self.params["affinity"], scale)

    def kept_keys(self, q, k, spec):
        # Every query keeps the d x d blocks of its cell's κ low-res keys.
        geom = self.geometry(spec)
        return kept_key_mask(self.select_keys(q, k, geom, self.scale_for(spec.channels)), geom)

    def dense_weights(self, q, k, spec):
        # Phase 2's softmax over each cell's kept keys, scattered over all keys (zeros elsewhere).
        scale = self.scale_for(spec.channels)
        mask = self.kept_keys(q, k, spec)  # (B, H, Nq, Nk)
        if self.params["affinity"] == "dot":
            scores = scale * torch.matmul(q, k.transpose(-2, -1))  # (B, H, Nq, Nk)
        else:
            scores = -scale * torch.cdist(q, k).square()  # (B, H, Nq, Nk)
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)

    def timed_parts(self, q, k, v, spec):
        geom = self.geometry(spec)
        scale = self.scale_for(spec.channels)
        return {"phase1": lambda: self.select_keys(q, k, geom, scale)}

    def phase_flops(self, spec: AttentionSpec) -> tuple[int, int]:
        """Useful forward FLOPs of (phase 1, phase 2) over all batches and heads.

        Phase 1: q' k'^T on the low-res grids, 2 (n/d²)(nk/d²) C (a multiply-add is 2 FLOPs).
        Phase 2: every full-res query against κ d² keys, 2 n κ d² C for the scores plus
        2 n κ d² Cv for the weighted values. Pooling and softmax are not counted. The euclid
        affinity's norms are O(n C) and not counted either.
        """
        geom = self.geometry(spec)
        bh = spec.batch * spec.heads
        n, nk = spec.q_tokens, spec.kv_tokens
        d2 = geom.d * geom.d
        phase1 = 2 * (n // d2) * (nk // d2) * spec.channels
        phase2 = 2 * n * geom.keys_per_cell * (spec.channels + spec.v_channels)
        return bh * phase1, bh * phase2

    def flops(self, spec: AttentionSpec, backward: bool = False) -> int:
        # Phase 1 runs without gradient; the backward of phase 2 costs two matmuls per forward
        # matmul (as for exact attention), so fwd+bwd = phase 1 + 3 x phase 2.
        phase1, phase2 = self.phase_flops(spec)
        return phase1 + (3 if backward else 1) * phase2

    def exact_params(self, spec: AttentionSpec) -> dict[str, Any]:
        # d = 1, s = 1 and κ = every key: each query keeps all keys, i.e. exact attention.
        return {"downsample": 1, "cell": 1, "topk": spec.kv_tokens, "affinity": "dot"}
