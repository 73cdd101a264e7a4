"""Configuration of the attention-copying generator (Jetchev et al. 2021, arXiv 2107.03742).

A :class:`GeneratorConfig` fixes everything about the network except the attention used at the
large decoder levels, so that every method under comparison trains the same architecture
(the paper's fairness rule: only the attention at the large levels changes).

Levels are listed from the smallest resolution up to the full image. With ``L`` levels and an
image of ``H x W``, level ``i`` works on ``(H / 2^(L-1-i)) x (W / 2^(L-1-i))`` maps, so the lowest
resolution is ``H / 2^(L-1)``; both sides must divide. A level whose longer side is at most
``full_attn_max`` uses exact attention (``full.sdpa``); the larger ones use the implementation
under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NORMS = ("group", "instance", "none")
ACTIVATIONS = ("leaky_relu", "silu")
EXACT_ATTENTION = "full.sdpa"
SMALL_ATTENTIONS = (EXACT_ATTENTION, "none")
COORDS = ("none", "qk", "inputs", "pose")
POSE_CODE_BANDS = 5  # Fourier bands of coords="pose": periods from 2 down to 1/8 of the map
AFFINITIES = ("dot", "euclid", "cosine")
COPY_INITS = ("default", "codes", "copy", "match")


@dataclass(frozen=True)
class GeneratorConfig:
    """Sizes and layer choices of :class:`~attnbench.generators.CopyingGenerator`.

    Attributes:
        image_size: (H, W) of the images and pose maps.
        channels: feature channels per level, from the smallest resolution up to the full
            image; the encoder and the decoder of both branches use the same counts.
        pose_channels: channels of a pose map (18 for OpenPose keypoint heatmaps, 2 for a
            coordinate map).
        image_channels: channels of the source image (3 for RGB); also of the output.
        attn_channels: channels of q, k and v in every copying block (one head: the paper
            found no gain from several).
        full_attn_max: largest map side, max(h, w), that uses exact attention (full.sdpa).
        norm: "group" (GroupNorm with gcd(channels, norm_groups) groups), "instance"
            (GroupNorm with one group per channel, affine) or "none".
        norm_groups: the largest number of groups of the "group" norm.
        activation: "leaky_relu" (slope 0.2) or "silu".
        gpa_phase1_res: phase-1 resolution given to GPA implementations (names starting with
            "gpa.") unless the caller passes ``downsample`` or ``phase1_res``; None adds nothing.
        small_attention: the implementation of the levels up to ``full_attn_max``:
            "full.sdpa" (exact attention), or "none" for the paper's NO, no copying at any
            level (with "none" at the large levels too).
        coords: normalised (x, y) pixel coordinates as 2 extra channels, a positional
            inductive bias in both branches: "none"; "qk", read by every copying block's query
            and key 1x1 convolutions at the block's resolution; "inputs", read by both encoders
            next to the image and pose maps; "pose", every copying block's query and key
            convolutions read Fourier features (``POSE_CODE_BANDS`` bands) of the coordinate
            map that the last two pose channels hold (data ``pose: heatmaps+coords``, or a
            folder of images), averaged to the block's resolution: for the target, where its
            pixels come from.
        learn_temperature: every copying block multiplies its queries by a trainable
            temperature (one scalar, stored as its logarithm), so it can sharpen its softmax.
        temperature_init: the temperature's initial value (1 = the plain 1/sqrt(C) scale).
        affinity: what every copying block's scores measure: "dot" (q.k) or "euclid"
            (-|q - k|², as GPA's authors use): the block's q and k convolutions make
            ``attn_channels - 1`` channels and it appends one to each so that any
            implementation's dot product gives -|q - k|² plus a constant per query; or
            "cosine" (Swin V2's scaled cosine attention): unit-length q and k scaled so that
            every implementation's scores are the temperature times cos(q, k).
        copy_init: how the copying blocks' query and key convolutions start: "default"
            (PyTorch's), or "codes": zero weights on the decoder features, so that the
            positional codes alone (``coords`` "qk" or "pose") set the first attention and the
            features join as they earn it; or "copy": "codes", and the value convolutions also
            read the source image averaged to their level, their first channels start as that
            image and every level's toRGB starts adding them with weight 1 / levels, so that
            what attention copies reaches the output from the first step (trained apart, a
            copying block whose values and decoder must first learn to carry colour copied at a
            seventh of the rate of one whose values start as the pixels); or "match": "copy",
            and the query and key convolutions start as the codes themselves (their first
            ``code_channels`` outputs, every other weight and bias zero), so that from the first
            step each target pixel attends to the source pixel its pose code names, and
            training keeps, sharpens or loses that copy (the codes must fit in q and k).
    """

    image_size: tuple[int, int]
    channels: tuple[int, ...]
    pose_channels: int = 18
    image_channels: int = 3
    attn_channels: int = 64
    full_attn_max: int = 64
    norm: str = "group"
    norm_groups: int = 8
    activation: str = "leaky_relu"
    gpa_phase1_res: int | None = None
    small_attention: str = EXACT_ATTENTION
    coords: str = "none"
    learn_temperature: bool = False
    temperature_init: float = 1.0
    affinity: str = "dot"
    copy_init: str = "default"

    def __post_init__(self) -> None:
        # Normalise lists (from YAML or JSON) to tuples so the config stays hashable.
        object.__setattr__(self, "image_size", tuple(self.image_size))
        object.__setattr__(self, "channels", tuple(self.channels))
        self._check_sizes()
        self._check_attention()
        self._check_temperature()
        self._check_layers()
        self._check_levels_fit()

    def _check_sizes(self) -> None:
        """Image size, channel counts, ``full_attn_max`` and ``gpa_phase1_res``."""
        if len(self.image_size) != 2 or not all(_positive_int(x) for x in self.image_size):
            raise ValueError(
                f"image_size={self.image_size!r} is not allowed "
                "(allowed: (height, width), ints >= 1)"
            )
        if not self.channels or not all(_positive_int(c) for c in self.channels):
            raise ValueError(
                f"channels={self.channels!r} is not allowed "
                "(allowed: a non-empty sequence of ints >= 1, smallest resolution first)"
            )
        for field in ("pose_channels", "image_channels", "attn_channels", "norm_groups"):
            if not _positive_int(getattr(self, field)):
                raise ValueError(
                    f"{field}={getattr(self, field)!r} is not allowed (allowed: an integer >= 1)"
                )
        if not isinstance(self.full_attn_max, int) or self.full_attn_max < 0:
            raise ValueError(
                f"full_attn_max={self.full_attn_max!r} is not allowed (allowed: an integer >= 0)"
            )
        if self.gpa_phase1_res is not None and not _positive_int(self.gpa_phase1_res):
            raise ValueError(
                f"gpa_phase1_res={self.gpa_phase1_res!r} is not allowed "
                "(allowed: an integer >= 1 or None)"
            )

    def _check_attention(self) -> None:
        """The small levels' attention, the positional codes, ``copy_init`` and ``affinity``."""
        if self.small_attention not in SMALL_ATTENTIONS:
            raise ValueError(
                f"small_attention={self.small_attention!r} is not allowed "
                f"(allowed: {', '.join(SMALL_ATTENTIONS)})"
            )
        if self.coords not in COORDS:
            raise ValueError(
                f"coords={self.coords!r} is not allowed (allowed: {', '.join(COORDS)})"
            )
        if self.copy_init not in COPY_INITS:
            raise ValueError(
                f"copy_init={self.copy_init!r} is not allowed (allowed: {', '.join(COPY_INITS)})"
            )
        if self.copy_init != "default" and not self.code_channels:
            raise ValueError(
                f"copy_init={self.copy_init!r} needs positional codes (coords 'qk' or 'pose'; got "
                f"coords={self.coords!r})"
            )
        qk_channels = self.attn_channels - (self.affinity == "euclid")
        if self.copy_init == "match" and self.code_channels > qk_channels:
            raise ValueError(
                f"copy_init='match' needs the {self.code_channels} code channels to fit in the "
                f"{qk_channels} channels of q and k (allowed: attn_channels >= "
                f"{self.code_channels + (self.affinity == 'euclid')})"
            )
        if self.affinity not in AFFINITIES:
            raise ValueError(
                f"affinity={self.affinity!r} is not allowed (allowed: {', '.join(AFFINITIES)})"
            )

    def _check_temperature(self) -> None:
        """``learn_temperature`` and ``temperature_init``."""
        if not isinstance(self.learn_temperature, bool):
            raise ValueError(
                f"learn_temperature={self.learn_temperature!r} is not allowed "
                "(allowed: true, false)"
            )
        if not (
            isinstance(self.temperature_init, int | float)
            and not isinstance(self.temperature_init, bool)
            and self.temperature_init > 0
        ):
            raise ValueError(
                f"temperature_init={self.temperature_init!r} is not allowed (allowed: a number > 0)"
            )

    def _check_layers(self) -> None:
        """The norm and the activation."""
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not allowed (allowed: {', '.join(NORMS)})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation={self.activation!r} is not allowed (allowed: {', '.join(ACTIVATIONS)})"
            )

    def _check_levels_fit(self) -> None:
        """The image can be halved once per level below the full resolution."""
        factor = 2 ** (self.levels - 1)
        h, w = self.image_size
        if h % factor or w % factor:
            raise ValueError(
                f"image_size={h}x{w} cannot be halved {self.levels - 1} times for "
                f"{self.levels} levels (allowed: both sides divisible by {factor})"
            )

    @property
    def levels(self) -> int:
        """Number of resolution levels (of each encoder and each decoder)."""
        return len(self.channels)

    @property
    def level_sizes(self) -> tuple[tuple[int, int], ...]:
        """(h, w) of every level's feature maps, smallest first."""
        h, w = self.image_size
        last = self.levels - 1
        return tuple((h >> (last - i), w >> (last - i)) for i in range(self.levels))

    @property
    def code_channels(self) -> int:
        """Positional code channels each copying block's q and k convolutions read."""
        return {"qk": 2, "pose": 4 * POSE_CODE_BANDS}.get(self.coords, 0)

    @property
    def lowest_size(self) -> tuple[int, int]:
        """(h, w) of the smallest level (the bottleneck)."""
        return self.level_sizes[0]

    def uses_exact_attention(self, level: int) -> bool:
        """Whether decoder level ``level`` (0 = smallest) copies with exact attention."""
        return max(self.level_sizes[level]) <= self.full_attn_max

    @property
    def large_levels(self) -> tuple[int, ...]:
        """Indices of the levels that use the implementation under test."""
        return tuple(i for i in range(self.levels) if not self.uses_exact_attention(i))

    def large_level_params(self, attention: str, params: dict[str, Any] | None) -> dict[str, Any]:
        """Parameters for ``attention`` at the large levels, with this preset's defaults added.

        For GPA implementations (names starting with "gpa.") ``phase1_res=gpa_phase1_res`` is
        added unless the caller gave ``downsample`` or ``phase1_res``. GPA resolves
        d = max(hq, wq) // phase1_res per call, so one value gives each level its own d.
        """
        resolved = dict(params or {})
        if (
            attention.startswith("gpa.")
            and self.gpa_phase1_res is not None
            and "downsample" not in resolved
            and "phase1_res" not in resolved
        ):
            resolved["phase1_res"] = self.gpa_phase1_res
        return resolved


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
