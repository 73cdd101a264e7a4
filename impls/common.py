"""Helpers shared by the attention families: the softmax scale, the compute dtype of half
inputs and FlexAttention's recompile limit.
"""

from __future__ import annotations

import torch

from attnbench.registry import Param

SCALE = Param(None, float, doc="softmax scale (default 1/sqrt(C))", low=0.0, optional=True)

HALF_DTYPES = (torch.float16, torch.bfloat16)

# Every new shape compiles FlexAttention again; beyond this many, fail loudly instead of
# falling back to eager FlexAttention, which would ignore the block indices.
RECOMPILE_LIMIT = 64


def softmax_scale(scale: float | None, channels: int) -> float:
    """The softmax scale: ``scale`` if given, else 1/sqrt(C)."""
    return channels**-0.5 if scale is None else scale


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs, else the inputs' own dtype."""
    return torch.float32 if dtype in HALF_DTYPES else dtype
