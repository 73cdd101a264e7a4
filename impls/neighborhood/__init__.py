"""2-D neighbourhood attention (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023;
dilation: Hassani & Shi, "Dilated Neighborhood Attention Transformer", 2022), with NATTEN's
semantics; the rule is stated in :mod:`attnbench.impls.neighborhood.common`.

Backends, one module each (importing this package registers them):

- ``neighborhood.torch`` (:mod:`~attnbench.impls.neighborhood.pytorch`): pure PyTorch, query
  tiles against their key regions, in bands of tile rows.
- ``neighborhood.flex`` (:mod:`~attnbench.impls.neighborhood.flex`): compiled FlexAttention over
  a neighbourhood block mask.
- ``neighborhood.natten`` (:mod:`~attnbench.impls.neighborhood.natten`): NATTEN's own ``na2d``.
"""

from attnbench.impls.neighborhood import common, flex, natten, pytorch
from attnbench.impls.neighborhood.common import (
    NeighbourhoodBase,
    geometry_problems,
    neighbour_positions,
    neighbour_tokens,
    neighbourhood_mask,
    window_starts,
)
from attnbench.impls.neighborhood.flex import _FLEX_PLANS as _FLEX_PLANS  # flex's plan cache
from attnbench.impls.neighborhood.flex import FLEX_BLOCK, flex_block_mask
from attnbench.impls.neighborhood.pytorch import (
    BAND_ELEMENTS,
    TILE,
    band_tile_rows,
    neighbourhood_attention,
)

__all__ = [
    "BAND_ELEMENTS",
    "FLEX_BLOCK",
    "TILE",
    "NeighbourhoodBase",
    "band_tile_rows",
    "common",
    "flex",
    "flex_block_mask",
    "geometry_problems",
    "natten",
    "neighbour_positions",
    "neighbour_tokens",
    "neighbourhood_attention",
    "neighbourhood_mask",
    "pytorch",
    "window_starts",
]
