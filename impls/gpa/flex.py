"""``gpa.flex``: GPA's phase 2 as FlexAttention block-sparse attention (compiled).

Jetchev et al. 2021 (arXiv 2107.03742); see :mod:`attnbench.impls.gpa.common`. Queries are
reordered cell-major, so that one FlexAttention query block is one (s d) x (s d) cell, and keys
and values tile-major, so that one key block is one d x d tile. Phase 1's top-κ low-res keys are
then exactly the key blocks each query block attends to: they become the block mask's
``full_kv_indices`` through ``BlockMask.from_kv_blocks`` (no mask function is evaluated).

Limits, as reasons: on CPU the compiled kernel is forward-only; on CUDA, block sizes must be
powers of two >= 16. The first call of each shape compiles (seconds); new key selections of the
same shape reuse the compiled kernel.

On CUDA the kernel's tiles are set from the block sizes (:func:`cuda_tiles`): a tile must divide
its block, and the default tiles (64 or 128 rows) are larger than GPA's key blocks (d² = 16 at
the pivot), which PyTorch before 2.14 does not shrink by itself ("Q and KV block size must be
divisible by BLOCK_M and BLOCK_N").

Non-finite inputs: FlexAttention returns 0 for a query whose scores are all NaN or -inf, where
softmax (and ``gpa.reference``) gives NaN. Such a query is non-finite (a NaN or infinite query
scores NaN or ±inf against every key), and so is its low-res query, which makes its cell's
phase-1 relevances NaN; where phase 1 returns a NaN relevance, phase 2 is ``gpa.torch``'s, whose
softmax propagates NaN and inf as the reference's does.
"""

from __future__ import annotations

import functools

import torch

from attnbench.impls.common import RECOMPILE_LIMIT
from attnbench.impls.gpa.common import GPABase
from attnbench.impls.gpa.pytorch import euclid_augment, grid_attention, select_keys
from attnbench.registry import register
from attnbench.spec import AttentionSpec


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, built once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def to_blocks(x: torch.Tensor, hw: tuple[int, int], side: int) -> torch.Tensor:
    """Reorder tokens [B, H, h*w, C] of an h x w map so each side x side square is contiguous."""
    b, heads, n, c = x.shape
    h, w = hw
    grid = x.reshape(b, heads, h // side, side, w // side, side, c)
    return grid.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, heads, n, c)


def from_blocks(x: torch.Tensor, hw: tuple[int, int], side: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`."""
    b, heads, n, c = x.shape
    h, w = hw
    grid = x.reshape(b, heads, h // side, w // side, side, side, c)
    return grid.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, heads, n, c)


def is_pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def cuda_tiles(q_block: int, kv_block: int) -> dict[str, int]:
    """FlexAttention's CUDA tile sizes for query blocks of ``q_block`` and key blocks of
    ``kv_block`` tokens (powers of two >= 16).

    Each tile divides its block, as the kernel requires; the backward kernels also need
    BLOCK_N1 % BLOCK_M1 == 0 (dK, dV: key tiles over query tiles) and BLOCK_M2 % BLOCK_N2 == 0
    (dQ), which the 16-row inner tiles meet for any such block. The caps keep the tiles within
    shared memory for head dimensions up to 256.
    """
    return {
        "BLOCK_M": min(q_block, 64),
        "BLOCK_N": min(kv_block, 32),
        "BLOCK_M1": 16,
        "BLOCK_N1": min(kv_block, 32),
        "BLOCK_M2": min(q_block, 32),
        "BLOCK_N2": 16,
    }


@register("gpa.flex")
class GPAFlex(GPABase):
    """GPA with phase 2 as compiled FlexAttention over a block mask built from phase 1."""

    REQUIRES = ("torch.nn.attention.flex_attention",)
    DTYPES = (torch.float16, torch.bfloat16, torch.float32)
    BACKWARD_DEVICES = ("cuda",)
    BACKWARD_LIMIT = "FlexAttention's compiled CPU kernel is forward-only"

    def unsupported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if spec.device == "cuda" and not reasons:
            geom = self.geometry(spec)
            for what, size in (("query", geom.cell_side**2), ("key", geom.d**2)):
                if not is_pow2_at_least_16(size):
                    reasons.append(
                        f"{what} block size {size} on device=cuda (FlexAttention's GPU kernel "
                        "needs a power of two >= 16; query block (s d)², key block d²)"
                    )
        return reasons

    def forward(self, q, k, v, spec):
        from torch.nn.attention.flex_attention import BlockMask

        geom = self.geometry(spec)
        scale = self.scale_for(spec.channels)
        affinity = self.params["affinity"]
        keys, relevance = select_keys(q, k, geom, affinity, scale, with_relevance=True)
        if relevance.isnan().any():  # non-finite inputs (see the module docstring)
            return grid_attention(q, k, v, keys, geom, affinity, scale)

        # Key blocks per query block: the κ selected tiles, padded to the full tile count.
        b, h = spec.batch, spec.heads
        kv_indices = torch.zeros(b, h, geom.m, geom.nk_low, dtype=torch.int32, device=q.device)
        kv_indices[..., : geom.topk] = keys
        kv_count = torch.full((b, h, geom.m), geom.topk, dtype=torch.int32, device=q.device)
        mask = BlockMask.from_kv_blocks(
            torch.zeros_like(kv_count),
            torch.zeros_like(kv_indices),
            full_kv_num_blocks=kv_count,
            full_kv_indices=kv_indices,
            BLOCK_SIZE=(geom.cell_side**2, geom.d**2),
            seq_lengths=(spec.q_tokens, spec.kv_tokens),
            compute_q_blocks=spec.requires_grad,  # the transposed indices serve backward only
        )

        q_cells = to_blocks(q, geom.q_hw, geom.cell_side)  # (B, H, Nq, C), cell-major
        k_tiles = to_blocks(k, geom.kv_hw, geom.d)  # (B, H, Nk, C), tile-major
        v_tiles = to_blocks(v, geom.kv_hw, geom.d)
        if affinity == "euclid":
            q_cells, k_tiles = euclid_augment(q_cells, k_tiles)
        options = cuda_tiles(geom.cell_side**2, geom.d**2) if q.is_cuda else None
        with torch._dynamo.config.patch(
            recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
        ):
            out = compiled_flex_attention()(
                q_cells, k_tiles, v_tiles, block_mask=mask, scale=scale, kernel_options=options
            )
        return from_blocks(out, geom.q_hw, geom.cell_side)  # (B, H, Nq, Cv), row-major

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        # Reordered copies of q, k and v, the padded block indices (m x nk' int32 per head),
        # the output in block order and in row-major order.
        geom = self.geometry(spec)
        indices = spec.batch * spec.heads * geom.m * geom.nk_low * 4
        return spec.input_bytes + 2 * spec.output_bytes + indices
