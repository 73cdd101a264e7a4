"""The pose-morphing task: its data, copy score, discriminator, FID, and the training loop."""

import os
import sys

import pytest
import torch

from attnbench import harness
from attnbench.data import Mannequin, PosePairDataset, coordinate_map, limb_flow, random_affine
from attnbench.generators import Discriminator
from attnbench.metrics import MetricUnavailable, fid, fid_model, fid_weights_file
from attnbench.results import read_rows
from attnbench.suite import SuiteError, load_suites
from attnbench.tasks import distributed, training
from attnbench.tasks.hit_rate import correspondence_points, source_points

SUITES = os.path.join(os.path.dirname(__file__), "..", "suites")
TINY = """
kind: train
task: pose
generator: {learn_temperature: true, temperature_init: 16.0, coords: pose, copy_init: match}
implementations:
  - name: gpa.torch
steps: 4
batch: 2
seeds: [0]
lr: 0.001
checkpoint_every: 2
eval_batch: 4
grid_samples: 2
loss: l1
pose: {gan: 0.1, discriminator: {r1_every: 2, channels: [8, 8, 8, 8]}}
data: {train_size: 8, test_size: 4, pose: heatmaps+coords}
"""


def test_correspondence_of_a_figure_with_itself_is_the_identity():
    m = Mannequin((64, 64))
    figure = m.sample(0, 3)
    corr = m.correspondence(figure, figure)
    on = figure["part_map"] >= 0
    assert on.any() and torch.equal(corr[0] >= 0, on), "every figure pixel, and only those"
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    assert torch.allclose(corr[0][on], cols[on], atol=1e-4)
    assert torch.allclose(corr[1][on], rows[on], atol=1e-4)


def test_correspondence_finds_the_pixels_that_show_the_same_texture():
    # Sampling the source at the correspondence redraws the target's figure (up to the
    # anti-aliased edges), far better than the same pixel of the source does.
    m = Mannequin((64, 64))
    for index in range(4):
        first, second = m.pair(0, index)
        corr = m.correspondence(first, second)
        valid = corr[0] >= 0
        col, row = corr[0].round().long().clamp(0, 63), corr[1].round().long().clamp(0, 63)
        copied = (first["image"][:, row, col] - second["image"]).abs().mean(0)[valid].mean()
        same_place = (first["image"] - second["image"]).abs().mean(0)[valid].mean()
        assert copied < 0.35 * same_place


def test_limb_flow_of_one_pose_is_the_coordinate_map():
    figure = Mannequin((64, 64)).sample(0, 1)
    flow = limb_flow(figure["keypoints"], figure["keypoints"], (64, 64))
    assert torch.allclose(flow, coordinate_map((64, 64)), atol=1e-6)


def test_limb_flow_follows_a_shifted_pose():
    source = Mannequin((64, 64)).sample(0, 2)["keypoints"]
    present = (source >= 0).all(-1, keepdim=True)
    target = torch.where(present, source + torch.tensor([5.0, -3.0]), source)
    flow = limb_flow(source, target, (64, 64), radius=4)
    x = ((flow[0] + 1) * 64 - 1) / 2  # back to pixels
    grid = coordinate_map((64, 64))
    moved = ~torch.isclose(flow, grid).all(0)  # pixels near a limb
    cols = torch.arange(64.0).expand(64, 64)
    inside = moved & (cols >= 5)  # the source position is not clamped at the border
    assert inside.sum() > 50
    assert torch.allclose(x[inside], cols[inside] - 5, atol=1e-3)


def test_pose_pairs_hold_both_poses_the_self_pair_and_the_correspondence():
    data = PosePairDataset(Mannequin((64, 64)), 3, seed=0, sigma=2.0, coords=True)
    item = data[1]
    assert data.pose_channels == 20
    for key in ("source_pose", "target_pose", "self_target_pose"):
        assert item[key].shape == (20, 64, 64)
    assert torch.equal(item["source_pose"][-2:], coordinate_map((64, 64)))
    assert not torch.equal(item["source"], item["target"])
    assert torch.equal(data[1]["target"], item["target"]), "items are reproducible"
    assert item["correspondence"].shape == (2, 64, 64)


def test_correspondence_points_agree_with_the_warp_they_sample():
    # A correspondence map made from an affine warp at 64x64, read at a 32x32 block, gives the
    # warp's own source points up to the half full-resolution pixel of the nearest sample.
    theta = random_affine(torch.Generator().manual_seed(0))[None]
    full, inside_full = source_points(theta, (64, 64), (64, 64))
    corr = torch.where(inside_full[..., None], full, torch.full_like(full, -1.0))
    corr = corr.transpose(1, 2).reshape(1, 2, 64, 64).float()
    points, inside = correspondence_points(corr, (32, 32), (32, 32))
    exact, _ = source_points(theta, (32, 32), (32, 32))
    assert inside.float().mean() > 0.5
    assert (points - exact)[inside].abs().max() < 0.35


def test_discriminator_scores_pairs_and_checks_its_sizes():
    d = Discriminator((64, 64), pose_channels=20, channels=(8, 16, 16, 16))
    assert d(torch.rand(3, 3, 64, 64), torch.rand(3, 20, 64, 64)).shape == (3,)
    with pytest.raises(ValueError, match="2 entries .allowed: 4"):
        Discriminator((64, 64), pose_channels=20, channels=(8, 16))
    with pytest.raises(ValueError, match="image_size"):
        Discriminator((48, 48), pose_channels=20, channels=(8, 16))


def test_fid_against_the_closed_form_for_gaussian_features():
    # With the features being the images themselves, FID of two Gaussian sets is the
    # Fréchet distance of their statistics: here |mean difference|² (equal covariances).
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4000, 3, 1, 1, generator=g) * 0.1 + 0.5
    features = torch.nn.Module()
    features.forward = lambda x: [x]
    assert fid(base, base, model=features) == pytest.approx(0.0, abs=1e-9)
    shifted = base + torch.tensor([0.1, 0.0, -0.1]).view(1, 3, 1, 1)
    expected = 0.02 + 0.0  # 0.1² + 0.1²
    assert fid(base, shifted, model=features) == pytest.approx(expected, rel=0.02)
    noisy = base + 0.05 * torch.randn(base.shape, generator=g)
    noisier = base + 0.2 * torch.randn(base.shape, generator=g)
    assert 0 < fid(base, noisy, model=features) < fid(base, noisier, model=features)


def test_fid_reports_the_missing_weights_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("ATTNBENCH_ALLOW_DOWNLOADS", raising=False)
    with pytest.raises(MetricUnavailable) as err:
        fid_model()
    path = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert str(path) in str(err.value)


def test_fid_loads_inception_weights_found_on_disk(tmp_path, monkeypatch):
    # The loading path with a weights file made here: pytorch-fid's Inception, randomly
    # initialised (fid_inception_v3 builds the network, then loads the file it is handed; it
    # is handed the network's own fresh weights).
    import pytorch_fid.inception as inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(
        inception,
        "load_state_dict_from_url",
        lambda url, progress=True: sys._getframe(1).f_locals["inception"].state_dict(),
    )
    torch.manual_seed(0)
    weights = inception.fid_inception_v3().state_dict()
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fid_weights_file().parent.mkdir(parents=True)
    torch.save(weights, fid_weights_file())
    model = fid_model()
    assert torch.equal(
        model.state_dict()["blocks.0.0.conv.weight"], weights["Conv2d_1a_3x3.conv.weight"]
    )
    images = torch.rand(2, 3, 32, 32)
    assert fid(images, images, model=model) == pytest.approx(0.0, abs=1e-6)


def test_pose_rows_metrics_and_grid(tmp_path, suite_from_text, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    path, (row,) = harness.run_suite(suite_from_text(TINY), tmp_path, progress=False)
    assert row["status"] == "ok", row["reason"]
    assert row["task"] == "pose" and row["task_config"]["gan"] == 0.1
    assert 0 < row["test_l1"] < 1 and row["psnr"] > 0 and row["steps"] == 4
    assert row["fid"] is None and "pt_inception-2015-12-05-6726825d.pth" in row["reason"]
    assert row["lpips"] is None and "vgg16-397923af.pth" in row["reason"]
    assert 0 <= row["copy_hit_rate"]["largest"] <= 1
    from PIL import Image

    with Image.open(tmp_path / row["grid_png"]) as image:  # M1, B1, B2, output, M2
        assert image.size == (5 * 66 + 2, 2 * 66 + 2)
    assert read_rows([path])[0]["case_id"] == row["case_id"]


def test_resumed_pose_run_equals_an_uninterrupted_one(tmp_path, suite_from_text, monkeypatch):
    suite = suite_from_text(TINY)
    _, (whole,) = harness.run_suite(suite, tmp_path / "whole", progress=False)
    real_save = training.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        assert "discriminator" in state and "d_optimiser" in state
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        harness.run_suite(suite, tmp_path / "cut", progress=False)
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    _, (resumed,) = harness.run_suite(suite, tmp_path / "cut", resume=True, progress=False)
    for key in ("test_l1", "test_loss", "ssim", "psnr"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-5), key
    assert resumed["copy_hit_rate"]["largest"] == pytest.approx(whole["copy_hit_rate"]["largest"])


def test_two_process_ddp_keeps_both_networks_identical(torchrun_suite):
    row = torchrun_suite(TINY.replace("steps: 4", "steps: 2"))
    assert row["status"] == "ok", row["reason"]
    assert row["world_size"] == 2 and row["replicas_identical"] is True


def test_replicas_check_covers_the_discriminator(monkeypatch):
    # replicas_identical compares every network it is given, so a discriminator that differs
    # between ranks is caught (two fake ranks: all_gather hands back the other's weights).
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))

    def gather(out, flat):
        out[0].copy_(flat)
        out[1].copy_(flat + torch.tensor([0.0] * (len(flat) - 1) + [1.0]))

    monkeypatch.setattr(distributed.dist, "all_gather", gather)
    assert not distributed.replicas_identical(a, b)


def test_pose_suites_validate():
    for name in ("pose.yaml", "pose-paper.yaml"):
        (suite,) = load_suites(os.path.join(SUITES, name))
        assert suite.task == "pose", name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("task: pose\n", "pose: only for task: pose"),
        ("data: {", "'folder' has no poses"),
        ("pose: {gan: 0.1", "every loss weight is 0"),
    ],
)
def test_pose_settings_are_checked(suite_from_text, change, message):
    text = {
        "task: pose\n": TINY.replace("task: pose\n", ""),
        "data: {": TINY.replace("data: {", "data: {source: folder, root: /tmp, "),
        "pose: {gan: 0.1": TINY.replace("pose: {gan: 0.1", "pose: {perceptual: 0, self: 0, gan: 0"),
    }[change]
    with pytest.raises(SuiteError, match=message):
        suite_from_text(text)
