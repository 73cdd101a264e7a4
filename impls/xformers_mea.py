"""xformers' ``memory_efficient_attention`` (Rabe & Staats 2021 style, CUTLASS/flash kernels).

CUDA only: no xformers release since 0.0.22 has a CPU operator. Where xformers is missing or
its compiled operators do not load, the implementation is unavailable with the reason; on CUDA
the reasons are xformers' own (it lists every operator it tried and why each refused).
"""

from __future__ import annotations

import functools

import torch

from attnbench.impls.common import SCALE
from attnbench.impls.full import exact_weights
from attnbench.registry import Attention, UnsupportedError, register
from attnbench.spec import AttentionSpec


def _bmhk(t: torch.Tensor) -> torch.Tensor:
    """[B, H, N, C] -> xformers' [B, N, H, C] (a view)."""
    return t.transpose(1, 2)


@functools.cache
def _xformers_refusal(dtype: torch.dtype, c: int, cv: int, grad: bool) -> tuple[str, ...]:
    """xformers' own reasons for refusing inputs of this kind, found on a 1-token probe."""
    import xformers.ops as xops

    q = torch.zeros(1, 1, 1, c, dtype=dtype, device="cuda", requires_grad=grad)
    k = torch.zeros(1, 1, 1, c, dtype=dtype, device="cuda", requires_grad=grad)
    v = torch.zeros(1, 1, 1, cv, dtype=dtype, device="cuda", requires_grad=grad)
    try:
        out = xops.memory_efficient_attention(q, k, v)
        if grad:
            out.sum().backward()
    except (NotImplementedError, ValueError, RuntimeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return tuple(f"xformers: {line}" for line in lines)
    return ()


@register("xformers.mea")
class XFormersMemoryEfficient(Attention):
    """``xformers.ops.memory_efficient_attention`` with xformers' operator dispatch."""

    PARAMS = {"scale": SCALE}
    DEVICES = ("cuda",)
    DTYPES = (torch.float16, torch.bfloat16, torch.float32)
    EXACT = True
    REQUIRES = ("xformers.ops",)
    INSTALL_HINT = 'pip install "attnbench[xformers]"'

    def unsupported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if not reasons:
            reasons += _xformers_refusal(
                spec.dtype, spec.channels, spec.v_channels, spec.requires_grad
            )
        return reasons

    def forward(self, q, k, v, spec):
        import xformers.ops as xops

        try:
            out = xops.memory_efficient_attention(
                _bmhk(q), _bmhk(k), _bmhk(v), scale=self.params["scale"]
            )
        except NotImplementedError as err:
            raise UnsupportedError(self.label, str(err).splitlines()) from err
        return out.transpose(1, 2)  # (B, H, Nq, Cv)

    def dense_weights(self, q, k, spec):
        return exact_weights(q, k, self.params["scale"], spec.channels)

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        # Output plus one fp32 log-sum-exp per query; backward adds the input gradients.
        lse = spec.batch * spec.heads * spec.q_tokens * 4
        return spec.output_bytes + lse + (spec.input_bytes if backward else 0)
