"""Synthetic mannequins: textured figures in 18-keypoint OpenPose poses, drawn in any pose.

The training tasks of Grid Partitioned Attention (Jetchev et al. 2021, arXiv 2107.03742,
section 3) copy detail from a conditioning image to a target image. This generator stands in for
DeepFashion where no data set is at hand: a figure is a set of body parts (torso, head, neck,
limbs, hands, feet), each a rectangle, capsule or ellipse around a bone. A part is filled with a
texture evaluated in part-local coordinates (u along the bone, v across it, both in body units,
so about 1 = the figure's height), hence a texture stays fixed to its part when the pose
changes: the same appearance can be drawn in any pose. Textures are stripes, checks or dots on
the clothes, skin, hair, shoes, and a 5 x 5 two-colour glyph on the chest (the "logo") that is
unique per appearance.

Everything is derived from integers: ``sample(seed, index)`` and ``pair(seed, index)`` are
deterministic; an appearance (body proportions, textures, logo, background) and each pose come
from their own derived seeds. Drawing is vectorised over parts with torch: every part gets a
window of the canvas (one window size for all), its pixels' part-local coordinates, an
anti-aliased mask and a colour; the windows are then blended into the canvas in drawing order.
"""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from attnbench.data.pose import (
    KEYPOINT_NAMES,
    MISSING,
    NUM_KEYPOINTS,
    default_sigma,
    heatmaps,
)

__all__ = ["KEYPOINT_NAMES", "Mannequin", "derive_seed", "heatmaps"]

Point = tuple[float, float]
_MASK64 = (1 << 64) - 1
_APPEARANCE, _POSE, _PAIR_POSE = 1, 2, 3  # tags that separate the seeds derived from (seed, index)

# Part shapes.
RECT, CAPSULE, ELLIPSE = 0, 1, 2
# Texture kinds. SPLIT is two-tone along the bone (hair on the head).
SOLID, STRIPES, CHECKS, DOTS, SPLIT = 0, 1, 2, 3, 4

# Parts from back to front: legs behind the torso, arms in front of it.
DRAWING_ORDER = (
    "r_upper_leg", "r_lower_leg", "l_upper_leg", "l_lower_leg", "r_foot", "l_foot",
    "neck", "torso", "head", "r_upper_arm", "r_lower_arm", "r_hand",
    "l_upper_arm", "l_lower_arm", "l_hand",
)  # fmt: skip
LOGO_CELLS = 5
LOGO_CELL = 0.02  # side of one logo cell in body units (the figure is about 1 tall)
LOGO_TOP = 0.075  # distance of the logo below the top of the torso, body units
MIN_SIZE, MAX_SIZE = 64, 512


def derive_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64): nearby inputs give unrelated seeds."""
    state = 0x243F6A8885A308D3
    for value in values:
        z = ((state ^ (int(value) & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one thread inside the block, restoring the thread count after.

    Drawing and warping work on many small tensors, where intra-op threads cost more than they
    give: on a busy 2-core machine one threaded op on 24k elements took ~9 ms against ~5 us on
    one thread. DataLoader workers already run on one thread; this matters for num_workers=0.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def logo_glyph(appearance: int) -> list[list[int]]:
    """The 5 x 5 binary glyph of an appearance id.

    A bijection of the id's low 25 bits (odd multiplications and xor-shifts modulo 2^25), so two
    ids that differ modulo 2^25 never share a glyph.
    """
    mask = (1 << LOGO_CELLS * LOGO_CELLS) - 1
    x = appearance & mask
    for multiplier in (0x1A7F3B5, 0x0F2C9D3):
        x = (x * multiplier) & mask
        x ^= x >> 13
    return [[(x >> (r * LOGO_CELLS + c)) & 1 for c in range(LOGO_CELLS)] for r in range(LOGO_CELLS)]


@dataclass(frozen=True)
class Texture:
    """A part's texture in part-local body units.

    ``angle`` and ``period`` orient and space stripes, checks and dots; ``param`` is the stripe
    duty cycle, the dot radius (fraction of the period) or the split point (fraction of the bone).
    """

    kind: int
    colour0: tuple[float, float, float]
    colour1: tuple[float, float, float]
    angle: float = 0.0
    period: float = 0.05
    param: float = 0.5


@dataclass(frozen=True)
class Appearance:
    """Everything about a figure that does not depend on its pose."""

    id: int
    body: dict[str, float]  # bone lengths and widths, body units
    textures: dict[str, Texture]  # by part name
    logo: tuple[tuple[int, ...], ...]  # 5 x 5 bits, row 0 at the top
    logo_colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    background: tuple[tuple[float, float, float], ...]  # corner colours: tl, tr, bl, br
    background_pattern: Texture  # in canvas units (1 = the shorter side); contrast in param


@dataclass(frozen=True)
class Part:
    """One drawn part: a bone from ``a`` to ``b`` with half-widths ``w0`` (at a) and ``w1`` (at b).

    ``length`` is the bone's unforeshortened length: the texture is stretched over the drawn bone
    as if it had that length.
    """

    name: str
    a: tuple[float, float]
    b: tuple[float, float]
    w0: float
    w1: float
    shape: int
    length: float


@dataclass(frozen=True)
class Pose:
    """A figure in body units (y down): its keypoints (None where hidden) and its parts."""

    keypoints: tuple[tuple[float, float] | None, ...]
    parts: tuple[Part, ...]

    def extent(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) of everything drawn."""
        xs, ys = [], []
        for p in self.parts:
            r = max(p.w0, p.w1)
            for x, y in (p.a, p.b):
                xs += [x - r, x + r]
                ys += [y - r, y + r]
        return min(xs), min(ys), max(xs), max(ys)


# Body proportions in body units (figure about 1 tall), each scaled per appearance.
_LENGTHS = {
    "head_len": 0.11,  # neck to nose
    "head_h": 0.075,  # head ellipse semi-axis along the neck
    "shoulder": 0.105,  # neck to shoulder
    "hip": 0.06,  # mid-hip to hip
    "torso": 0.30,  # neck to mid-hip
    "upper_arm": 0.16,
    "lower_arm": 0.145,
    "upper_leg": 0.235,
    "lower_leg": 0.225,
}
_WIDTHS = {  # half-widths
    "head_w": 0.058,
    "neck_w": 0.024,
    "arm_w": 0.027,
    "forearm_w": 0.022,
    "thigh_w": 0.042,
    "shin_w": 0.032,
    "hand_w": 0.02,
    "foot_w": 0.022,
}


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))


def _colour_pair(rng: random.Random) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Two colours that differ clearly in hue and brightness."""
    h, s, v = rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.25, 1.0)
    v1 = v - rng.uniform(0.35, 0.6) if v > 0.6 else v + rng.uniform(0.35, 0.6)
    return _hsv(h, s, v), _hsv(h + rng.uniform(0.2, 0.8), rng.uniform(0.2, 1.0), v1)


def _cloth(rng: random.Random) -> Texture:
    kind = rng.choice((STRIPES, STRIPES, CHECKS, DOTS))
    c0, c1 = _colour_pair(rng)
    param = rng.uniform(0.35, 0.65) if kind == STRIPES else rng.uniform(0.2, 0.35)
    return Texture(kind, c0, c1, rng.uniform(0.0, math.pi), rng.uniform(0.045, 0.09), param)


def make_appearance(appearance: int) -> Appearance:
    """The appearance with this id: body proportions, garments, logo and background."""
    rng = random.Random(appearance)
    body = {k: v * rng.uniform(0.92, 1.08) for k, v in _LENGTHS.items()}
    build = rng.uniform(0.85, 1.2)
    body.update({k: v * build * rng.uniform(0.95, 1.05) for k, v in _WIDTHS.items()})

    skin_colour = _hsv(rng.uniform(0.02, 0.11), rng.uniform(0.25, 0.6), rng.uniform(0.35, 0.95))
    skin = Texture(SOLID, skin_colour, skin_colour)
    hair_colour = _hsv(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.6))
    head = Texture(SPLIT, skin.colour0, hair_colour, param=rng.uniform(0.55, 0.72))
    shirt = _cloth(rng)
    sleeve = shirt if rng.random() < 0.5 else _cloth(rng)
    trousers = _cloth(rng)
    shoe_colour = _hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.05, 0.4))
    shoes = Texture(SOLID, shoe_colour, shoe_colour)
    long_sleeves, shorts = rng.random() < 0.5, rng.random() < 0.3
    textures = {"torso": shirt, "neck": skin, "head": head}
    for side in "rl":
        textures[f"{side}_upper_arm"] = sleeve
        textures[f"{side}_lower_arm"] = sleeve if long_sleeves else skin
        textures[f"{side}_hand"] = skin
        textures[f"{side}_upper_leg"] = trousers
        textures[f"{side}_lower_leg"] = skin if shorts else trousers
        textures[f"{side}_foot"] = shoes

    glyph = tuple(tuple(row) for row in logo_glyph(appearance))
    logo_colours = _colour_pair(rng)
    base = _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.5, 1.0))
    corners = tuple(
        tuple(min(max(c + rng.uniform(-0.25, 0.25), 0.0), 1.0) for c in base) for _ in range(4)
    )
    pattern_kind = rng.choice((SOLID, SOLID, STRIPES, CHECKS))
    angle, period, contrast = (
        rng.uniform(0, math.pi),
        rng.uniform(0.08, 0.2),
        rng.uniform(0.05, 0.12),
    )
    pattern = Texture(pattern_kind, (0, 0, 0), (1, 1, 1), angle, period, contrast)
    return Appearance(appearance, body, textures, glyph, logo_colours, corners, pattern)


def _add(p: tuple[float, float], d: tuple[float, float], k: float = 1.0) -> tuple[float, float]:
    return (p[0] + k * d[0], p[1] + k * d[1])


def _direction(angle: float, side: float) -> tuple[float, float]:
    """Unit vector ``angle`` radians from straight down, positive = outwards on ``side`` (+-1)."""
    return (side * math.sin(angle), math.cos(angle))


def make_pose(body: dict[str, float], rng: random.Random) -> Pose:
    """A random standing or walking figure (joint angles in plausible ranges), frontal view.

    The person's right side is on the image's left, as in a frontal photograph.
    """
    walking = rng.random() < 0.5
    lean = rng.uniform(-0.1, 0.1)
    down = (-math.sin(lean), math.cos(lean))  # torso axis, neck towards hips
    mid_hip = (0.0, 0.0)
    neck = _add(mid_hip, down, -body["torso"])
    tilt = lean + rng.uniform(-0.06, 0.06)
    across_shoulders = (math.cos(tilt), math.sin(tilt))  # towards the image's right
    tilt = rng.uniform(-0.06, 0.06)
    across_hips = (math.cos(tilt), math.sin(tilt))
    kp: dict[str, tuple[float, float] | None] = {"neck": neck}
    parts: dict[str, Part] = {}

    def part(name: str, *geometry) -> None:
        parts[name] = Part(name, *geometry)

    def limb(name: str, a: Point, b: Point, width: str, taper: float, length: str) -> None:
        """A capsule from a to b, tapering from body[width] to taper * body[width]."""
        part(name, a, b, body[width], taper * body[width], CAPSULE, body[length])

    # Head: nose and eyes move with the yaw; an ear turned away is hidden (missing).
    tilt = lean + rng.uniform(-0.2, 0.2)
    up, right = (math.sin(tilt), -math.cos(tilt)), (math.cos(tilt), math.sin(tilt))
    yaw = rng.uniform(-1.0, 1.0)
    head_base = _add(neck, up, body["head_len"])
    kp["nose"] = _add(head_base, right, 0.025 * yaw)
    eye_dx = 0.022 * (1 - 0.25 * abs(yaw))
    for side, s in (("r", -1), ("l", 1)):
        kp[f"{side}_eye"] = _add(_add(kp["nose"], up, 0.025), right, s * eye_dx + 0.008 * yaw)
        hidden = yaw * s > 0.7
        kp[f"{side}_ear"] = None if hidden else _add(_add(head_base, up, 0.012), right, s * 0.05)
    centre = _add(head_base, up, 0.015)
    hh = body["head_h"]
    neck_w, head_w = body["neck_w"], body["head_w"]
    part("neck", _add(neck, up, -0.01), _add(neck, up, 0.07), neck_w, neck_w, CAPSULE, 0.08)
    part("head", _add(centre, up, -hh), _add(centre, up, hh), head_w, head_w, ELLIPSE, 2 * hh)
    top, bottom = _add(neck, down, -0.025), _add(mid_hip, down, 0.05)
    widths = (body["shoulder"] + 0.02, body["hip"] + 0.05)
    part("torso", top, bottom, *widths, RECT, body["torso"] + 0.075)

    stepping = rng.choice("rl") if walking else None
    for side, s in (("r", -1.0), ("l", 1.0)):
        shoulder = _add(neck, across_shoulders, s * body["shoulder"])
        if walking:
            phi, bend = rng.uniform(-0.15, 0.45), rng.uniform(-0.2, 0.6)
        else:
            phi, bend = rng.uniform(-0.2, 1.9), rng.uniform(-1.6, 1.6)
        forearm = _direction(min(max(phi + bend, -1.5), 3.3), s)
        elbow = _add(shoulder, _direction(phi, s), body["upper_arm"])
        wrist = _add(elbow, forearm, body["lower_arm"])
        kp[f"{side}_shoulder"], kp[f"{side}_elbow"], kp[f"{side}_wrist"] = shoulder, elbow, wrist

        hip = _add(mid_hip, across_hips, s * body["hip"])
        psi = rng.uniform(-0.05, 0.3)
        knee_bend = rng.uniform(-0.1, 0.2)
        thigh_f = shin_f = 1.0
        if side == stepping:  # the leg stepping towards the camera looks shorter
            psi, thigh_f, shin_f = (rng.uniform(*r) for r in ((0, 0.2), (0.75, 0.95), (0.8, 1)))
        knee = _add(hip, _direction(psi, s), body["upper_leg"] * thigh_f)
        ankle = _add(knee, _direction(psi - knee_bend, s), body["lower_leg"] * shin_f)
        kp[f"{side}_hip"], kp[f"{side}_knee"], kp[f"{side}_ankle"] = hip, knee, ankle

        limb(f"{side}_upper_arm", shoulder, elbow, "arm_w", 0.9, "upper_arm")
        limb(f"{side}_lower_arm", elbow, wrist, "forearm_w", 0.8, "lower_arm")
        hand = (_add(wrist, forearm, -0.01), _add(wrist, forearm, 0.065))
        part(f"{side}_hand", *hand, body["hand_w"], body["hand_w"], ELLIPSE, 0.075)
        limb(f"{side}_upper_leg", hip, knee, "thigh_w", 0.8, "upper_leg")
        limb(f"{side}_lower_leg", knee, ankle, "shin_w", 0.75, "lower_leg")
        foot = (_add(ankle, (0.0, -0.01)), _add(ankle, (s * 0.035, 0.045)))
        part(f"{side}_foot", *foot, body["foot_w"], body["foot_w"], ELLIPSE, 0.06)

    return Pose(tuple(kp[name] for name in KEYPOINT_NAMES), tuple(parts[n] for n in DRAWING_ORDER))


def _pattern(
    kind: torch.Tensor, s: torch.Tensor, t: torch.Tensor, param: torch.Tensor, px: torch.Tensor
) -> torch.Tensor:
    """Blend weight of colour1 for stripes, checks or dots at period coordinates (s, t).

    ``px`` is the number of pixels per period: edges are anti-aliased over about one pixel.
    """
    ds = (s - s.round()).abs()  # distance to the nearest integer, in [0, 0.5]
    dt = (t - t.round()).abs()
    stripes = 0.5 * param - ds  # signed distance to a stripe's edge, periods
    checks = 4 * (ds - 0.25) * (dt - 0.25)
    dots = param - torch.hypot(ds, dt)
    edge = torch.where(kind == STRIPES, stripes, torch.where(kind == CHECKS, checks, dots))
    return (0.5 + edge * px).clamp(0, 1) * (kind != SOLID)


class Mannequin:
    """Deterministic synthetic figures with 18 OpenPose keypoints on a canvas of ``size``.

    Args:
        size: (H, W), each between 64 and 512 (non-square allowed, e.g. (512, 256)).
        sigma: heatmap standard deviation in pixels; default min(H, W) / 40.

    The figure fits the canvas with a margin (its scale set by whichever side limits it) and is
    placed at a random offset within the room left.
    """

    pose_channels = NUM_KEYPOINTS

    def __init__(self, size: tuple[int, int] = (64, 64), sigma: float | None = None) -> None:
        h, w = (int(v) for v in size)
        if not (MIN_SIZE <= h <= MAX_SIZE and MIN_SIZE <= w <= MAX_SIZE):
            raise ValueError(f"size={tuple(size)} (each side must be in [{MIN_SIZE}, {MAX_SIZE}])")
        if sigma is not None and not sigma > 0:
            raise ValueError(f"sigma={sigma} (must be > 0)")
        self.size = (h, w)
        self.sigma = default_sigma(self.size) if sigma is None else float(sigma)
        self.margin = max(2.0, 0.04 * min(h, w))

    def __repr__(self) -> str:
        return f"Mannequin(size={self.size}, sigma={self.sigma:g})"

    @staticmethod
    def appearance_id(seed: int, index: int) -> int:
        """The appearance id of item ``index`` under ``seed`` (31 bits)."""
        return derive_seed(seed, index, _APPEARANCE) & 0x7FFFFFFF

    def sample(self, seed: int, index: int) -> dict:
        """One figure as a dict.

        Keys: ``image`` [3, H, W], ``keypoints`` [18, 2], ``heatmaps`` [18, H, W],
        ``appearance`` (the int id), ``part_map`` [H, W] and ``bones`` [P, 4] (see
        ``_draw_parts``; ``correspondence`` reads them).
        """
        appearance = make_appearance(self.appearance_id(seed, index))
        rng = random.Random(derive_seed(seed, index, _POSE))
        pose = make_pose(appearance.body, rng)
        with single_thread():
            return self.draw(appearance, pose, self.fit_scale([pose]), rng)

    def pair(self, seed: int, index: int) -> tuple[dict, dict]:
        """The same appearance in two different poses, drawn at the same scale."""
        appearance = make_appearance(self.appearance_id(seed, index))
        rng = random.Random(derive_seed(seed, index, _PAIR_POSE))
        poses = [make_pose(appearance.body, rng) for _ in range(2)]
        scale = self.fit_scale(poses)
        with single_thread():
            first = self.draw(appearance, poses[0], scale, rng)
            return first, self.draw(appearance, poses[1], scale, rng)

    def fit_scale(self, poses: list[Pose]) -> float:
        """Pixels per body unit such that every pose fits inside the canvas with the margin."""
        h, w = self.size
        scales = []
        for pose in poses:
            x0, y0, x1, y1 = pose.extent()
            scales.append(min((w - 2 * self.margin) / (x1 - x0), (h - 2 * self.margin) / (y1 - y0)))
        return min(scales)

    def draw(self, appearance: Appearance, pose: Pose, scale: float, rng: random.Random) -> dict:
        """Render ``pose`` at ``scale`` pixels per body unit, at a random place that fits."""
        h, w = self.size
        x0, y0, x1, y1 = pose.extent()
        room_x = w - 2 * self.margin - (x1 - x0) * scale
        room_y = h - 2 * self.margin - (y1 - y0) * scale
        off_x = self.margin + room_x * rng.uniform(0.2, 0.8) - x0 * scale
        off_y = self.margin + room_y * rng.uniform(0.2, 0.8) - y0 * scale
        keypoints = torch.full((NUM_KEYPOINTS, 2), MISSING)
        for k, p in enumerate(pose.keypoints):
            if p is not None:
                keypoints[k] = torch.tensor([p[0] * scale + off_x, p[1] * scale + off_y])
        image = self.background(appearance)
        part_map, bones = self._draw_parts(image, appearance, pose, scale, (off_x, off_y))
        return {
            "image": image.clamp_(0, 1),
            "keypoints": keypoints,
            "heatmaps": heatmaps(keypoints, self.size, self.sigma),
            "appearance": appearance.id,
            "part_map": part_map,
            "bones": bones,
        }

    @staticmethod
    def correspondence(source: dict, target: dict) -> torch.Tensor:
        """[2, H, W]: for every target pixel on the figure, the source pixel showing the same point.

        Both are ``draw`` results of one appearance at one scale (``pair``). A point of a part
        is named by its fraction f along the part's bone and its offset v across it in pixels
        (the texture's own coordinates, so equal (f, v) show the same texture in both poses).
        The result holds (x, y) source pixel coordinates, and -1 where the target pixel shows
        the background or its point is hidden in the source (another part is drawn in front of
        it there, or it falls outside the canvas).
        """
        labels = target["part_map"]
        h, w = labels.shape
        on = labels >= 0
        part = labels.clamp_min(0)
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float64),
            torch.arange(w, dtype=torch.float64),
            indexing="ij",
        )

        def frame(bones: torch.Tensor) -> tuple[torch.Tensor, ...]:
            a, b = bones[part, :2], bones[part, 2:]  # (H, W, 2) each
            bone = b - a
            length = bone.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            e = bone / length
            return a, bone, e, torch.stack([e[..., 1], -e[..., 0]], dim=-1)  # normal: v's axis

        a_t, bone_t, e_t, n_t = frame(target["bones"])
        d = torch.stack([xs, ys], dim=-1) - a_t
        f = (d * e_t).sum(-1, keepdim=True) / bone_t.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        v = (d * n_t).sum(-1, keepdim=True)
        a_s, bone_s, _, n_s = frame(source["bones"])
        point = a_s + f * bone_s + v * n_s  # (H, W, 2) (x, y) in the source
        col, row = point[..., 0].round().long(), point[..., 1].round().long()
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        seen = source["part_map"][row.clamp(0, h - 1), col.clamp(0, w - 1)] == labels
        valid = on & inside & seen
        point = torch.where(valid.unsqueeze(-1), point, torch.full_like(point, MISSING))
        return point.permute(2, 0, 1).to(torch.float32)

    def background(self, appearance: Appearance) -> torch.Tensor:
        """[3, H, W]: a bilinear gradient of four corner colours, maybe with a faint pattern."""
        h, w = self.size
        ty = torch.linspace(0, 1, h).view(1, h, 1)
        tx = torch.linspace(0, 1, w).view(1, 1, w)
        tl, tr, bl, br = (torch.tensor(c).view(3, 1, 1) for c in appearance.background)
        image = (tl * (1 - tx) + tr * tx) * (1 - ty) + (bl * (1 - tx) + br * tx) * ty
        pat = appearance.background_pattern
        if pat.kind != SOLID:
            period = pat.period * min(h, w)  # pixels
            ys, xs = torch.arange(h).view(h, 1), torch.arange(w).view(1, w)
            ca, sa = math.cos(pat.angle), math.sin(pat.angle)
            s = (xs * ca + ys * sa) / period
            t = (ys * ca - xs * sa) / period
            kind = torch.tensor(pat.kind)
            m = _pattern(kind, s, t, torch.tensor(0.5), torch.tensor(period))
            image = image * (1 - pat.param * (2 * m - 1))
        return image

    def _draw_parts(
        self,
        image: torch.Tensor,
        appearance: Appearance,
        pose: Pose,
        scale: float,
        offset: tuple[float, float],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blend every part of ``pose`` into ``image`` [3, H, W] in drawing order (in place).

        Returns the part map [H, W] int64 (the index in drawing order of the part covering each
        pixel more than half, the frontmost one; -1 for the background) and the bones [P, 4]
        float64 (a_x, a_y, b_x, b_y in pixels).
        """
        h, w = self.size
        parts = pose.parts
        n = len(parts)
        tex = [appearance.textures[p.name] for p in parts]
        geo = torch.tensor(
            [[*p.a, *p.b, p.w0, p.w1, p.length] for p in parts], dtype=torch.float64
        )  # (P, 7), body units
        a = geo[:, 0:2] * scale + torch.tensor(offset, dtype=torch.float64)  # (P, 2) pixels
        b = geo[:, 2:4] * scale + torch.tensor(offset, dtype=torch.float64)
        half0, half1 = geo[:, 4] * scale, geo[:, 5] * scale  # (P,) pixels
        bone = (b - a).norm(dim=1).clamp_min(1e-6)  # (P,) pixels
        e = (b - a) / bone.unsqueeze(1)  # (P, 2) unit vector along the bone

        # One window size for all parts, large enough for the largest part's bounding box.
        reach = torch.maximum(half0, half1).unsqueeze(1) + 1.5
        lo = torch.minimum(a, b) - reach  # (P, 2) (x, y)
        hi = torch.maximum(a, b) + reach
        win_w = min(w, int((hi[:, 0] - lo[:, 0]).max().ceil()) + 1)
        win_h = min(h, int((hi[:, 1] - lo[:, 1]).max().ceil()) + 1)
        x0 = lo[:, 0].floor().clamp(0, w - win_w).long()  # (P,)
        y0 = lo[:, 1].floor().clamp(0, h - win_h).long()

        def per_part(values) -> torch.Tensor:  # (P,) -> (P, 1, 1) float32
            return torch.as_tensor(values, dtype=torch.float32).view(n, 1, 1)

        xs = (x0.view(n, 1) + torch.arange(win_w)).float() - a[:, 0:1].float()  # (P, win_w)
        ys = (y0.view(n, 1) + torch.arange(win_h)).float() - a[:, 1:2].float()  # (P, win_h)
        ex, ey = per_part(e[:, 0]), per_part(e[:, 1])
        dx, dy = xs.unsqueeze(1), ys.unsqueeze(2)  # (P, 1, win_w), (P, win_h, 1)
        u = dx * ex + dy * ey  # (P, win_h, win_w) pixels along the bone from a
        v = dx * ey - dy * ex  # pixels across the bone
        length = per_part(bone)
        half = per_part(half0) + per_part(half1 - half0) * (u / length).clamp(0, 1)
        beyond = (-u).clamp_min(0) + (u - length).clamp_min(0)  # past the bone's ends
        shape = per_part([p.shape for p in parts])
        rect = torch.maximum(v.abs() - half, torch.maximum(-u, u - length))
        capsule = torch.hypot(v, beyond) - half
        semi = 0.5 * length
        ellipse = (torch.hypot((u - semi) / semi, v / half) - 1) * torch.minimum(semi, half)
        dist = torch.where(shape == RECT, rect, torch.where(shape == CAPSULE, capsule, ellipse))
        alpha = (0.5 - dist).clamp(0, 1)  # (P, win_h, win_w) anti-aliased coverage

        # Textures in part-local body units: u stretched to the unforeshortened bone length.
        ub = u * per_part([p.length for p in parts]) / length
        vb = v / scale
        angle, period = per_part([t.angle for t in tex]), per_part([t.period for t in tex])
        kind, param = per_part([t.kind for t in tex]), per_part([t.param for t in tex])
        ca, sa = torch.cos(angle), torch.sin(angle)
        s = (ub * ca + vb * sa) / period
        t = (vb * ca - ub * sa) / period
        weight = _pattern(kind, s, t, param, period * scale)
        split = (0.5 + (ub - param * per_part([p.length for p in parts])) * scale).clamp(0, 1)
        weight = torch.where(kind == SPLIT, split, weight)
        c0 = torch.tensor([t.colour0 for t in tex], dtype=torch.float32).view(n, 3, 1, 1)
        c1 = torch.tensor([t.colour1 for t in tex], dtype=torch.float32).view(n, 3, 1, 1)
        colour = c0 + weight.unsqueeze(1) * (c1 - c0)  # (P, 3, win_h, win_w)

        for i, part in enumerate(parts):
            if part.name == "torso":
                self._draw_logo(colour[i], ub[i], vb[i], appearance)
        # Shading across the bone gives the parts some relief.
        colour = colour * (1 - 0.3 * (v / half).square().clamp(max=1)).unsqueeze(1)

        part_map = torch.full((h, w), -1, dtype=torch.int64)
        for i in range(n):  # blend in drawing order
            ys_, xs_ = slice(int(y0[i]), int(y0[i]) + win_h), slice(int(x0[i]), int(x0[i]) + win_w)
            window = image[:, ys_, xs_]
            window.add_(alpha[i] * (colour[i] - window))
            labels = part_map[ys_, xs_]
            labels.copy_(torch.where(alpha[i] > 0.5, i, labels))
        return part_map, torch.cat([a, b], dim=1)

    @staticmethod
    def _draw_logo(
        colour: torch.Tensor, u: torch.Tensor, v: torch.Tensor, appearance: Appearance
    ) -> None:
        """Paint the appearance's glyph into the torso's colour [3, h, w] (in place).

        ``u`` and ``v`` are body units down from the top of the torso and across it.
        """
        row = ((u - LOGO_TOP) / LOGO_CELL).floor()
        col = (v / LOGO_CELL + LOGO_CELLS / 2).floor()
        inside = (row >= 0) & (row < LOGO_CELLS) & (col >= 0) & (col < LOGO_CELLS)
        glyph = torch.tensor(appearance.logo, dtype=torch.bool)
        bit = glyph[row.clamp(0, LOGO_CELLS - 1).long(), col.clamp(0, LOGO_CELLS - 1).long()]
        fg, bg = (
            torch.tensor(c, dtype=torch.float32).view(3, 1, 1) for c in appearance.logo_colours
        )
        logo = torch.where(bit, fg, bg)
        colour.copy_(torch.where(inside, logo, colour))
