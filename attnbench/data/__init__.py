"""Data for the training tasks: synthetic mannequins, affine pairs, image folders, DeepFashion.

The tasks follow Grid Partitioned Attention (Jetchev et al. 2021, arXiv 2107.03742, section 3).
Images are float32 [3, H, W] in [0, 1]; sizes are (H, W); keypoints are float32 [18, 2] pixel
coordinates (x, y) in OpenPose-18 order (``KEYPOINT_NAMES``), (-1, -1) where missing; pose
heatmaps are float32 [18, H, W] in [0, 1], all zero for a missing keypoint.
"""

from attnbench.data.affine import (
    WARP_NOISE,
    affine_pair,
    coordinate_map,
    random_affine,
    warp_image,
    warp_keypoints,
)
from attnbench.data.loaders import (
    IMAGE_EXTENSIONS,
    AffineCopyDataset,
    DeepFashion,
    ImageFolder,
    PosePairDataset,
    read_annotations,
    read_pairs,
)
from attnbench.data.mannequin import Mannequin, derive_seed
from attnbench.data.pose import (
    KEYPOINT_NAMES,
    NUM_KEYPOINTS,
    SKELETON,
    default_sigma,
    heatmaps,
    limb_flow,
    missing_mask,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "KEYPOINT_NAMES",
    "NUM_KEYPOINTS",
    "SKELETON",
    "WARP_NOISE",
    "AffineCopyDataset",
    "DeepFashion",
    "ImageFolder",
    "Mannequin",
    "PosePairDataset",
    "affine_pair",
    "coordinate_map",
    "default_sigma",
    "derive_seed",
    "heatmaps",
    "limb_flow",
    "missing_mask",
    "random_affine",
    "read_annotations",
    "read_pairs",
    "warp_image",
    "warp_keypoints",
]
