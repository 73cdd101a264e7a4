"""Performer FAVOR+ attention (Choromanski et al., "Rethinking Attention with Performers",
ICLR 2021), registered as ``performer.torch``.

The softmax kernel exp(s q.k) is estimated with m positive random features: with inputs scaled
by sqrt(s) (s = 1/sqrt(C) by default, i.e. x' = C^-1/4 x) and w_1..w_m ~ N(0, I_C),

    phi(x) = (exp(w_i . x' - |x'|^2 / 2 - stabiliser) + eps) / sqrt(m),   eps = 1e-4,

E_w[exp(w.q' - |q'|^2/2) exp(w.k' - |k'|^2/2)] = exp(q'.k') = exp(s q.k), and the output is

    out = phi(Q) (phi(K)^T V) / (phi(Q) (phi(K)^T 1)),

linear in Nq and Nk; no Nq x Nk matrix is formed.

Decisions:

- Stabilisers as in google-research's fast_attention and lucidrains' performer-pytorch: for
  queries the max of w.q' over the features of each query row, for keys one max of w.k' over all
  keys and features of a (batch, head). They are constants of a row (queries) or of the whole
  numerator and denominator (keys), so they cancel in the ratio up to eps; they are detached.
  The 1/sqrt(m) factor is folded into the exponent (log) so the features take one tensor.
- Orthogonal features (``orthogonal=True``): ceil(m / C) independent C x C Gaussian matrices are
  QR-factorised; the signs of R's diagonal are folded into Q so that Q is Haar-distributed (without
  this the directions are not uniform and the estimator is biased); the rows of the blocks are
  stacked and the last block truncated to m rows; each row is rescaled by the norm of an
  independent C-dimensional Gaussian vector (chi with C degrees of freedom), so every row is
  marginally N(0, I) - the estimate stays unbiased - while rows within a block are orthogonal.
  ``orthogonal=False`` draws iid Gaussian rows.
- Randomness: matrices are drawn in float64 on the CPU from a ``torch.Generator`` seeded with
  ``seed``, then moved to the inputs' device in the compute dtype, so one seed gives the same
  matrix on every device and dtype. ``redraw="never"`` (default): one matrix per channel count,
  drawn from a fresh generator seeded with ``seed`` - every call and every instance with that
  seed uses the same features ("same seed, same output"). ``redraw="every_call"`` (google's
  default): the instance owns a generator seeded with ``seed`` at construction and draws the next
  matrix on each call, so outputs change between calls and a new instance replays the sequence.
  The matrix of the latest call is kept as ``last_projection`` (float64, CPU).
- Precision: for float16/bfloat16 inputs the features, the feature sums phi(K)^T V and phi(K)^T 1
  and the ratio are computed in float32 (fp16 key sums overflow otherwise; fast-transformers #32);
  the output is cast back. float32/float64 inputs are computed in their own dtype.
- No configuration of FAVOR+ is exact attention, so ``exact_params`` returns None; the harness
  measures its fidelity instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnbench.impls.common import HALF_DTYPES, SCALE, compute_dtype, softmax_scale
from attnbench.registry import Attention, Param, register
from attnbench.spec import AttentionSpec

EPS = 1e-4


def draw_projection(
    features: int, channels: int, orthogonal: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random feature matrix W [features, channels], float64 on the CPU, rows marginally N(0, I).

    Orthogonal: stacked rows of Haar-orthogonal C x C blocks, each row rescaled by the norm of an
    independent Gaussian vector; otherwise iid Gaussian rows.
    """
    if not orthogonal:
        return torch.randn(features, channels, generator=generator, dtype=torch.float64)
    blocks = math.ceil(features / channels)
    gaussian = torch.randn(blocks, channels, channels, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)  # (blocks, C, C) each
    signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(torch.float64)
    q = q * signs[:, None, :]  # Haar: column j times sign(R_jj)
    directions = q.transpose(-2, -1).reshape(blocks * channels, channels)[:features]  # (m, C)
    norms = torch.randn(features, channels, generator=generator, dtype=torch.float64).norm(dim=1)
    return directions * norms[:, None]  # (m, C)


def positive_features(
    x: torch.Tensor,
    projection: torch.Tensor,
    input_scale: float,
    is_query: bool,
    eps: float = EPS,
    stabilise: bool = True,
) -> torch.Tensor:
    """FAVOR+ features phi(x) [B, H, N, m] of x [B, H, N, C] (see the module docstring).

    Args:
        x: queries or keys.
        projection: W [m, C] in x's dtype and device.
        input_scale: x' = input_scale * x (C^-1/4 for the standard softmax scale).
        is_query: stabiliser per row (queries) or one per (batch, head) (keys).
        eps: added to every feature before the 1/sqrt(m) factor.
        stabilise: subtract the stabiliser (off only to test the raw estimator).
    """
    m = projection.shape[0]
    dash = torch.matmul(x, (projection * input_scale).T)  # (B, H, N, m): w . x'
    half_sq = (x * x).sum(dim=-1, keepdim=True) * (input_scale**2 / 2)  # (B, H, N, 1): |x'|^2/2
    shift = half_sq + 0.5 * math.log(m)  # exp(. - log sqrt(m)) = exp(.) / sqrt(m)
    if stabilise:
        with torch.no_grad():  # a detached constant; add it outside so half_sq keeps its grad
            stabiliser = dash.amax(dim=-1 if is_query else (-2, -1), keepdim=True)  # (B,H,N|1,1)
        shift = shift + stabiliser
    # In place: matmul and sub do not keep this tensor for backward; exp_ keeps its result.
    phi = dash.sub_(shift).exp_()  # (B, H, N, m)
    floor = eps / math.sqrt(m)
    return phi + floor if phi.requires_grad else phi.add_(floor)


@register("performer.torch")
class PerformerAttention(Attention):
    """FAVOR+ positive orthogonal random features (Performer)."""

    PARAMS = {
        "features": Param(256, int, low=1, doc="m: random features"),
        "orthogonal": Param(True, bool, doc="orthogonal blocks (else iid Gaussian rows)"),
        "redraw": Param(
            "never", str, choices=("never", "every_call"), doc="when to draw a new matrix"
        ),
        "seed": Param(0, int, low=0, doc="seed of the random feature matrix"),
        "scale": SCALE,
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._generator = torch.Generator().manual_seed(self.params["seed"])
        self._fixed: dict[int, torch.Tensor] = {}  # channels -> float64 CPU matrix
        self._placed: dict[tuple, torch.Tensor] = {}  # (channels, device, dtype) -> matrix
        self.last_projection: torch.Tensor | None = None

    def projection(self, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The matrix W [m, C] for this call, on ``device`` in ``dtype``."""
        p = self.params
        if p["redraw"] == "every_call":
            master = draw_projection(p["features"], channels, p["orthogonal"], self._generator)
            self.last_projection = master
            return master.to(device=device, dtype=dtype)
        if channels not in self._fixed:
            generator = torch.Generator().manual_seed(p["seed"])
            self._fixed[channels] = draw_projection(
                p["features"], channels, p["orthogonal"], generator
            )
        self.last_projection = self._fixed[channels]
        key = (channels, device, dtype)
        if key not in self._placed:
            self._placed[key] = self._fixed[channels].to(device=device, dtype=dtype)
        return self._placed[key]

    def forward(self, q, k, v, spec):
        dtype = compute_dtype(q.dtype)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        w = self.projection(spec.channels, q.device, dtype)  # (m, C)
        input_scale = math.sqrt(softmax_scale(self.params["scale"], spec.channels))
        phi_k = positive_features(k, w, input_scale, is_query=False)  # (B, H, Nk, m)
        kv = torch.matmul(phi_k.transpose(-2, -1), v)  # (B, H, m, Cv)
        k_sum = phi_k.sum(dim=-2).unsqueeze(-1)  # (B, H, m, 1)
        del phi_k
        phi_q = positive_features(q, w, input_scale, is_query=True)  # (B, H, Nq, m)
        numerator = torch.matmul(phi_q, kv)  # (B, H, Nq, Cv)
        denominator = torch.matmul(phi_q, k_sum)  # (B, H, Nq, 1)
        return (numerator / denominator).to(spec.dtype)

    def dense_weights(self, q, k, spec):
        # The normalised feature products phi(q) phi(k)^T / (phi(q) . sum_j phi(k_j)).
        dtype = compute_dtype(q.dtype)
        q, k = q.to(dtype), k.to(dtype)
        w = self.projection(spec.channels, q.device, dtype)  # (m, C)
        input_scale = math.sqrt(softmax_scale(self.params["scale"], spec.channels))
        phi_k = positive_features(k, w, input_scale, is_query=False)  # (B, H, Nk, m)
        phi_q = positive_features(q, w, input_scale, is_query=True)  # (B, H, Nq, m)
        products = torch.matmul(phi_q, phi_k.transpose(-2, -1))  # (B, H, Nq, Nk)
        return (products / products.sum(dim=-1, keepdim=True)).to(spec.dtype)

    @property
    def label(self) -> str:
        """``performer.torch(m=256)``; ``iid``, ``redraw=``, ``seed=``, ``scale=`` when set."""
        p = self.params
        parts = [f"m={p['features']}"]
        if not p["orthogonal"]:
            parts.append("iid")
        if p["redraw"] != "never":
            parts.append(f"redraw={p['redraw']}")
        if p["seed"] != 0:
            parts.append(f"seed={p['seed']}")
        if p["scale"] is not None:
            parts.append(f"scale={p['scale']:g}")
        return f"{self.name}({','.join(parts)})"

    def flops(self, spec: AttentionSpec, backward: bool = False) -> int:
        """Useful FLOPs (multiply-add = 2; exp, norms, stabilisers and the ratio not counted).

        Per (batch, head), m features:
          projections  2 m C (Nq + Nk)        (x W^T for queries and keys)
          key sums     2 m Cv Nk + m Nk       (phi(K)^T V, and phi(K)^T 1 as m Nk additions)
          query side   2 m Cv Nq + 2 m Nq     (phi(Q) (phi(K)^T V), phi(Q) (phi(K)^T 1))
        Backward: W is constant, so its products need only the input gradient (2 x); every other
        product has two operands with gradients (3 x).
        """
        m, nq, nk = self.params["features"], spec.q_tokens, spec.kv_tokens
        c, cv = spec.channels, spec.v_channels
        projections = 2 * m * c * (nq + nk)
        rest = 2 * m * cv * nk + m * nk + 2 * m * cv * nq + 2 * m * nq
        bh = spec.batch * spec.heads
        if backward:
            return bh * (2 * projections + 3 * rest)
        return bh * (projections + rest)

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        """Analytic peak bytes beyond the inputs (tensors live at the peak; see comments)."""
        m, nq, nk = self.params["features"], spec.q_tokens, spec.kv_tokens
        c, cv = spec.channels, spec.v_channels
        bh = spec.batch * spec.heads
        elem = torch.empty((), dtype=compute_dtype(spec.dtype)).element_size()
        upcast = 0  # half inputs: float32 copies of q, k, v and the float32 output
        if spec.dtype in HALF_DTYPES:
            upcast = bh * (nq * c + nk * (c + cv) + nq * cv) * elem
        matrix = m * c * elem  # W on the device (cached)
        if not backward:
            # Keys: phi(K) (computed in place) and x*x; then phi(K)^T V and the key sums stay
            # while phi(Q) and x*x, or phi(Q), the numerator and the denominator exist (the
            # ratio is the output).
            keys = nk * m + nk * c
            queries = m * cv + m + nq * m + max(nq * c, nq * cv + nq)
            per_bh = max(keys, queries)
        else:
            # Autograd keeps exp's output and the features (with eps) for both sides, the key
            # sums, numerator, denominator and output; backward adds one feature-sized gradient
            # pair and the input gradients.
            saved = 2 * nk * m + 2 * nq * m + m * cv + m + 2 * nq * cv + nq
            per_bh = saved + 2 * max(nq, nk) * m + nq * c + nk * (c + cv)
        return upcast + matrix + spec.output_bytes + bh * per_bh * elem
