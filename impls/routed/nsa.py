"""The selection branch of Native Sparse Attention (NSA; Yuan et al., "Native Sparse
Attention: Hardware-Aligned and Natively Trainable Sparse Attention", 2025, arXiv 2502.11089),
registered as ``nsa.torch``.

Every query routes on its own: the softmax over key blocks of scale · q · (the block's mean key)
— the compressed attention — summed over the ``head_group`` heads that share a routing (NSA's
query heads of one key head; 0: all heads); the query's own block is always kept and counts
toward ``topk``; every head then attends with one softmax to the kept blocks' keys. As in
fla-org's reference (native_sparse_attention/ops), the compressed keys are block means (the
paper's learned compression MLP is out of scope) and only the own block is forced; the paper's
initial block has no meaning on an image. The compression and sliding-window branches and the
gates are left out. Non-causal: every block is a candidate, no token mask.
"""

from __future__ import annotations

from attnbench.impls.routed.base import RoutedBase, block_params
from attnbench.registry import Param, register


@register("nsa.torch")
class NativeSparseSelection(RoutedBase):
    """NSA's selection: per-token routing on compressed-attention probabilities, head groups."""

    RULE = "softmax"
    KEEP_OWN = True
    PARAMS = {
        **block_params("block", "side of a square key block, in tokens"),
        "head_group": Param(0, int, low=0, doc="heads that share a routing (0: all heads)"),
    }

    def group_side(self) -> int:
        return 1

    def heads_per_route(self, heads: int) -> int:
        return self.params["head_group"] or heads

    def route_problems(self, spec):
        problems = super().route_problems(spec)
        group = self.params["head_group"]
        if group and spec.heads % group:
            problems.append(
                f"heads={spec.heads} is not divisible by head_group={group} (allowed: a "
                f"divisor of {spec.heads}, or 0 for all heads)"
            )
        return problems
