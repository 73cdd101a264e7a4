"""Generator networks for the training tasks (Jetchev et al. 2021, arXiv 2107.03742).

``CopyingGenerator(preset("cpu64"), "gpa.torch")`` builds the paper's attention-copying
generator: two U-Nets whose decoder levels are joined by attention-copying blocks, exact
attention at the small levels and the implementation under test at the large ones.
"""

from attnbench.generators.blocks import AttentionCopy, ConvBlock
from attnbench.generators.config import GeneratorConfig
from attnbench.generators.discriminator import Discriminator
from attnbench.generators.presets import PRESETS, preset
from attnbench.generators.unet import CopyingGenerator, UNetDecoder, UNetEncoder

__all__ = [
    "PRESETS",
    "AttentionCopy",
    "ConvBlock",
    "CopyingGenerator",
    "Discriminator",
    "GeneratorConfig",
    "UNetDecoder",
    "UNetEncoder",
    "preset",
]
