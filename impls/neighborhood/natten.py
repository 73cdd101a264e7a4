"""``neighborhood.natten``: NATTEN's own ``na2d`` (rule and parameters in
:mod:`attnbench.impls.neighborhood.common`).

Installed with ``pip install "attnbench[natten]"``. Without libnatten (a NATTEN build without
CUDA), NATTEN runs FlexAttention eagerly, which materialises the full score matrix: forward-only
and CPU-only here; on CUDA it needs libnatten's kernels.
"""

from __future__ import annotations

import warnings

import torch

from attnbench.impls.common import softmax_scale
from attnbench.impls.neighborhood.common import NeighbourhoodBase
from attnbench.registry import register
from attnbench.spec import AttentionSpec

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
