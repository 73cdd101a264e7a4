"""No attention: the copying block contributes zeros (the GPA paper's "NO" baseline)."""

from __future__ import annotations

import torch

from attnbench.registry import Attention, register
from attnbench.spec import AttentionSpec


class _Zeros(torch.autograd.Function):
    """Zeros shaped like the attention output; zero gradients for q, k and v."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.inputs = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return v.new_zeros(q.shape[:-1] + v.shape[-1:])

    @staticmethod
    def backward(ctx, grad_out):
        return tuple(
            torch.zeros(shape, dtype=dtype, device=device) if needed else None
            for (shape, dtype, device), needed in zip(ctx.inputs, ctx.needs_input_grad)
        )


@register("none")
class NoAttention(Attention):
    """Returns zeros [B, H, Nq, Cv]: no information is copied from k and v."""

    def forward(self, q, k, v, spec):
        return _Zeros.apply(q, k, v)

    def dense_weights(self, q, k, spec):
        return q.new_zeros(spec.batch, spec.heads, spec.q_tokens, spec.kv_tokens)

    def flops(self, spec: AttentionSpec, backward: bool = False) -> int:
        return 0

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        return spec.output_bytes + (spec.input_bytes if backward else 0)
