"""Exact softmax attention: the materialised formula and PyTorch's fused SDPA kernels.

``full.naive`` is softmax(scale q k^T) v with the Nq x Nk score matrix materialised — the
memory behaviour the GPA paper (Jetchev et al. 2021, arXiv 2107.03742) calls full attention.
``full.sdpa`` is ``torch.nn.functional.scaled_dot_product_attention``, today's exact baseline
(flash / memory-efficient kernels, O(n) memory); every speed claim is made against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnbench.impls.common import SCALE, softmax_scale
from attnbench.registry import Attention, register
from attnbench.spec import AttentionSpec


def exact_weights(q: torch.Tensor, k: torch.Tensor, scale: float | None, channels: int):
    """softmax(scale q k^T) [B, H, Nq, Nk]: exact attention's weights."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * softmax_scale(scale, channels)
    return scores.softmax(dim=-1)


@register("full.naive")
class NaiveAttention(Attention):
    """softmax(scale q k^T) v with the score matrix materialised."""

    PARAMS = {"scale": SCALE}
    EXACT = True

    def forward(self, q, k, v, spec):
        scale = softmax_scale(self.params["scale"], spec.channels)
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
        return torch.matmul(scores.softmax(dim=-1), v)  # (B, H, Nq, Cv)

    def dense_weights(self, q, k, spec):
        return exact_weights(q, k, self.params["scale"], spec.channels)

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        # Forward: the scores and the probabilities, Nq x Nk each, plus the output. Backward
        # keeps the probabilities and adds the gradients of probabilities and scores, and the
        # gradients of q, k, v (as large as the inputs).
        scores = spec.batch * spec.heads * spec.q_tokens * spec.kv_tokens * spec.element_size
        if not backward:
            return 2 * scores + spec.output_bytes
        return 3 * scores + spec.output_bytes + spec.input_bytes


@register("full.sdpa")
class SDPAttention(Attention):
    """``torch.nn.functional.scaled_dot_product_attention`` (backend chosen by PyTorch)."""

    PARAMS = {"scale": SCALE}
    EXACT = True

    def forward(self, q, k, v, spec):
        return F.scaled_dot_product_attention(q, k, v, scale=self.params["scale"])

    def dense_weights(self, q, k, spec):
        return exact_weights(q, k, self.params["scale"], spec.channels)

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        # The fused kernels keep the output and one fp32 log-sum-exp per query; backward adds
        # the input gradients. Per-thread tiles are small and not counted.
        lse = spec.batch * spec.heads * spec.q_tokens * 4
        extra = spec.input_bytes if backward else 0
        return spec.output_bytes + lse + extra
