"""Nyströmformer attention (Xiong et al., "Nyströmformer: A Nyström-Based Algorithm for
Approximating Self-Attention", AAAI 2021), registered as ``nystrom.torch``.

With landmark queries Q~ [Lq, C], landmark keys K~ [Lk, C] and s the softmax scale,

    softmax(s Q K^T) V  ~  F A^+ (B V),   F = softmax(s Q K~^T)   [Nq, Lk]
                                          A = softmax(s Q~ K~^T)  [Lq, Lk]
                                          B = softmax(s Q~ K^T)   [Lq, Nk]

and A^+ by the paper's iterative Moore-Penrose scheme (Razavi et al. 2014):
Z0 = A^T / (||A||_1 ||A||_inf), Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z))). The products are
taken right to left, F (Z (B V)), so no Nq x Lq or Nq x Nk matrix is ever formed.

Decisions:

- Segment landmarks (``landmark_mode="segments"``, the paper's): the token sequence of n tokens is
  partitioned into L contiguous segments with boundaries floor(i n / L), i = 0..L; segment sizes
  are floor(n/L) or ceil(n/L), spread evenly over the sequence; every token lies in exactly one
  segment and each landmark is the mean over its own segment's size. Nothing is padded or
  truncated (the released code needs n % L == 0; the PyPI package pads with zeros that enter
  the first means).
- Landmarks per side: query landmarks come from q, key landmarks from k, and L is capped per side:
  Lq = min(L, Nq), Lk = min(L, Nk). Under cross-attention A is Lq x Lk (rectangular); the
  iteration converges to the Moore-Penrose inverse for any shape because Z0 is a multiple of A^T.
  A per-side cap keeps the requested budget on the larger side and makes the method exact as
  soon as both sides are covered (next point).
- ``landmark_mode="pool2d"`` (for images): the map (h, w) is cut into a grid of lh x lw
  rectangular tiles and each landmark is the mean of its tile (tiles listed row-major). The grid
  follows the map's aspect with lh * lw <= L: lh = round(sqrt(L h / w)) clipped to [1, h],
  lw = min(w, L // lh), then lh = min(h, L // lw); when L >= h w the grid is the map itself.
  Rows and columns are split like segments (floor boundaries), so tiles partition the map and
  every pixel is in exactly one tile; on a map that tiles evenly this is
  ``adaptive_avg_pool2d``, and on a 1-row map it equals segment landmarks. (adaptive_avg_pool2d
  itself lets neighbouring tiles overlap by a pixel when sizes do not divide; a partition is
  used instead so both modes share one rule.) It needs q_hw and kv_hw.
- Exactness: when Lq = Nq and Lk = Nk the landmarks are the tokens in order, so F = A = B = S =
  softmax(s Q K^T) and F A^+ B = S S^+ S = S (a Penrose identity, any shape or rank). Six
  iterations do not reach S^+ for the ill-conditioned S of peaked attention: a singular
  direction sigma of S starts at x = sigma^2 / (||S||_1 ||S||_inf), grows about 3.25x per
  iteration while small, and leaves an output error of up to sigma(1 - x); six iterations only
  settle sigma^2 > ||S||_1 / 1000 or so. So in that case this implementation computes exact
  softmax attention directly (``F.scaled_dot_product_attention``, in the compute dtype) - the
  value the formula equals - rather than the formula with an unconverged inverse. The formula
  itself (:func:`nystrom_attention`) is tested to converge to exact attention with more
  iterations.
- Initial scale per (batch, head): ||A||_1 and ||A||_inf (max column and row sums of |A|) are
  taken per matrix, not as the max over the whole batch and all heads as in the released code
  (a reported bug: a global scale needs about 12 iterations where a per-matrix one needs 6).
- Precision: for float16/bfloat16 inputs, landmarks, the three softmax kernels, the
  pseudo-inverse and every product are computed in float32 and the output is cast back;
  float32/float64 inputs are computed in their own dtype.
- Gradients flow through the landmarks, the kernels and every pseudo-inverse iteration
  (including the initial scale), as in the released code.
- The optional depthwise-convolution skip on values (kernel 33-35 in the paper's configs) is left
  out: it adds trainable parameters, and this registry benchmarks the attention operator alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from attnbench.impls.common import HALF_DTYPES, SCALE, compute_dtype, softmax_scale
from attnbench.registry import Attention, Param, register
from attnbench.spec import HW, AttentionSpec


def segment_ids(n: int, segments: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Segment index of each of ``n`` tokens, segments bounded by floor(i n / segments).

    Token t is in segment i iff floor(i n / L) <= t < floor((i + 1) n / L), i.e.
    i = floor(((t + 1) L - 1) / n).
    """
    t = torch.arange(n, device=device)
    return torch.div((t + 1) * segments - 1, n, rounding_mode="floor")


def segment_sizes(n: int, segments: int) -> list[int]:
    """Sizes of the ``segments`` contiguous segments of ``n`` tokens (floor(n/L) or ceil(n/L))."""
    return [(i + 1) * n // segments - i * n // segments for i in range(segments)]


def segment_means(x: torch.Tensor, segments: int, dim: int) -> torch.Tensor:
    """Means of ``x`` over ``segments`` contiguous segments along ``dim`` (floor boundaries).

    Every element lies in exactly one segment and each mean divides by its own segment's size.
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    if not 1 <= segments <= n:
        raise ValueError(f"segments={segments} is not allowed for {n} tokens (allowed: 1..{n})")
    if n % segments == 0:  # equal segments: one reshape
        shape = x.shape[:dim] + (segments, n // segments) + x.shape[dim + 1 :]
        return x.reshape(shape).mean(dim=dim + 1)
    ids = segment_ids(n, segments, x.device)
    sums = x.new_zeros(x.shape[:dim] + (segments,) + x.shape[dim + 1 :]).index_add(dim, ids, x)
    sizes = torch.tensor(segment_sizes(n, segments), dtype=x.dtype, device=x.device)
    return sums / sizes.view((segments,) + (1,) * (x.dim() - dim - 1))


def pool2d_grid(landmarks: int, hw: HW) -> HW:
    """The lh x lw tile grid (lh * lw <= landmarks) that follows the map's aspect."""
    h, w = hw
    if landmarks >= h * w:
        return h, w
    lh = min(h, max(1, round(math.sqrt(landmarks * h / w))))
    lw = min(w, max(1, landmarks // lh))
    lh = min(h, max(1, landmarks // lw))
    return lh, lw


def pool2d_means(x: torch.Tensor, hw: HW, grid: HW) -> torch.Tensor:
    """Tile means of x [B, H, h*w, C] (row-major pixels) over a grid -> [B, H, lh*lw, C]."""
    b, heads, n, c = x.shape
    h, w = hw
    lh, lw = grid
    tiles = segment_means(x.reshape(b, heads, h, w, c), lw, dim=3)  # (B, H, h, lw, C)
    tiles = segment_means(tiles, lh, dim=2)  # (B, H, lh, lw, C)
    return tiles.reshape(b, heads, lh * lw, c)


def iterative_pinv(a: torch.Tensor, iters: int) -> torch.Tensor:
    """Moore-Penrose inverse of each matrix a [..., m, n] by ``iters`` hyper-power iterations.

    Z0 = a^T / (||a||_1 ||a||_inf) per matrix (so sigma_max^2 Z0-scale <= 1 and every singular
    direction converges monotonically), then Z <- 1/4 Z (13 I - aZ (15 I - aZ (7 I - aZ))):
    third-order convergence, 1 - x' = (1 - x)^3 (4 - x) / 4 per direction.
    """
    abs_a = a.abs()
    norm_1 = abs_a.sum(dim=-2).amax(dim=-1)  # (...,) max column sum
    norm_inf = abs_a.sum(dim=-1).amax(dim=-1)  # (...,) max row sum
    z = a.transpose(-2, -1) / (norm_1 * norm_inf)[..., None, None]  # (..., n, m)
    eye = torch.eye(a.shape[-2], dtype=a.dtype, device=a.device)  # (m, m)
    for _ in range(iters):
        az = torch.matmul(a, z)  # (..., m, m)
        inner = torch.matmul(az, 15 * eye - torch.matmul(az, 7 * eye - az))
        z = 0.25 * torch.matmul(z, 13 * eye - inner)  # (..., n, m)
    return z


def nystrom_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_landmarks: torch.Tensor,
    k_landmarks: torch.Tensor,
    scale: float,
    pinv_iters: int,
) -> torch.Tensor:
    """F A^+ (B v) for given landmarks (the Nyström formula, no shortcut); one dtype throughout.

    Args:
        q: [B, H, Nq, C]; k: [B, H, Nk, C]; v: [B, H, Nk, Cv].
        q_landmarks: [B, H, Lq, C]; k_landmarks: [B, H, Lk, C].
        scale: softmax scale s.
        pinv_iters: iterations of :func:`iterative_pinv`.

    Returns:
        [B, H, Nq, Cv].
    """
    q_land_scaled = q_landmarks * scale  # (B, H, Lq, C)
    kernel_b = torch.matmul(q_land_scaled, k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, Lq, Nk)
    bv = torch.matmul(kernel_b, v)  # (B, H, Lq, Cv)
    del kernel_b
    kernel_a = torch.matmul(q_land_scaled, k_landmarks.transpose(-2, -1)).softmax(dim=-1)
    z = iterative_pinv(kernel_a, pinv_iters)  # (B, H, Lk, Lq)
    del kernel_a
    weights = torch.matmul(z, bv)  # (B, H, Lk, Cv)
    del z, bv
    kernel_f = torch.matmul(q, (k_landmarks * scale).transpose(-2, -1)).softmax(dim=-1)
    return torch.matmul(kernel_f, weights)  # (B, H, Nq, Cv)


@register("nystrom.torch")
class NystromAttention(Attention):
    """Nyströmformer: segment-mean (or 2-D tile-mean) landmarks, iterative pseudo-inverse."""

    PARAMS = {
        "landmarks": Param(256, int, low=1, doc="L: landmarks per side (capped by its tokens)"),
        "landmark_mode": Param(
            "segments",
            str,
            choices=("segments", "pool2d"),
            doc="segment means of the sequence, or tile means of the 2-D map",
        ),
        "pinv_iters": Param(6, int, low=1, high=100, doc="pseudo-inverse iterations"),
        "scale": SCALE,
    }

    def _side(self, tokens: int, hw: HW | None) -> tuple[int, HW | None]:
        """(landmark count, tile grid or None) of one side."""
        landmarks = self.params["landmarks"]
        if self.params["landmark_mode"] == "pool2d":
            if hw is None:
                raise ValueError(
                    f"{self.label}: landmark_mode='pool2d' needs the map shapes q_hw and kv_hw"
                )
            grid = pool2d_grid(landmarks, hw)
            return grid[0] * grid[1], grid
        return min(landmarks, tokens), None

    def landmark_counts(self, spec: AttentionSpec) -> tuple[int, int]:
        """(Lq, Lk): landmarks actually used for queries and keys."""
        return self._side(spec.q_tokens, spec.q_hw)[0], self._side(spec.kv_tokens, spec.kv_hw)[0]

    def covers_all_tokens(self, spec: AttentionSpec) -> bool:
        """Whether the landmarks are the tokens themselves (then the output is exact)."""
        return self.landmark_counts(spec) == (spec.q_tokens, spec.kv_tokens)

    def _landmarks(self, x: torch.Tensor, hw: HW | None) -> torch.Tensor:
        count, grid = self._side(x.shape[2], hw)
        if grid is not None:
            return pool2d_means(x, hw, grid)
        return segment_means(x, count, dim=2)

    def forward(self, q, k, v, spec):
        scale = softmax_scale(self.params["scale"], spec.channels)
        dtype = compute_dtype(q.dtype)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        if self.covers_all_tokens(spec):  # F A^+ B = S S^+ S = S: exact attention
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            q_landmarks = self._landmarks(q, spec.q_hw)  # (B, H, Lq, C)
            k_landmarks = self._landmarks(k, spec.kv_hw)  # (B, H, Lk, C)
            out = nystrom_attention(
                q, k, v, q_landmarks, k_landmarks, scale, self.params["pinv_iters"]
            )
        return out.to(spec.dtype)  # (B, H, Nq, Cv)

    def dense_weights(self, q, k, spec):
        # The implied matrix F A^+ B [B, H, Nq, Nk] (softmax(q k^T) when landmarks are tokens).
        scale = softmax_scale(self.params["scale"], spec.channels)
        dtype = compute_dtype(q.dtype)
        q, k = q.to(dtype), k.to(dtype)
        if self.covers_all_tokens(spec):
            return (scale * torch.matmul(q, k.transpose(-2, -1))).softmax(dim=-1).to(spec.dtype)
        q_land = self._landmarks(q, spec.q_hw) * scale  # (B, H, Lq, C)
        k_land = self._landmarks(k, spec.kv_hw)  # (B, H, Lk, C)
        kernel_f = torch.matmul(q * scale, k_land.transpose(-2, -1)).softmax(dim=-1)  # (., Nq, Lk)
        kernel_a = torch.matmul(q_land, k_land.transpose(-2, -1)).softmax(dim=-1)  # (., Lq, Lk)
        kernel_b = torch.matmul(q_land, k.transpose(-2, -1)).softmax(dim=-1)  # (., Lq, Nk)
        z = iterative_pinv(kernel_a, self.params["pinv_iters"])  # (B, H, Lk, Lq)
        return torch.matmul(torch.matmul(kernel_f, z), kernel_b).to(spec.dtype)

    def unsupported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if self.params["landmark_mode"] == "pool2d" and (spec.q_hw is None or spec.kv_hw is None):
            reasons.append(
                f"landmark_mode='pool2d' needs both map shapes, got q_hw={spec.q_hw}, "
                f"kv_hw={spec.kv_hw} (allowed: pass q_hw and kv_hw, or landmark_mode='segments')"
            )
        return reasons

    def _label(self, mode_text: str) -> str:
        p = self.params
        parts = [f"L={p['landmarks']}"]
        if mode_text:
            parts.append(mode_text)
        if p["pinv_iters"] != self.PARAMS["pinv_iters"].default:
            parts.append(f"iters={p['pinv_iters']}")
        if p["scale"] is not None:
            parts.append(f"scale={p['scale']:g}")
        return f"{self.name}({','.join(parts)})"

    @property
    def label(self) -> str:
        """``nystrom.torch(L=256)``; ``pool2d``, ``iters=`` and ``scale=`` when set."""
        return self._label("pool2d" if self.params["landmark_mode"] == "pool2d" else "")

    def label_for(self, spec: AttentionSpec) -> str:
        """The label with the pool2d tile grids resolved (``pool2d=16x16`` or ``16x16|8x8``)."""
        if self.params["landmark_mode"] != "pool2d" or spec.q_hw is None or spec.kv_hw is None:
            return self.label
        q_grid = pool2d_grid(self.params["landmarks"], spec.q_hw)
        k_grid = pool2d_grid(self.params["landmarks"], spec.kv_hw)
        text = f"{q_grid[0]}x{q_grid[1]}"
        if k_grid != q_grid:
            text += f"|{k_grid[0]}x{k_grid[1]}"
        return self._label(f"pool2d={text}")

    def flops(self, spec: AttentionSpec, backward: bool = False) -> int:
        """Useful FLOPs (multiply-add = 2; landmark means, softmax and Z0 not counted).

        Per (batch, head), with Lq, Lk the landmarks used and I the pinv iterations:
          kernels   2 C (Nq Lk + Lq Lk + Lq Nk)        (s Q K~^T, s Q~ K~^T, s Q~ K^T)
          pinv      I (4 Lq^2 Lk + 4 Lq^3)             (A Z; AZ (7I - AZ); AZ (15I - ...);
                                                        Z (13I - ...))
          products  2 Cv (Lq Nk + Lk Lq + Nq Lk)       (B V, Z (B V), F (Z B V))
        Every matmul has two operands that need gradients, so fwd+bwd = 3 x fwd. When the
        landmarks cover all tokens, exact attention runs and the base's count applies.
        """
        if self.covers_all_tokens(spec):
            return super().flops(spec, backward)
        lq, lk = self.landmark_counts(spec)
        nq, nk, c, cv = spec.q_tokens, spec.kv_tokens, spec.channels, spec.v_channels
        kernels = 2 * c * (nq * lk + lq * lk + lq * nk)
        pinv = self.params["pinv_iters"] * (4 * lq * lq * lk + 4 * lq**3)
        products = 2 * cv * (lq * nk + lk * lq + nq * lk)
        fwd = spec.batch * spec.heads * (kernels + pinv + products)
        return 3 * fwd if backward else fwd

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        """Analytic peak bytes beyond the inputs (tensors live at the peak; see comments)."""
        bh = spec.batch * spec.heads
        nq, nk, c, cv = spec.q_tokens, spec.kv_tokens, spec.channels, spec.v_channels
        elem = torch.empty((), dtype=compute_dtype(spec.dtype)).element_size()
        # Half inputs are copied to float32 (q, k, v) and the float32 output is cast back.
        upcast = 0
        if spec.dtype in HALF_DTYPES:
            upcast = bh * (nq * c + nk * (c + cv) + nq * cv) * elem
        out = spec.output_bytes
        if self.covers_all_tokens(spec):
            # SDPA: output and one fp32 log-sum-exp per query; backward adds input gradients.
            lse = bh * nq * 4
            grads = bh * (nq * c + nk * (c + cv)) * elem if backward else 0
            return upcast + out + lse + grads
        lq, lk = self.landmark_counts(spec)
        iters = self.params["pinv_iters"]
        landmarks = (lq + lk) * c
        if not backward:
            # One phase at a time is alive besides the landmarks: scores + probabilities of B
            # then B V; A, old and new Z and three Lq x Lq temporaries of an iteration; scores +
            # probabilities of F, Z B V and the output.
            phase_b = 2 * lq * nk + lq * cv
            phase_a = lq * cv + 2 * lq * lk + 2 * lk * lq + 3 * lq * lq
            phase_f = lk * cv + 2 * nq * lk + nq * cv
            per_bh = landmarks + max(phase_b, phase_a, phase_f)
            return upcast + out + bh * per_bh * elem
        # Autograd keeps the landmarks, the three probability matrices, per iteration A Z and
        # the three bracketed Lq x Lq factors plus Z, and B V, Z B V, the output; backward adds
        # the gradient of the largest kernel (scores and probabilities) and the input gradients.
        saved = (
            landmarks
            + nq * lk
            + lq * lk
            + lq * nk
            + iters * (4 * lq * lq + lk * lq)
            + lq * cv
            + lk * cv
            + nq * cv
        )
        transient = 2 * max(nq * lk, lq * nk)
        grads = nq * c + nk * (c + cv)
        return upcast + out + bh * (saved + transient + grads) * elem

    def exact_params(self, spec: AttentionSpec) -> dict[str, Any]:
        # One landmark per token on both sides: F A^+ B = S S^+ S = S, computed exactly.
        return {"landmarks": max(spec.q_tokens, spec.kv_tokens), "landmark_mode": "segments"}
