"""What the block-routed attentions share: parameters, checks, cost, labels, weights.

A method is a configuration of the router (:mod:`.router`: query group, key block, block
score, head sharing, the own block kept) with phase 2 (:mod:`.attend`) in common, so that their
time, memory and quality compare like for like with GPA's (same kept keys κ block² per query
at equal ``topk`` and ``block``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from attnbench.impls.common import softmax_scale
from attnbench.impls.routed.attend import attend, kept_mask
from attnbench.impls.routed.router import BlockGrid, grid_problems, route
from attnbench.registry import Attention, Param
from attnbench.spec import AttentionSpec


def block_params(name: str, doc: str) -> dict[str, Param]:
    """The parameters every routed method has: its block side (named ``name``), κ, scale.

    The defaults keep 12 blocks of 4 x 4 keys, 192 keys per query: GPA's pivot (κ = 12 blocks
    of d x d = 4 x 4 at d = 4)."""
    return {
        name: Param(4, int, low=1, doc=doc),
        "topk": Param(12, int, low=1, doc="key blocks kept per query group"),
        "scale": Param(None, float, low=0.0, optional=True, doc="default 1/sqrt(C)"),
    }


class RoutedBase(Attention):
    """A block-routed attention. Subclasses set the router's choices: ``RULE``,
    ``KEEP_OWN``, ``BLOCK_PARAM`` (the name of their block side), :meth:`group_side` (the query
    group's side) and :meth:`heads_per_route`."""

    RULE: ClassVar[str] = "pooled"
    KEEP_OWN: ClassVar[bool] = False
    BLOCK_PARAM: ClassVar[str] = "block"
    NEEDS_SPATIAL = True

    @property
    def block(self) -> int:
        """Side of a key block in tokens."""
        return self.params[self.BLOCK_PARAM]

    def group_side(self) -> int:
        """Side of a query group in tokens (1: every query routes on its own)."""
        return self.block

    def heads_per_route(self, heads: int) -> int:
        """How many consecutive heads share one routing (1: every head routes)."""
        return 1

    def grid(self, spec: AttentionSpec) -> BlockGrid:
        return BlockGrid(self.group_side(), self.block, spec.q_hw, spec.kv_hw)

    def route_problems(self, spec: AttentionSpec) -> list[str]:
        """Sizes that do not divide, κ larger than the blocks, heads that cannot share."""
        return grid_problems(
            spec.q_hw, spec.kv_hw, self.group_side(), self.block, self.params["topk"]
        )

    def unsupported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if spec.q_hw is not None and spec.kv_hw is not None:
            reasons += self.route_problems(spec)
        return reasons

    def scale_for(self, spec: AttentionSpec) -> float:
        return softmax_scale(self.params["scale"], spec.channels)

    def kept(self, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        """Phase 1: the kept blocks [B, H / heads_per_route, groups, κ]."""
        return route(
            q, k, self.grid(spec), self.RULE, self.params["topk"], self.scale_for(spec),
            self.heads_per_route(spec.heads), self.KEEP_OWN,
        )  # fmt: skip

    def forward(self, q, k, v, spec: AttentionSpec) -> torch.Tensor:
        kept = self.kept(q, k, spec)
        return attend(q, k, v, kept, self.grid(spec), self.scale_for(spec))

    def kept_keys(self, q, k, spec: AttentionSpec) -> torch.Tensor:
        return kept_mask(self.kept(q, k, spec), self.grid(spec), spec.heads)

    def dense_weights(self, q, k, spec: AttentionSpec) -> torch.Tensor:
        # Phase 2's softmax over each query's kept keys, zeros elsewhere.
        mask = self.kept_keys(q, k, spec)
        scores = self.scale_for(spec) * torch.matmul(q, k.transpose(-2, -1))
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)

    def timed_parts(self, q, k, v, spec: AttentionSpec):
        return {"phase1": lambda: self.kept(q, k, spec)}

    def phase_flops(self, spec: AttentionSpec) -> tuple[int, int]:
        """Useful forward FLOPs of (routing, attending) over all batches and heads.

        Routing: every query group (or query) against every pooled key block, 2 G NB C. The
        attend: every query against κ block² keys, 2 n κ block² (C + Cv). Pooling, softmax and
        top-k are not counted.
        """
        grid = self.grid(spec)
        bh = spec.batch * spec.heads
        keys = self.params["topk"] * grid.block**2
        routing = 2 * grid.n_groups * grid.n_blocks * spec.channels
        attending = 2 * spec.q_tokens * keys * (spec.channels + spec.v_channels)
        return bh * routing, bh * attending

    def flops(self, spec: AttentionSpec, backward: bool = False) -> int:
        # The routing runs without gradient; the attend's backward costs two matmuls per
        # forward matmul, as exact attention's does.
        routing, attending = self.phase_flops(spec)
        return routing + (3 if backward else 1) * attending

    def exact_params(self, spec: AttentionSpec) -> dict[str, Any] | None:
        # Blocks of one token, all of them kept: exact attention.
        return {self.BLOCK_PARAM: 1, "topk": spec.kv_tokens}
