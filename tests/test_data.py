"""Training data: mannequins, heatmaps, affine pairs, image-folder and DeepFashion loaders."""

import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from attnbench.data import (
    KEYPOINT_NAMES,
    AffineCopyDataset,
    DeepFashion,
    ImageFolder,
    Mannequin,
    affine_pair,
    coordinate_map,
    heatmaps,
    random_affine,
    warp_image,
    warp_keypoints,
)
from attnbench.data.appearance import logo_glyph


def visible(keypoints):
    return (keypoints >= 0).all(dim=1)


def torso_histogram(sample, levels=4):
    """Colour histogram (levels^3 bins, normalised) of the box inside shoulders and hips."""
    quad = sample["keypoints"][[2, 5, 8, 11]]  # r_shoulder, l_shoulder, r_hip, l_hip
    centre = quad.mean(0)
    inner = centre + 0.6 * (quad - centre)
    x0, y0 = inner.min(0).values.round().long().tolist()
    x1, y1 = inner.max(0).values.round().long().tolist()
    pixels = sample["image"][:, y0 : y1 + 1, x0 : x1 + 1].reshape(3, -1)
    q = (pixels * levels).long().clamp(max=levels - 1)
    counts = torch.bincount((q[0] * levels + q[1]) * levels + q[2], minlength=levels**3)
    return counts.float() / counts.sum()


def overlap(h1, h2):
    return torch.minimum(h1, h2).sum().item()


def peak(channel):
    """(x, y) of a channel's maximum."""
    index = int(channel.argmax())
    return torch.tensor([index % channel.shape[-1], index // channel.shape[-1]], dtype=torch.float)


# --- mannequin ---------------------------------------------------------------------------------


def test_keypoint_names_are_openpose_18():
    assert len(KEYPOINT_NAMES) == 18
    assert KEYPOINT_NAMES[:2] == ("nose", "neck") and KEYPOINT_NAMES[-1] == "l_ear"
    assert KEYPOINT_NAMES.index("r_hip") == 8 and KEYPOINT_NAMES.index("l_eye") == 15


def test_mannequin_is_deterministic_per_seed_and_index():
    first, again = Mannequin((64, 64)).sample(3, 7), Mannequin((64, 64)).sample(3, 7)
    for key in ("image", "keypoints", "heatmaps"):
        assert torch.equal(first[key], again[key]), f"{key} differs between two identical calls"
    assert first["appearance"] == again["appearance"]
    pair, pair_again = Mannequin((64, 64)).pair(3, 7), Mannequin((64, 64)).pair(3, 7)
    for a, b in zip(pair, pair_again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["keypoints"], b["keypoints"])


def test_different_indices_and_seeds_differ():
    m = Mannequin((64, 64))
    samples = [m.sample(0, 0), m.sample(0, 1), m.sample(1, 0)]
    ids = {s["appearance"] for s in samples}
    assert len(ids) == 3, f"appearance ids collide: {[s['appearance'] for s in samples]}"
    for i in range(3):
        for j in range(i + 1, 3):
            diff = (samples[i]["image"] - samples[j]["image"]).abs().mean().item()
            assert diff > 0.05, f"samples {i} and {j} nearly identical (mean |diff| {diff:.4f})"


def test_pair_keeps_appearance_and_changes_pose():
    m = Mannequin((128, 128))
    for index in range(3):
        a, b = m.pair(5, index)
        other = m.sample(6, index)
        assert a["appearance"] == b["appearance"] != other["appearance"]
        both = visible(a["keypoints"]) & visible(b["keypoints"])
        moved = (a["keypoints"] - b["keypoints"])[both].abs().max().item()
        assert moved > 2.0, f"pair {index}: poses nearly identical (max keypoint move {moved:.2f})"
        same = overlap(torso_histogram(a), torso_histogram(b))
        different = overlap(torso_histogram(a), torso_histogram(other))
        assert same > 0.6, f"pair {index}: torso colours differ between poses (overlap {same:.2f})"
        assert same > different + 0.2, (
            f"pair {index}: torso overlap with itself {same:.2f} vs another appearance "
            f"{different:.2f}"
        )


@pytest.mark.parametrize("size", [(64, 64), (512, 256), (64, 128)])
def test_sizes_and_keypoints_inside_the_canvas(size):
    h, w = size
    m = Mannequin(size, sigma=2.0)
    for index in range(3 if h * w > 10_000 else 8):
        s = m.sample(11, index)
        assert s["image"].shape == (3, h, w) and s["image"].dtype == torch.float32
        assert 0 <= s["image"].min() and s["image"].max() <= 1
        assert s["keypoints"].shape == (18, 2) and s["keypoints"].dtype == torch.float32
        assert s["heatmaps"].shape == (18, h, w) and s["heatmaps"].dtype == torch.float32
        kp, ok = s["keypoints"], visible(s["keypoints"])
        assert ok.sum() >= 16, f"only {int(ok.sum())} visible keypoints"
        assert (kp[~ok] == -1).all(), f"missing keypoints must be (-1, -1), got {kp[~ok]}"
        x, y = kp[ok, 0], kp[ok, 1]
        assert x.max() <= w - 1 and y.max() <= h - 1, f"keypoint outside {size}: {kp[ok].max(0)}"
        # The figure fills the canvas along its limiting side.
        extent = max((x.max() - x.min()) / w, (y.max() - y.min()) / h).item()
        assert extent > 0.5, f"figure spans only {extent:.2f} of the canvas"


def test_logo_glyphs_are_unique_binary_5x5():
    glyphs = {tuple(map(tuple, logo_glyph(i))) for i in range(2000)}
    assert len(glyphs) == 2000, f"{2000 - len(glyphs)} repeated glyphs among 2000 ids"
    assert all(len(g) == 5 and all(len(r) == 5 and set(r) <= {0, 1} for r in g) for g in glyphs)


def test_bad_size_is_rejected():
    with pytest.raises(ValueError, match="size"):
        Mannequin((32, 64))


# --- heatmaps ----------------------------------------------------------------------------------


def test_heatmaps_peak_at_keypoints_and_zero_for_missing():
    g = torch.Generator().manual_seed(0)
    size = (40, 56)
    kp = torch.rand(18, 2, generator=g) * torch.tensor([55.0, 39.0])
    kp[3] = -1
    kp[16] = torch.tensor([-1.0, 10.0])
    maps = heatmaps(kp, size, sigma=2.5)
    assert maps.shape == (18, 40, 56) and maps.max() <= 1
    for k in range(18):
        if k in (3, 16):
            assert maps[k].abs().max() == 0, f"missing keypoint {k} has a non-zero channel"
            continue
        err = (peak(maps[k]) - kp[k]).abs().max().item()
        assert err <= 1.0, f"channel {k} peaks {err:.2f} px from {kp[k].tolist()}"
    # Value sigma pixels away from an integer keypoint is exp(-1/2).
    on_grid = torch.full((18, 2), -1.0)
    on_grid[0] = torch.tensor([20.0, 20.0])
    value = heatmaps(on_grid, size, sigma=2.5)[0, 20, 20 + 5]  # 5 px = 2 sigma
    assert abs(value.item() - torch.exp(torch.tensor(-2.0)).item()) < 1e-5


def test_mannequin_heatmaps_peak_at_its_keypoints():
    s = Mannequin((64, 64), sigma=1.5).sample(2, 4)
    for k in range(18):
        if not visible(s["keypoints"])[k]:
            assert s["heatmaps"][k].max() == 0
            continue
        err = (peak(s["heatmaps"][k]) - s["keypoints"][k]).abs().max().item()
        assert err <= 1.0, f"{KEYPOINT_NAMES[k]}: heatmap peak {err:.2f} px from the keypoint"


# --- affine ------------------------------------------------------------------------------------


def test_random_affine_is_identity_plus_bounded_noise():
    g = torch.Generator().manual_seed(0)
    thetas = torch.stack([random_affine(g) for _ in range(300)])
    dev = thetas - torch.eye(2, 3)
    assert thetas.shape == (300, 2, 3) and thetas.dtype == torch.float32
    assert dev.abs().max() <= 0.15 + 1e-6, f"deviation {dev.abs().max():.4f} beyond 0.15"
    assert dev.abs().amax(dim=0).min() > 0.14, "noise does not cover the range on every entry"
    assert (dev.mean(dim=0).abs() < 0.03).all(), f"noise not centred: {dev.mean(dim=0)}"


@pytest.mark.parametrize("size", [(48, 48), (40, 64)])
def test_warp_moves_a_dot_to_the_warped_keypoint(size):
    h, w = size
    g = torch.Generator().manual_seed(1)
    checked = 0
    for _ in range(12):
        theta = random_affine(g)
        kp = torch.full((18, 2), -1.0)
        x, y = (
            torch.randint(8, w - 8, (1,), generator=g),
            torch.randint(8, h - 8, (1,), generator=g),
        )
        kp[0] = torch.tensor([float(x), float(y)])
        image = torch.zeros(3, h, w)
        image[:, int(y), int(x)] = 1.0
        warped_kp = warp_keypoints(kp, theta, size)
        if not visible(warped_kp)[0]:
            continue
        warped = warp_image(image, theta)
        assert warped.shape == image.shape
        found = peak(warped[0])
        err = (found - warped_kp[0]).abs().max().item()
        assert err <= 1.0, f"dot at {found.tolist()}, warped keypoint {warped_kp[0].tolist()}"
        assert (warp_keypoints(kp, theta, size)[1:] == -1).all(), "missing keypoints must stay -1"
        checked += 1
    assert checked >= 8


def test_keypoints_warped_off_the_canvas_become_missing():
    theta = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]])  # content moves left by a quarter
    kp = torch.full((18, 2), -1.0)
    kp[0] = torch.tensor([4.0, 10.0])  # lands left of the canvas
    kp[1] = torch.tensor([30.0, 10.0])  # lands at x = 30 - 8 = 22
    out = warp_keypoints(kp, theta, (32, 32))
    assert (out[0] == -1).all(), f"off-canvas keypoint kept: {out[0].tolist()}"
    assert torch.allclose(out[1], torch.tensor([22.0, 10.0]), atol=1e-4), out[1]


def test_warp_image_batched_equals_single():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 16, 20, generator=g)
    thetas = torch.stack([random_affine(g), random_affine(g)])
    batched = warp_image(images, thetas)
    for i in range(2):
        assert torch.allclose(batched[i], warp_image(images[i], thetas[i]), atol=1e-6)
    with pytest.raises(ValueError, match="theta"):
        warp_image(images[0], thetas)


def test_affine_pair_with_keypoints():
    s = Mannequin((64, 64)).sample(0, 3)
    pair = affine_pair(s, torch.Generator().manual_seed(0), sigma=1.5)
    assert set(pair) == {
        "source",
        "source_pose",
        "target",
        "target_pose",
        "theta",
        "target_keypoints",
    }
    assert torch.equal(pair["source"], s["image"])
    assert pair["target"].shape == (3, 64, 64) and pair["target_pose"].shape == (18, 64, 64)
    assert torch.allclose(pair["target"], warp_image(s["image"], pair["theta"]))
    assert torch.equal(
        pair["target_keypoints"], warp_keypoints(s["keypoints"], pair["theta"], (64, 64))
    )
    assert torch.allclose(pair["target_pose"], heatmaps(pair["target_keypoints"], (64, 64), 1.5))


# --- image folder ------------------------------------------------------------------------------


def write_image(path, size_wh, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size_wh, colour).save(path)


def test_image_folder(tmp_path):
    write_image(tmp_path / "b.png", (40, 30), (255, 0, 0))
    write_image(tmp_path / "a.jpg", (20, 20), (0, 255, 0))
    write_image(tmp_path / "sub" / "c.BMP", (10, 30), (0, 0, 255))
    (tmp_path / "notes.txt").write_text("not an image")
    folder = ImageFolder(tmp_path, (24, 16))
    assert len(folder) == 3
    assert [p.name for p in folder.files] == ["a.jpg", "b.png", "c.BMP"]
    s = folder[1]
    assert s["image"].shape == (3, 24, 16) and s["image"].dtype == torch.float32
    assert torch.allclose(s["image"][:, 5, 5], torch.tensor([1.0, 0.0, 0.0]), atol=0.02)
    assert s["keypoints"] is None and folder.pose_channels == 2
    assert torch.equal(s["heatmaps"], coordinate_map((24, 16)))
    with pytest.raises(IndexError):
        folder.sample(3)


def test_image_folder_without_images_names_folder_and_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError) as err:
        ImageFolder(tmp_path, (32, 32))
    assert str(tmp_path) in str(err.value) and ".png" in str(err.value)


def test_affine_pair_without_keypoints_warps_the_coordinate_map(tmp_path):
    write_image(tmp_path / "x.png", (32, 32), (10, 200, 30))
    s = ImageFolder(tmp_path, (32, 32)).sample(0)
    pair = affine_pair(s, torch.Generator().manual_seed(4), sigma=2.0)
    assert pair["target_keypoints"] is None and pair["target_pose"].shape == (2, 32, 32)
    # The target pose at a pixel is the normalised source position that pixel samples.
    theta, coords = pair["theta"], coordinate_map((32, 32))
    xy1 = torch.tensor([coords[0, 16, 16], coords[1, 16, 16], 1.0])
    assert torch.allclose(pair["target_pose"][:, 16, 16], theta @ xy1, atol=1e-4)


# --- DeepFashion -------------------------------------------------------------------------------

YS = [20 + 10 * k for k in range(18)]  # rows 20..190: distinct from the columns
XS = [5 + 9 * k for k in range(18)]  # columns 5..158


def write_deepfashion(root, annotation_rows, pairs_rows=("a.png,b.png",)):
    for name in ("a.png", "b.png", "c.png"):
        write_image(root / "img" / name, (176, 256), (128, 128, 128))
    lines = ["name:keypoints_y:keypoints_x", *annotation_rows]
    (root / "ann.csv").write_text("\n".join(lines) + "\n")
    (root / "pairs.csv").write_text("\n".join(["from,to", *pairs_rows]) + "\n")
    return root / "img", root / "ann.csv", root / "pairs.csv"


def row(name, ys=YS, xs=XS):
    return f"{name}: {json.dumps(ys)}: {json.dumps(xs)}"


def test_deepfashion_reads_keypoints_in_xy_order_and_pairs(tmp_path):
    ys_missing = list(YS)
    ys_missing[4] = -1
    xs_missing = list(XS)
    xs_missing[17] = -1
    rows = [row("a.png"), row("b.png", ys_missing, xs_missing), row("c.png")]
    images, ann, pairs = write_deepfashion(tmp_path, rows, ["a.png,b.png", "c.png,a.png"])
    data = DeepFashion(images, ann, pairs, size=(256, 176), sigma=3.0)
    assert len(data) == 3 and data.pose_channels == 18
    s = data.sample(0)
    assert s["image"].shape == (3, 256, 176) and s["heatmaps"].shape == (18, 256, 176)
    assert s["keypoints"][:, 0].tolist() == XS, "x must come from keypoints_x"
    assert s["keypoints"][:, 1].tolist() == YS, "y must come from keypoints_y"
    assert torch.equal(peak(s["heatmaps"][2]), torch.tensor([float(XS[2]), float(YS[2])]))
    b = data.sample(1)["keypoints"]
    assert (b[4] == -1).all() and (b[17] == -1).all(), "a -1 in either coordinate is missing"
    assert data.pairs() == [("a.png", "b.png"), ("c.png", "a.png")]
    first, second = data.pair(1)
    assert (first["name"], second["name"]) == ("c.png", "a.png")
    assert data.sample(1)["heatmaps"][4].max() == 0


def test_deepfashion_rescales_keypoints_with_the_image(tmp_path):
    images, ann, _ = write_deepfashion(tmp_path, [row("a.png")])
    s = DeepFashion(images, ann, size=(128, 88)).sample(0)
    assert s["image"].shape == (3, 128, 88)
    expected = torch.tensor([[(x + 0.5) / 2 - 0.5, (y + 0.5) / 2 - 0.5] for x, y in zip(XS, YS)])
    assert torch.allclose(s["keypoints"], expected), "keypoints must follow the resize"
    padded = DeepFashion(images, ann, size=(256, 256), fit="pad").sample(0)
    assert padded["image"].shape == (3, 256, 256)
    assert torch.allclose(padded["keypoints"][:, 0], torch.tensor(XS, dtype=torch.float) + 40)


@pytest.mark.parametrize(
    "bad_row, message",
    [
        (row("b.png", YS[:17]), "keypoints_y has 17 values"),
        (row("b.png", YS, XS + [3]), "keypoints_x has 19 values"),
        (row("zzz.png"), "unknown image 'zzz.png'"),
        ("b.png: [1, 2", "expected 3 fields"),
        (row("b.png", ["a"] * 18), "not a list of numbers"),
    ],
)
def test_deepfashion_malformed_line_names_file_and_line(tmp_path, bad_row, message):
    images, ann, _ = write_deepfashion(tmp_path, [row("a.png"), bad_row])
    with pytest.raises(ValueError) as err:
        DeepFashion(images, ann)
    text = str(err.value)
    assert "ann.csv" in text and "line 3" in text and message in text, text


def test_deepfashion_pairs_with_unknown_names_are_rejected(tmp_path):
    images, ann, pairs = write_deepfashion(tmp_path, [row("a.png")], ["a.png,b.png"])
    with pytest.raises(ValueError, match=r"pairs.csv, line 2: unknown image 'b.png'"):
        DeepFashion(images, ann, pairs)


# --- training dataset --------------------------------------------------------------------------


def test_affine_copy_dataset_is_reproducible_and_batches():
    data = AffineCopyDataset(Mannequin((64, 64)), length=4, seed=0, sigma=1.5)
    item, again = data[2], AffineCopyDataset(Mannequin((64, 64)), 4, 0, 1.5)[2]
    for key in item:
        assert torch.equal(item[key], again[key]), f"{key} differs between identical datasets"
    other = AffineCopyDataset(Mannequin((64, 64)), length=4, seed=1, sigma=1.5)[2]
    assert not torch.equal(item["theta"], other["theta"])
    assert not torch.equal(item["source"], other["source"])
    assert not torch.equal(data[1]["theta"], data[2]["theta"])
    batch = next(iter(DataLoader(data, batch_size=2, num_workers=0)))
    shapes = {key: tuple(value.shape) for key, value in batch.items()}
    assert shapes == {
        "source": (2, 3, 64, 64),
        "source_pose": (2, 18, 64, 64),
        "target": (2, 3, 64, 64),
        "target_pose": (2, 18, 64, 64),
        "theta": (2, 2, 3),
        "target_keypoints": (2, 18, 2),
    }
    with pytest.raises(IndexError):
        data[4]


def test_affine_copy_dataset_over_folders(tmp_path):
    write_image(tmp_path / "one.png", (32, 32), (200, 10, 10))
    write_image(tmp_path / "two.png", (32, 32), (10, 10, 200))
    data = AffineCopyDataset(ImageFolder(tmp_path, (32, 32)), length=3, seed=5, sigma=2.0)
    assert data.pose_channels == 2
    batch = next(iter(DataLoader(data, batch_size=3)))
    assert set(batch) == {"source", "source_pose", "target", "target_pose", "theta"}
    assert batch["source_pose"].shape == (3, 2, 32, 32)
    assert torch.equal(batch["source"][0], batch["source"][2]), "item i uses image i % len"

    rows = [row("a.png"), row("b.png"), row("c.png")]
    images, ann, _ = write_deepfashion(tmp_path / "df", rows)
    fashion = AffineCopyDataset(DeepFashion(images, ann, size=(64, 44)), 2, seed=0, sigma=2.0)
    item = fashion[0]
    assert item["target_pose"].shape == (18, 64, 44) and item["target_keypoints"].shape == (18, 2)
