"""The mannequin's body: proportions, parts around bones and random poses, in body units.

A figure is a set of body parts (torso, head, neck, limbs, hands, feet), each a rectangle,
capsule or ellipse around a bone. Coordinates are body units (y down, the figure about 1 tall);
``Mannequin`` (attnbench.data.mannequin) scales and places them on a canvas. Keypoints follow
OpenPose-18 (``KEYPOINT_NAMES``); the person's right side is on the image's left.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from attnbench.data.pose import KEYPOINT_NAMES

Point = tuple[float, float]

# Part shapes.
RECT, CAPSULE, ELLIPSE = 0, 1, 2

# Parts from back to front: legs behind the torso, arms in front of it.
DRAWING_ORDER = (
    "r_upper_leg", "r_lower_leg", "l_upper_leg", "l_lower_leg", "r_foot", "l_foot",
    "neck", "torso", "head", "r_upper_arm", "r_lower_arm", "r_hand",
    "l_upper_arm", "l_lower_arm", "l_hand",
)  # fmt: skip

# Body proportions in body units (figure about 1 tall), each scaled per appearance.
LENGTHS = {
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
WIDTHS = {  # half-widths
    "head_w": 0.058,
    "neck_w": 0.024,
    "arm_w": 0.027,
    "forearm_w": 0.022,
    "thigh_w": 0.042,
    "shin_w": 0.032,
    "hand_w": 0.02,
    "foot_w": 0.022,
}


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


Keypoints = dict[str, Point | None]


def random_body(rng: random.Random) -> dict[str, float]:
    """Bone lengths (each scaled by U(0.92, 1.08)) and half-widths (one build for all, each also
    scaled by U(0.95, 1.05)), body units."""
    body = {k: v * rng.uniform(0.92, 1.08) for k, v in LENGTHS.items()}
    build = rng.uniform(0.85, 1.2)
    body.update({k: v * build * rng.uniform(0.95, 1.05) for k, v in WIDTHS.items()})
    return body


def _add(p: tuple[float, float], d: tuple[float, float], k: float = 1.0) -> tuple[float, float]:
    return (p[0] + k * d[0], p[1] + k * d[1])


def _direction(angle: float, side: float) -> tuple[float, float]:
    """Unit vector ``angle`` radians from straight down, positive = outwards on ``side`` (+-1)."""
    return (side * math.sin(angle), math.cos(angle))


def _limb(
    body: dict[str, float], name: str, a: Point, b: Point, width: str, taper: float, length: str
) -> Part:
    """A capsule from a to b, tapering from body[width] to taper * body[width]."""
    return Part(name, a, b, body[width], taper * body[width], CAPSULE, body[length])


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
    kp: Keypoints = {"neck": neck}
    parts = _head(body, rng, lean, neck, kp)
    parts.append(_torso(body, neck, mid_hip, down))

    stepping = rng.choice("rl") if walking else None
    for side, s in (("r", -1.0), ("l", 1.0)):
        shoulder = _add(neck, across_shoulders, s * body["shoulder"])
        parts += _arm(body, rng, side, s, shoulder, walking, kp)
        hip = _add(mid_hip, across_hips, s * body["hip"])
        parts += _leg(body, rng, side, s, hip, side == stepping, kp)

    by_name = {p.name: p for p in parts}
    return Pose(
        tuple(kp[name] for name in KEYPOINT_NAMES), tuple(by_name[n] for n in DRAWING_ORDER)
    )


def _head(
    body: dict[str, float], rng: random.Random, lean: float, neck: Point, kp: Keypoints
) -> list[Part]:
    """The neck and head parts; adds the face's keypoints to ``kp``.

    Nose and eyes move with the yaw; an ear turned away is hidden (missing).
    """
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
    return [
        Part("neck", _add(neck, up, -0.01), _add(neck, up, 0.07), neck_w, neck_w, CAPSULE, 0.08),
        Part("head", _add(centre, up, -hh), _add(centre, up, hh), head_w, head_w, ELLIPSE, 2 * hh),
    ]


def _torso(body: dict[str, float], neck: Point, mid_hip: Point, down: Point) -> Part:
    """The torso: a rectangle from just above the neck to just below the mid-hip."""
    top, bottom = _add(neck, down, -0.025), _add(mid_hip, down, 0.05)
    widths = (body["shoulder"] + 0.02, body["hip"] + 0.05)
    return Part("torso", top, bottom, *widths, RECT, body["torso"] + 0.075)


def _arm(
    body: dict[str, float],
    rng: random.Random,
    side: str,
    s: float,
    shoulder: Point,
    walking: bool,
    kp: Keypoints,
) -> list[Part]:
    """One arm (upper arm, forearm, hand) on ``side`` ("r"/"l", ``s`` = -1/+1) from ``shoulder``;
    adds its keypoints to ``kp``. A walking figure swings its arms less."""
    if walking:
        phi, bend = rng.uniform(-0.15, 0.45), rng.uniform(-0.2, 0.6)
    else:
        phi, bend = rng.uniform(-0.2, 1.9), rng.uniform(-1.6, 1.6)
    forearm = _direction(min(max(phi + bend, -1.5), 3.3), s)
    elbow = _add(shoulder, _direction(phi, s), body["upper_arm"])
    wrist = _add(elbow, forearm, body["lower_arm"])
    kp[f"{side}_shoulder"], kp[f"{side}_elbow"], kp[f"{side}_wrist"] = shoulder, elbow, wrist
    hand = (_add(wrist, forearm, -0.01), _add(wrist, forearm, 0.065))
    return [
        _limb(body, f"{side}_upper_arm", shoulder, elbow, "arm_w", 0.9, "upper_arm"),
        _limb(body, f"{side}_lower_arm", elbow, wrist, "forearm_w", 0.8, "lower_arm"),
        Part(f"{side}_hand", *hand, body["hand_w"], body["hand_w"], ELLIPSE, 0.075),
    ]


def _leg(
    body: dict[str, float],
    rng: random.Random,
    side: str,
    s: float,
    hip: Point,
    stepping: bool,
    kp: Keypoints,
) -> list[Part]:
    """One leg (thigh, shin, foot) on ``side`` ("r"/"l", ``s`` = -1/+1) from ``hip``; adds its
    keypoints to ``kp``. A leg ``stepping`` towards the camera looks shorter."""
    psi = rng.uniform(-0.05, 0.3)
    knee_bend = rng.uniform(-0.1, 0.2)
    thigh_f = shin_f = 1.0
    if stepping:
        psi, thigh_f, shin_f = (rng.uniform(*r) for r in ((0, 0.2), (0.75, 0.95), (0.8, 1)))
    knee = _add(hip, _direction(psi, s), body["upper_leg"] * thigh_f)
    ankle = _add(knee, _direction(psi - knee_bend, s), body["lower_leg"] * shin_f)
    kp[f"{side}_hip"], kp[f"{side}_knee"], kp[f"{side}_ankle"] = hip, knee, ankle
    foot = (_add(ankle, (0.0, -0.01)), _add(ankle, (s * 0.035, 0.045)))
    return [
        _limb(body, f"{side}_upper_leg", hip, knee, "thigh_w", 0.8, "upper_leg"),
        _limb(body, f"{side}_lower_leg", knee, ankle, "shin_w", 0.75, "lower_leg"),
        Part(f"{side}_foot", *foot, body["foot_w"], body["foot_w"], ELLIPSE, 0.06),
    ]
