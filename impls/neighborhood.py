"""2-D neighbourhood attention (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023;
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

Backends:

- ``neighborhood.torch``: pure PyTorch. The queries are cut into ``TILE`` x ``TILE`` tiles; the
  windows of a tile's queries lie in one region of (t + k - 1)² keys, gathered once, so a tile
  attends to its region through SDPA with a mask that keeps each query's own k² keys (the masked
  part is computed and thrown away: the price of batched matmuls over per-query gathers).
  Bands of tile rows are processed one at a time, so the working memory is one band's, at most
  ``BAND_ELEMENTS`` elements (or one tile row); with gradients each band is checkpointed
  (recomputed in backward), so backward is bounded the same way. With dilation δ, the δ²
  interleaved sub-grids are computed one after another, each without dilation.
- ``neighborhood.flex``: FlexAttention with a block mask: the key blocks any query of a block
  can reach are found from the neighbourhood rule, and the rule itself is the mask function on
  those blocks. Compiled (``dynamic=False``), one compiled function and block mask per shape.
  On CPU the compiled kernel is forward-only; on CUDA forward and backward.
- ``neighborhood.natten``: NATTEN's own ``na2d`` (``pip install "attnbench[natten]"``). Without
  libnatten (a NATTEN build without CUDA), NATTEN runs FlexAttention eagerly, which materialises
  the full score matrix: forward-only and CPU-only here; on CUDA it needs libnatten's kernels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attnbench.impls.full import SCALE, softmax_scale
from attnbench.impls.gpa.flex import RECOMPILE_LIMIT
from attnbench.impls.nystrom import HALF_DTYPES, compute_dtype
from attnbench.registry import Attention, Param, register
from attnbench.spec import HW, AttentionSpec

BAND_ELEMENTS = 1 << 24  # working elements of one band of tile rows (neighborhood.torch)
TILE = 8  # side of a query tile (neighborhood.torch)
FLEX_BLOCK = 128  # FlexAttention query and key block size (tokens)


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


def tile_regions(length: int, kernel: int, tile: int, device=None):
    """Key regions of the query tiles along one axis (no dilation).

    The queries are cut into tiles of ``tile`` positions (the last one padded past the map).
    The windows of a tile's queries lie within ``span = min(tile + kernel - 1, length)``
    consecutive keys starting at ``region``; returns the region's key positions [tiles, span]
    and which of them each query sees [tiles, tile, span] (bool).
    """
    span = min(tile + kernel - 1, length)
    tiles = -(-length // tile)
    queries = torch.arange(tiles * tile, device=device).view(tiles, tile)
    starts = (queries - kernel // 2).clamp(0, length - kernel)  # padded queries: the last window
    region = starts[:, 0].clamp(max=length - span)
    keys = region[:, None] + torch.arange(span, device=device)  # (tiles, span)
    first = starts[..., None]  # (tiles, tile, 1)
    return keys, (keys[:, None, :] >= first) & (keys[:, None, :] < first + kernel)


def tile_plan(hw: HW, kernel: int) -> tuple[int, int, int, int, int]:
    """(tile side t, tile rows, tile columns, region rows, region columns) on a map."""
    t = min(TILE, max(hw))
    return t, -(-hw[0] // t), -(-hw[1] // t), min(t + kernel - 1, hw[0]), min(t + kernel - 1, hw[1])


def tile_row_elements(hw: HW, kernel: int, bh: int, c: int, cv: int) -> int:
    """Working elements of one row of tiles: key and value regions, scores, probabilities."""
    t, _, cols, span_r, span_c = tile_plan(hw, kernel)
    region = span_r * span_c
    return bh * cols * (region * (c + cv) + 3 * t * t * region + t * t * (c + cv))


def band_tile_rows(hw: HW, kernel: int, bh: int, c: int, cv: int) -> int:
    """Rows of tiles per band: as many as fit ``BAND_ELEMENTS`` (at least one)."""
    return max(1, BAND_ELEMENTS // tile_row_elements(hw, kernel, bh, c, cv))


def _tile_band(q_tiles, k, v, tokens, sees, scale):
    # q_tiles [B, H, r, c, t², C]; k, v [B, H, h*w, C|Cv]; tokens [r, c, R]: the key tokens of
    # each tile's region; sees [r, c, t², R]: which of them each of the tile's queries sees.
    b, heads, rows, cols, t2, c = q_tiles.shape
    cv, region = v.shape[-1], tokens.shape[-1]
    index = tokens.reshape(-1)
    keys = k.index_select(2, index).view(b * heads, rows * cols, region, c)
    values = v.index_select(2, index).view(b * heads, rows * cols, region, cv)
    out = F.scaled_dot_product_attention(
        q_tiles.reshape(b * heads, rows * cols, t2, c),
        keys,
        values,
        attn_mask=sees.reshape(rows * cols, t2, region),
        scale=scale,
    )
    return out.view(b, heads, rows, cols, t2, cv)


def _undilated(q, k, v, kernel: int, scale: float):
    # q, k [B, H, h, w, C], v [B, H, h, w, Cv] (maybe strided views) -> [B, H, h, w, Cv].
    b, heads, h, w, c = q.shape
    cv = v.shape[-1]
    t, tile_rows, tile_cols, _, _ = tile_plan((h, w), kernel)
    key_rows, see_rows = tile_regions(h, kernel, t, q.device)  # (r, sr), (r, t, sr)
    key_cols, see_cols = tile_regions(w, kernel, t, q.device)  # (c, sc), (c, t, sc)
    tokens = key_rows[:, None, :, None] * w + key_cols[None, :, None, :]  # (r, c, sr, sc)
    tokens = tokens.reshape(tile_rows, tile_cols, -1)
    padded = F.pad(q, (0, 0, 0, tile_cols * t - w, 0, tile_rows * t - h))
    q_tiles = padded.view(b, heads, tile_rows, t, tile_cols, t, c).permute(0, 1, 2, 4, 3, 5, 6)
    q_tiles = q_tiles.reshape(b, heads, tile_rows, tile_cols, t * t, c)
    k, v = k.reshape(b, heads, h * w, c), v.reshape(b, heads, h * w, cv)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    step = band_tile_rows((h, w), kernel, b * heads, c, cv)
    bands = []
    for top in range(0, tile_rows, step):
        band = slice(top, top + step)
        sees = see_rows[band, None, :, None, :, None] & see_cols[None, :, None, :, None, :]
        sees = sees.reshape(*tokens[band].shape[:2], t * t, -1)  # (r, c, t², sr sc)
        args = (q_tiles[:, :, band], k, v, tokens[band], sees, scale)
        bands.append(
            checkpoint(_tile_band, *args, use_reentrant=False) if grad else _tile_band(*args)
        )
    out = torch.cat(bands, dim=2).view(b, heads, tile_rows, tile_cols, t, t, cv)
    out = out.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, heads, tile_rows * t, tile_cols * t, cv)
    return out[:, :, :h, :w]


def neighbourhood_attention(q, k, v, hw: HW, kernel: int, dilation: int, scale: float):
    """Neighbourhood attention of q, k [B, H, N, C], v [B, H, N, Cv] -> [B, H, N, Cv].

    Without dilation: each tile of t x t queries attends to the region of keys that holds all
    their windows, masked to each query's own kernel² keys (one SDPA call per band of tile rows,
    checkpointed when gradients are needed). With dilation δ, each of the δ² interleaved
    sub-grids is a non-dilated neighbourhood of its own.
    """
    b, heads, n, _ = q.shape
    h, w = hw
    cv = v.shape[-1]
    q, k, v = (x.reshape(b, heads, h, w, x.shape[-1]) for x in (q, k, v))
    if dilation == 1:
        return _undilated(q, k, v, kernel, scale).reshape(b, heads, n, cv)
    out = v.new_empty(b, heads, h, w, cv)
    for r in range(dilation):
        for c in range(dilation):
            sub = (slice(None), slice(None), slice(r, None, dilation), slice(c, None, dilation))
            out[sub] = _undilated(q[sub], k[sub], v[sub], kernel, scale)
    return out.reshape(b, heads, n, cv)


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

    def dense_weights(self, q, k, spec):
        # Softmax over each query's kernel² keys, zeros elsewhere.
        p = self.params
        mask = neighbourhood_mask(spec.q_hw, p["kernel"], p["dilation"], q.device)
        scale = softmax_scale(p["scale"], spec.channels)
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


@register("neighborhood.torch")
class NeighbourhoodTorch(NeighbourhoodBase):
    """Neighbourhood attention in PyTorch: query tiles against their key regions, in bands."""

    def forward(self, q, k, v, spec):
        p = self.params
        dtype = compute_dtype(q.dtype)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        scale = softmax_scale(p["scale"], spec.channels)
        out = neighbourhood_attention(q, k, v, spec.q_hw, p["kernel"], p["dilation"], scale)
        return out.to(spec.dtype)  # (B, H, N, Cv)

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        # One band of the largest sub-grid (its key and value regions, scores, probabilities
        # and mask), the padded tiled queries, the bands' outputs and their un-tiled copy (and
        # with dilation the assembled output). Half inputs are copied to float32 and the output
        # cast back. Backward recomputes one band at a time and adds that band's gradients, a
        # full-size gradient of k and v per band (index_select's backward) and the input
        # gradients.
        kernel, dilation = self.params["kernel"], self.params["dilation"]
        elem = torch.empty((), dtype=compute_dtype(spec.dtype)).element_size()
        bh, n, c, cv = spec.batch * spec.heads, spec.q_tokens, spec.channels, spec.v_channels
        inputs = bh * n * (2 * c + cv) * elem
        upcast = inputs + spec.output_bytes if spec.dtype in HALF_DTYPES else 0
        sub = tuple(-(-side // dilation) for side in spec.q_hw)
        t, tile_rows, tile_cols, _, _ = tile_plan(sub, kernel)
        rows = min(band_tile_rows(sub, kernel, bh, c, cv), tile_rows)
        band = rows * tile_row_elements(sub, kernel, bh, c, cv) * elem
        padded = bh * tile_rows * tile_cols * t * t * (c + 2 * cv) * elem
        outputs = (2 if dilation > 1 else 1) * bh * n * cv * elem
        if not backward:
            return upcast + band + padded + outputs
        kv_grad = bh * n * (c + cv) * elem
        return upcast + 2 * band + padded + outputs + kv_grad + inputs


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


NATTEN_WARNINGS = ("flex_attention called without torch.compile", "return_lse is deprecated")


@register("neighborhood.natten")
class NeighbourhoodNatten(NeighbourhoodBase):
    """NATTEN's ``na2d`` (its own kernels with libnatten; eager FlexAttention without)."""

    REQUIRES = ("natten",)
    INSTALL_HINT = 'pip install "attnbench[natten]"'
    BACKWARD_DEVICES = ("cuda",)
    BACKWARD_LIMIT = (
        "NATTEN runs FlexAttention eagerly on the CPU, forward-only; on cuda it needs libnatten"
    )
    DTYPES = (torch.float16, torch.bfloat16, torch.float32)

    @classmethod
    def availability(cls, device: str) -> list[str]:
        reasons = super().availability(device)
        if device == "cuda" and not reasons and not cls.has_libnatten():
            reasons.append(
                "device=cuda needs NATTEN's CUDA kernels (libnatten), which this natten build "
                "lacks (allowed: natten built with CUDA, or device=cpu)"
            )
        return reasons

    @staticmethod
    def has_libnatten() -> bool:
        import natten

        return bool(natten.HAS_LIBNATTEN)

    def unsupported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if self.params["kernel"] == 1:
            reasons.append(
                "kernel=1 (NATTEN's na2d needs kernel >= 2; allowed: an odd kernel >= 3)"
            )
        if not self.availability(spec.device) and (
            spec.device == "cpu" or not self.has_libnatten()
        ):
            c, cv = spec.channels, spec.v_channels
            if c != cv or c & (c - 1) or not 8 <= c <= 512:
                reasons.append(
                    f"C={c}, Cv={cv} (NATTEN's FlexAttention backend, used without libnatten, "
                    "needs C == Cv, a power of two in [8, 512])"
                )
        return reasons

    def forward(self, q, k, v, spec):
        from natten import na2d

        p = self.params
        b, heads, n, _ = q.shape
        h, w = spec.q_hw

        def heads_last(t):  # [B, H, N, C] -> [B, h, w, H, C]
            return t.reshape(b, heads, h, w, t.shape[-1]).permute(0, 2, 3, 1, 4).contiguous()

        with warnings.catch_warnings():
            for message in NATTEN_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            out = na2d(
                heads_last(q),
                heads_last(k),
                heads_last(v),
                kernel_size=p["kernel"],
                dilation=p["dilation"],
                scale=softmax_scale(p["scale"], spec.channels),
            )  # (B, h, w, H, Cv)
        return out.permute(0, 3, 1, 2, 4).reshape(b, heads, n, spec.v_channels)

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        # Heads-last copies of q, k, v and of the output. On the CPU NATTEN's eager
        # FlexAttention materialises the N x N scores, masked scores and probabilities and
        # evaluates the mask over all N x N pairs (a bool and int64 indices per pair); on CUDA
        # libnatten's fused kernels keep one float32 log-sum-exp per query, and backward adds
        # the input gradients.
        bh, n = spec.batch * spec.heads, spec.q_tokens
        copies = spec.input_bytes + 2 * spec.output_bytes
        if spec.device == "cpu":
            return copies + 3 * bh * n * n * spec.element_size + n * n * (1 + 2 * 8)
        return copies + bh * n * 4 + (spec.input_bytes if backward else 0)
