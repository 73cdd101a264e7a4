"""Synthetic mannequins: textured figures in 18-keypoint OpenPose poses, drawn in any pose.

The training tasks of Grid Partitioned Attention (Jetchev et al. 2021, arXiv 2107.03742,
section 3) copy detail from a conditioning image to a target image. This generator stands in for
DeepFashion where no data set is at hand. A figure's body and poses are in
attnbench.data.body, its textures, logo and background in attnbench.data.appearance; this module
renders them.

Everything is derived from integers: ``sample(seed, index)`` and ``pair(seed, index)`` are
deterministic; an appearance (body proportions, textures, logo, background) and each pose come
from their own derived seeds. Drawing is vectorised over parts with torch: every part gets a
window of the canvas (one window size for all), its pixels' part-local coordinates, an
anti-aliased mask and a colour; the windows are then blended into the canvas in drawing order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from attnbench.data.appearance import (
    SOLID,
    Appearance,
    make_appearance,
    paint_logo,
    pattern_weight,
    per_part,
    texture_colours,
)
from attnbench.data.body import CAPSULE, RECT, Part, Pose, make_pose
from attnbench.data.pose import (
    KEYPOINT_NAMES,
    MISSING,
    NUM_KEYPOINTS,
    default_sigma,
    heatmaps,
)

__all__ = ["KEYPOINT_NAMES", "Mannequin", "derive_seed", "heatmaps"]

_MASK64 = (1 << 64) - 1
_APPEARANCE, _POSE, _PAIR_POSE = 1, 2, 3  # tags that separate the seeds derived from (seed, index)
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


@dataclass(frozen=True)
class _Windows:
    """Every part's window of the canvas (one size for all) and its pixels' part frame."""

    x0: torch.Tensor  # (P,) int64 first column of each window
    y0: torch.Tensor  # (P,) int64 first row
    height: int
    width: int
    u: torch.Tensor  # (P, height, width) float32 pixels along the bone from a
    v: torch.Tensor  # (P, height, width) float32 pixels across the bone
    length: torch.Tensor  # (P, 1, 1) float32 drawn bone length in pixels


def _bones_in_pixels(
    parts: tuple[Part, ...], scale: float, offset: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every part's bone ends a, b (P, 2) and half-widths at a and at b (P,), float64 pixels."""
    geo = torch.tensor([[*p.a, *p.b, p.w0, p.w1] for p in parts], dtype=torch.float64)
    a = geo[:, 0:2] * scale + torch.tensor(offset, dtype=torch.float64)
    b = geo[:, 2:4] * scale + torch.tensor(offset, dtype=torch.float64)
    return a, b, geo[:, 4] * scale, geo[:, 5] * scale


def _coverage(
    parts: tuple[Part, ...], win: _Windows, half0: torch.Tensor, half1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every part's half-width at each window pixel and its anti-aliased coverage (P, h, w).

    The coverage comes from the signed distance (pixels) to the part's rectangle, capsule or
    ellipse around its bone.
    """
    u, v, length = win.u, win.v, win.length
    half = per_part(half0) + per_part(half1 - half0) * (u / length).clamp(0, 1)
    beyond = (-u).clamp_min(0) + (u - length).clamp_min(0)  # past the bone's ends
    shape = per_part([p.shape for p in parts])
    rect = torch.maximum(v.abs() - half, torch.maximum(-u, u - length))
    capsule = torch.hypot(v, beyond) - half
    semi = 0.5 * length
    ellipse = (torch.hypot((u - semi) / semi, v / half) - 1) * torch.minimum(semi, half)
    dist = torch.where(shape == RECT, rect, torch.where(shape == CAPSULE, capsule, ellipse))
    return half, (0.5 - dist).clamp(0, 1)


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
            m = pattern_weight(kind, s, t, torch.tensor(0.5), torch.tensor(period))
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
        parts = pose.parts
        a, b, half0, half1 = _bones_in_pixels(parts, scale, offset)
        win = self._windows(a, b, half0, half1)
        half, alpha = _coverage(parts, win, half0, half1)

        # Textures in part-local body units: u stretched to the unforeshortened bone length.
        lengths = per_part([p.length for p in parts])
        ub, vb = win.u * lengths / win.length, win.v / scale
        textures = [appearance.textures[p.name] for p in parts]
        colour = texture_colours(textures, ub, vb, lengths, scale)  # (P, 3, win_h, win_w)
        for i, part in enumerate(parts):
            if part.name == "torso":
                paint_logo(colour[i], ub[i], vb[i], appearance)
        # Shading across the bone gives the parts some relief.
        colour = colour * (1 - 0.3 * (win.v / half).square().clamp(max=1)).unsqueeze(1)
        return self._blend(image, win, alpha, colour), torch.cat([a, b], dim=1)

    def _windows(
        self, a: torch.Tensor, b: torch.Tensor, half0: torch.Tensor, half1: torch.Tensor
    ) -> _Windows:
        """The parts' windows of the canvas, one size for all, large enough for the largest
        part's bounding box, with their pixels' coordinates along and across each bone."""
        h, w = self.size
        n = len(a)
        bone = (b - a).norm(dim=1).clamp_min(1e-6)  # (P,) pixels
        e = (b - a) / bone.unsqueeze(1)  # (P, 2) unit vector along the bone
        reach = torch.maximum(half0, half1).unsqueeze(1) + 1.5
        lo = torch.minimum(a, b) - reach  # (P, 2) (x, y)
        hi = torch.maximum(a, b) + reach
        win_w = min(w, int((hi[:, 0] - lo[:, 0]).max().ceil()) + 1)
        win_h = min(h, int((hi[:, 1] - lo[:, 1]).max().ceil()) + 1)
        x0 = lo[:, 0].floor().clamp(0, w - win_w).long()  # (P,)
        y0 = lo[:, 1].floor().clamp(0, h - win_h).long()
        xs = (x0.view(n, 1) + torch.arange(win_w)).float() - a[:, 0:1].float()  # (P, win_w)
        ys = (y0.view(n, 1) + torch.arange(win_h)).float() - a[:, 1:2].float()  # (P, win_h)
        ex, ey = per_part(e[:, 0]), per_part(e[:, 1])
        dx, dy = xs.unsqueeze(1), ys.unsqueeze(2)  # (P, 1, win_w), (P, win_h, 1)
        u = dx * ex + dy * ey  # (P, win_h, win_w) pixels along the bone from a
        v = dx * ey - dy * ex  # pixels across the bone
        return _Windows(x0, y0, win_h, win_w, u, v, per_part(bone))

    def _blend(
        self, image: torch.Tensor, win: _Windows, alpha: torch.Tensor, colour: torch.Tensor
    ) -> torch.Tensor:
        """Blend each part's window ``colour`` (P, 3, h, w) into ``image`` with its coverage
        ``alpha`` (P, h, w) in drawing order (in place); returns the part map [H, W]."""
        part_map = torch.full(self.size, -1, dtype=torch.int64)
        for i in range(len(alpha)):
            y0, x0 = int(win.y0[i]), int(win.x0[i])
            ys_, xs_ = slice(y0, y0 + win.height), slice(x0, x0 + win.width)
            window = image[:, ys_, xs_]
            window.add_(alpha[i] * (colour[i] - window))
            labels = part_map[ys_, xs_]
            labels.copy_(torch.where(alpha[i] > 0.5, i, labels))
        return part_map
