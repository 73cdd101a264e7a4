"""Video Sparse Attention (VSA; Zhang et al., "VSA: Faster Video Diffusion with Trainable
Sparse Attention", 2025, arXiv 2505.13389), on images, registered as ``vsa.torch``.

The map is cut into ``tile`` x ``tile`` tiles (VSA's are 4 x 4 x 4 cubes of a video). Per head,
the tile-mean queries, keys and values give the coarse scores q_c k_cᵀ / sqrt(C); a tile's
queries keep the ``topk`` best-scored tiles (nothing forced) and attend with one softmax to their
keys: the fine output. The coarse output, softmax(q_c k_cᵀ / sqrt(C)) v_c, is broadcast to every
query of the tile and added through a gate: out = fine + ``gate`` · coarse. In FastVideo the gate
is a linear map of the block's input (per token and channel, no activation); here it is a
number, the same for every query and channel (0: the fine branch alone).
"""

from __future__ import annotations

import torch

from attnbench.impls.routed.base import RoutedBase, block_params
from attnbench.impls.routed.router import pool_tiles, tile_of_token, tile_tokens
from attnbench.registry import Param, register
from attnbench.spec import AttentionSpec


@register("vsa.torch")
class VideoSparse(RoutedBase):
    """VSA on images: tiles route on pooled logits per head; a gated coarse branch is added."""

    BLOCK_PARAM = "tile"
    PARAMS = {
        **block_params("tile", "side of a square tile of tokens (query group and key block)"),
        "gate": Param(1.0, float, doc="weight of the coarse branch added to the fine one"),
    }

    def coarse_weights(self, q, k, spec: AttentionSpec) -> torch.Tensor:
        """softmax(scale q_c k_cᵀ) between query tiles and key tiles [B, H, tiles, tiles]."""
        side = self.block
        q_c, k_c = pool_tiles(q, spec.q_hw, side), pool_tiles(k, spec.kv_hw, side)
        return (self.scale_for(spec) * q_c @ k_c.transpose(-2, -1)).softmax(dim=-1)

    def forward(self, q, k, v, spec: AttentionSpec) -> torch.Tensor:
        fine = super().forward(q, k, v, spec)
        if self.params["gate"] == 0:
            return fine
        coarse = self.coarse_weights(q, k, spec) @ pool_tiles(v, spec.kv_hw, self.block)
        return (
            fine
            + self.params["gate"] * coarse[:, :, tile_of_token(spec.q_hw, self.block, q.device)]
        )

    def dense_weights(self, q, k, spec: AttentionSpec) -> torch.Tensor:
        # The fine weights, plus the gated coarse weight of a key's tile spread evenly over the
        # tile's keys (v_c is their mean): weights @ v = fine + gate * coarse.
        fine = super().dense_weights(q, k, spec)
        if self.params["gate"] == 0:
            return fine
        coarse = self.coarse_weights(q, k, spec)[
            :, :, tile_of_token(spec.q_hw, self.block, q.device)
        ]
        key_tiles = tile_tokens(spec.kv_hw, self.block, q.device)
        spread = torch.zeros_like(fine)
        columns = coarse.repeat_interleave(self.block**2, dim=-1) / self.block**2
        spread[..., key_tiles.reshape(-1)] = columns
        return fine + self.params["gate"] * spread

    def phase_flops(self, spec: AttentionSpec) -> tuple[int, int]:
        # The coarse branch is an attention between tiles: 2 G G' (C + Cv), with the attend.
        routing, attending = super().phase_flops(spec)
        grid = self.grid(spec)
        coarse = 2 * grid.n_groups * grid.n_blocks * spec.v_channels  # scores shared with routing
        return routing, attending + spec.batch * spec.heads * coarse

    def exact_params(self, spec: AttentionSpec):
        return {"tile": 1, "topk": spec.kv_tokens, "gate": 0.0}
