"""Bi-level Routing Attention (BRA; Zhu, Wang, Ke, Li, Lau, "BiFormer: Vision Transformer with
Bi-Level Routing Attention", CVPR 2023, arXiv 2303.08810), registered as ``bra.torch``.

The map is cut into ``region`` x ``region`` squares of tokens. A region's queries share one
routing: the region-mean query · the region-mean key of every region (the logits, no softmax),
top ``topk`` regions; every query of the region then attends with one softmax to the keys of the
kept regions. As in BiFormer's released code (ops/bra_legacy.py) the routing is computed once
for all heads, on all channels before the heads split — the sum of the heads' pooled dot
products — unless ``shared_heads`` is false; the query's own region is not forced in. BiFormer
sets the number of regions per side (``n_win``) where this sets their side; its local context
enhancement (LePE, a depthwise convolution of v) is outside the attention and left out, and the
softmax scale is 1/sqrt(C) of a head (BiFormer's code uses its whole width).
"""

from __future__ import annotations

from attnbench.impls.routed.base import RoutedBase, block_params
from attnbench.registry import Param, register


@register("bra.torch")
class BiLevelRouting(RoutedBase):
    """BRA: regions route on pooled logits, once for all heads; phase 2 shared with the router."""

    BLOCK_PARAM = "region"
    PARAMS = {
        **block_params("region", "side of a square region of tokens (query group and key block)"),
        "shared_heads": Param(True, bool, doc="route once for all heads (BiFormer) or per head"),
    }

    def heads_per_route(self, heads: int) -> int:
        return heads if self.params["shared_heads"] else 1
