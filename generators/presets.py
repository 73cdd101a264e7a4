"""Named generator configurations: the paper's two set-ups and one that trains on a CPU.

From Jetchev et al. 2021 (arXiv 2107.03742), appendix Tables 2-4, read as follows (decoder
channels listed from the smallest resolution up to the image; each level halves the map):

- ``paper_df256`` (DeepFashion, Tables 2/3): 256 x 256 images, decoder channels
  640, 640, 640, 640, 320, 160 at 8, 16, 32, 64, 128, 256 pixels a side. Exact attention up to
  64 x 64; GPA at 128 x 128 (d = 2) and 256 x 256 (d = 4), i.e. phase 1 at 64 x 64.
- ``paper_512x256`` (Table 4): 512 x 256 images (height x width), decoder channels
  768, 768, 768, 512, 256, 128 at 16x8, 32x16, 64x32, 128x64, 256x128, 512x256. Exact attention
  up to 64x32 (the level below the three largest); GPA with phase 1 at 64 on the longer side
  gives d = 2, 4, 8 at 128x64, 256x128, 512x256.
- ``cpu64``: 64 x 64 images, channels 64, 64, 32, 16 at 8, 16, 32, 64; exact attention at 8 and
  16; the implementation under test at 32 and 64 (GPA: phase 1 at 16 x 16, so d = 2 and 4).

The encoders use the decoder's channel counts (the tables list decoder widths; we mirror them).
The width of q, k and v is not in the tables we follow; 64 is our choice for the paper presets.
"""

from __future__ import annotations

from attnbench.generators.config import GeneratorConfig

PRESETS: dict[str, GeneratorConfig] = {
    "paper_df256": GeneratorConfig(
        image_size=(256, 256),
        channels=(640, 640, 640, 640, 320, 160),
        attn_channels=64,
        full_attn_max=64,
        gpa_phase1_res=64,
    ),
    "paper_512x256": GeneratorConfig(
        image_size=(512, 256),
        channels=(768, 768, 768, 512, 256, 128),
        attn_channels=64,
        full_attn_max=64,
        gpa_phase1_res=64,
    ),
    "cpu64": GeneratorConfig(
        image_size=(64, 64),
        channels=(64, 64, 32, 16),
        attn_channels=32,
        full_attn_max=16,
        gpa_phase1_res=16,
    ),
}


def preset(name: str) -> GeneratorConfig:
    """The configuration named ``name``.

    Raises:
        ValueError: unknown name, listing the presets.
    """
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown generator preset {name!r} (allowed: {', '.join(sorted(PRESETS))})"
        ) from None
