"""The copy hit rate: against attentions whose answer is known, and the warp it reads."""

import math

import pytest
import torch

from attnbench.data import random_affine, warp_keypoints
from attnbench.tasks.hit_rate import hit_mass, pixel_centres, source_points

HW = (32, 32)


def thetas(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([random_affine(g) for _ in range(n)])  # (n, 2, 3)


def rate(weights, theta, r):
    masses, count = hit_mass(weights, theta, HW, HW)
    return masses[r] / count


def one_hot_on(points: torch.Tensor) -> torch.Tensor:
    """[B, 1, Nq, Nk] attention on the key pixel nearest each point [B, Nq, 2]."""
    b, nq, _ = points.shape
    cols = points[..., 0].round().clamp(0, HW[1] - 1).long()
    rows = points[..., 1].round().clamp(0, HW[0] - 1).long()
    weights = torch.zeros(b, 1, nq, HW[0] * HW[1], dtype=torch.float64)
    weights.scatter_(-1, (rows * HW[1] + cols)[:, None, :, None], 1.0)
    return weights


def test_source_points_invert_the_keypoint_warp():
    # warp_keypoints moves a source point to where the warped image shows it (via the
    # inverse of theta); the source point of that target pixel is the point we started from.
    theta = thetas(1)[0]
    src = torch.tensor([[10.0, 12.0], [20.0, 5.0], [15.5, 16.0]] + [[-1.0, -1.0]] * 15)
    dst = warp_keypoints(src, theta, HW)
    back = source_points(theta[None], HW, HW)  # for every pixel centre; interpolate the affine
    centres = pixel_centres(HW)
    # The map is affine in the target position: fit it on the pixel centres and apply it.
    design = torch.cat([centres, torch.ones(len(centres), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, back[0][0]).solution  # (3, 2)
    target = torch.cat([dst[:3].double(), torch.ones(3, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(target @ solution, src[:3].double(), atol=1e-4, rtol=0)


def test_an_attention_that_copies_exactly_hits_everywhere():
    theta = thetas()
    points, _ = source_points(theta, HW, HW)
    weights = one_hot_on(points)
    assert rate(weights, theta, 1) == pytest.approx(1.0)
    assert rate(weights, theta, 2) == pytest.approx(1.0)


def test_uniform_attention_hits_the_window_over_the_map():
    theta = thetas()
    n = HW[0] * HW[1]
    weights = torch.full((4, 1, n, n), 1.0 / n, dtype=torch.float64)
    for r in (1, 2):
        area = math.pi * r * r / n  # the disc's share of the map
        assert rate(weights, theta, r) == pytest.approx(area, rel=0.25)


def test_an_attention_off_by_three_pixels_misses():
    theta = thetas()
    points, _ = source_points(theta, HW, HW)
    shifted = points + torch.tensor([3.0, 0.0], dtype=torch.float64)
    weights = one_hot_on(shifted)
    assert rate(weights, theta, 2) < 0.15  # only where clamping at the border moved it back


def test_queries_whose_source_is_outside_do_not_count():
    theta = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # shift right by a quarter map
    _, inside = source_points(theta, HW, HW)
    masses, count = hit_mass(torch.zeros(1, 1, 1024, 1024), theta, HW, HW)
    assert count == int(inside.sum()) == 24 * 32  # source x beyond the last column: 8 columns
    assert masses[1] == 0


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="do not fit"):
        hit_mass(torch.zeros(1, 1, 10, 1024), thetas(1), HW, HW)


def test_hit_mass_equals_the_sum_over_all_keys_within_r():
    # Oracle: every key's distance to the source point, all pairs (what hit_mass avoids).
    theta = thetas(2, seed=3)
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(2, 2, 1024, 1024, generator=g, dtype=torch.float64)
    points, inside = source_points(theta, HW, HW)
    distance = torch.cdist(points, pixel_centres(HW).expand(2, 1024, 2))  # (2, Nq, Nk)
    masses, count = hit_mass(weights, theta, HW, HW)
    for r in (1, 2):
        expected = (weights.mean(1) * (distance <= r)).sum(-1)[inside].sum()
        assert masses[r] == pytest.approx(float(expected), rel=1e-12)
    assert count == int(inside.sum())
