"""Mixture of Block Attention (MoBA; Lu et al., "MoBA: Mixture of Block Attention for
Long-Context LLMs", 2025, arXiv 2502.13189), registered as ``moba.torch``.

Every query routes on its own, per head: its score for a key block is q · (the block's mean
key), unscaled, no softmax; its own block is always kept and counts toward ``topk``, the other
``topk`` - 1 are the best scored; one softmax over the kept blocks' keys. MoBA is causal on
token sequences; on images there is no causal mask and every block is a candidate, as in
FastVideo's non-causal port (VMoBA). Blocks are ``block`` x ``block`` squares of the key map.
"""

from __future__ import annotations

from attnbench.impls.routed.base import RoutedBase, block_params
from attnbench.registry import register


@register("moba.torch")
class MixtureOfBlocks(RoutedBase):
    """MoBA: per-token, per-head routing on the mean key of each block, own block kept."""

    RULE = "token"
    KEEP_OWN = True
    PARAMS = block_params("block", "side of a square key block, in tokens")

    def group_side(self) -> int:
        return 1
