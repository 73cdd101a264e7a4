"""Grid Partitioned Attention backends (Jetchev et al. 2021, arXiv 2107.03742)."""

from attnbench.impls.gpa import cpp, flex, pytorch, reference
from attnbench.impls.gpa.common import Geometry, GPABase
from attnbench.impls.gpa.pytorch import grid_attention, select_keys

__all__ = [
    "GPABase",
    "Geometry",
    "cpp",
    "flex",
    "grid_attention",
    "pytorch",
    "reference",
    "select_keys",
]
