"""``neighborhood.torch``: neighbourhood attention in pure PyTorch (rule and parameters in
:mod:`attnbench.impls.neighborhood.common`).

The queries are cut into ``TILE`` x ``TILE`` tiles; the windows of a tile's queries lie in one
region of (t + k - 1)² keys, gathered once, so a tile attends to its region through SDPA with a
mask that keeps each query's own k² keys (the masked part is computed and thrown away: the price
of batched matmuls over per-query gathers). Bands of tile rows are processed one at a time, so
the working memory is one band's, at most ``BAND_ELEMENTS`` elements (or one tile row); with
gradients each band is checkpointed (recomputed in backward), so backward is bounded the same
way. With dilation δ, the δ² interleaved sub-grids are computed one after another, each without
dilation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attnbench.impls.common import HALF_DTYPES, compute_dtype, softmax_scale
from attnbench.impls.neighborhood.common import NeighbourhoodBase
from attnbench.registry import register
from attnbench.spec import HW, AttentionSpec

BAND_ELEMENTS = 1 << 24  # working elements of one band of tile rows
TILE = 8  # side of a query tile


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
