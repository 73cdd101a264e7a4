"""Picture figures of `attnbench report`: grid tiles, copying outputs and the keys GPA keeps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.patches import ConnectionPatch, Rectangle
from PIL import Image

from attnbench import registry
from attnbench.impls.gpa.pytorch import select_keys
from attnbench.inputs import make_inputs, random_affine, random_images
from attnbench.report.pictures import (
    ALPHA_FLOOR,
    GRID_COLUMNS,
    MIN_VALID,
    choose_cells,
    copying_outputs_figure,
    crop_tile,
    read_grid,
    selected_keys_example,
    selected_keys_figure,
)
from attnbench.spec import AttentionSpec
from attnbench.tasks.copying import save_grid

TILE = 6  # side of the tiles in the test grids
EIGHT_BIT = 0.6 / 255  # save_image rounds to 8 bits
SMALL = dict(map_size=32, phase1_res=8, cell=2, topk=6)  # d=4, s=2: 4x4 cells, 64 low-res keys


def write_grid(path, n: int, seed: int) -> np.ndarray:
    """Write a save_grid PNG of constant-colour tiles; return each tile's colour (n, 5, 3)."""
    g = torch.Generator().manual_seed(seed)
    # Colours stay away from the white padding, so a crop that takes in padding is caught.
    source, output, target = (0.05 + 0.8 * torch.rand(n, 3, generator=g) for _ in range(3))
    grey = 0.05 + 0.8 * torch.rand(n, generator=g)
    pose = torch.zeros(n, 2, TILE, TILE)
    pose[:, 1] = grey[:, None, None]  # pose_picture: the max over pose channels, as grey

    def tiles(colour):
        return colour[:, :, None, None].expand(-1, -1, TILE, TILE).clone()

    batch = {"source": tiles(source), "target_pose": pose, "target": tiles(target)}
    save_grid(path, batch, tiles(output))
    expected = [source, grey[:, None].expand(-1, 3), output, target, (output - target).abs()]
    return torch.stack(expected, dim=1).numpy()


def test_crop_tile_matches_the_colours_written(tmp_path):
    path = tmp_path / "grid.png"
    expected = write_grid(path, n=3, seed=0)
    grid = read_grid(path)
    assert grid.shape == (3 * (TILE + 2) + 2, 5 * (TILE + 2) + 2, 3)
    for i in range(3):
        for j in range(len(GRID_COLUMNS)):
            tile = crop_tile(grid, i, j)
            assert tile.shape == (TILE, TILE, 3)
            np.testing.assert_allclose(
                tile, np.broadcast_to(expected[i, j], tile.shape), atol=EIGHT_BIT
            )
    with pytest.raises(IndexError, match="sample 3"):
        crop_tile(grid, 3, 0)


@pytest.mark.parametrize(
    "size", [(5 * (TILE + 2) + 3, 3 * (TILE + 2) + 2), (42, 3 * (TILE + 2) + 5)]
)
def test_read_grid_rejects_a_png_off_the_layout(tmp_path, size):
    path = tmp_path / "bad.png"
    Image.new("RGB", size).save(path)
    with pytest.raises(ValueError, match="bad.png") as info:
        read_grid(path)
    assert f"{size[0]}x{size[1]}" in str(info.value)
    with pytest.raises(ValueError, match="bad.png"):
        copying_outputs_figure([("a", path)], "title")


def test_copying_outputs_figure(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    write_grid(a, n=3, seed=1)
    write_grid(b, n=3, seed=2)
    fig = copying_outputs_figure([("method A", a), ("method B", b)], "Copying outputs", samples=2)
    assert fig.get_suptitle() == "Copying outputs"
    axes = np.array(fig.axes).reshape(4, 2)
    assert all(len(ax.images) == 1 for ax in axes.flat)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["source", "target", "method A", "method B"]
    assert [ax.get_title() for ax in axes[0]] == ["held-out sample 1", "held-out sample 2"]
    grid_a, grid_b = read_grid(a), read_grid(b)
    source, output, target = (GRID_COLUMNS.index(c) for c in ("source", "output", "target"))
    for i in range(2):  # reference rows come from the first grid, outputs from each entry's
        for row, grid, column in ((0, grid_a, source), (1, grid_a, target), (2, grid_a, output)):
            np.testing.assert_array_equal(
                axes[row, i].images[0].get_array(), crop_tile(grid, i, column)
            )
        np.testing.assert_array_equal(
            axes[3, i].images[0].get_array(), crop_tile(grid_b, i, output)
        )


def test_copying_outputs_figure_uses_the_samples_there_are(tmp_path):
    write_grid(tmp_path / "a.png", n=2, seed=3)
    fig = copying_outputs_figure([("m", tmp_path / "a.png")], "t", samples=5)
    assert len(fig.axes) == 3 * 2


def direct_selection(seed: int, affinity: str = "dot", **sizes):
    """(geometry, keys [m, κ], relevance [m, κ]) from select_keys run on the same inputs."""
    spec = AttentionSpec.square(sizes["map_size"], 32, v_channels=3)
    gpa = registry.create(
        "gpa.torch", phase1_res=sizes["phase1_res"], cell=sizes["cell"], topk=sizes["topk"]
    )
    geom = gpa.geometry(spec)
    inputs = make_inputs("warp-copy", spec, seed)
    keys, relevance = select_keys(inputs.q, inputs.k, geom, affinity, with_relevance=True)
    return geom, keys[0, 0].numpy(), relevance[0, 0].numpy()


def test_selected_keys_example_is_select_keys():
    example = selected_keys_example(**SMALL, n_cells=3, seed=1)
    geom, keys, relevance = direct_selection(1, **SMALL)
    assert example.geometry == geom
    assert len(set(example.cells)) == 3
    np.testing.assert_array_equal(example.keys, keys[example.cell_indices])
    np.testing.assert_allclose(example.relevance, relevance[example.cell_indices])
    side = geom.cell_side
    for r, c in example.cells:  # chosen cells are mostly inside the warp's valid area
        assert (
            example.valid[r * side : (r + 1) * side, c * side : (c + 1) * side].mean() >= MIN_VALID
        )
    alphas = example.alphas()
    assert alphas.shape == example.keys.shape
    assert np.all((alphas >= ALPHA_FLOOR) & (alphas <= 1))
    relative = example.relevance / example.relevance.max(axis=1, keepdims=True)
    np.testing.assert_allclose(alphas, np.maximum(relative, ALPHA_FLOOR))
    again = selected_keys_example(**SMALL, n_cells=3, seed=1)
    assert again.cells == example.cells
    np.testing.assert_array_equal(again.keys, example.keys)


def test_selected_keys_figure(tmp_path):
    example = selected_keys_example(**SMALL, n_cells=3, seed=1)
    fig = selected_keys_figure(**SMALL, n_cells=3, seed=1)
    title = fig.get_suptitle()
    assert all(part in title for part in ("32x32", "d=4", "s=2", "κ=6", "warp-copy"))
    ax_q, ax_k = fig.axes
    assert (ax_q.get_title(), ax_k.get_title()) == ("queries: warped copy", "keys: source image")
    for ax in (ax_q, ax_k):
        assert "(pixels)" in ax.get_xlabel() and "(pixels)" in ax.get_ylabel()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        f"cell (row {r}, col {c})" for r, c in example.cells
    ]
    side, d = example.geometry.cell_side, example.geometry.d
    cells = [p for p in ax_q.patches if isinstance(p, Rectangle)]
    assert [p.get_xy() for p in cells] == [(c * side, r * side) for r, c in example.cells]
    blocks = [p for p in ax_k.patches if isinstance(p, Rectangle)]
    np.testing.assert_array_equal(
        [p.get_xy() for p in blocks], example.block_corners().reshape(-1, 2)
    )
    assert all(p.get_width() == p.get_height() == d for p in blocks)
    lines = [a for a in fig.artists if isinstance(a, ConnectionPatch)]
    np.testing.assert_allclose([line.get_alpha() for line in lines], example.alphas().ravel())
    topk = example.keys.shape[1]
    starts = [((c + 0.5) * side, (r + 0.5) * side) for r, c in example.cells for _ in range(topk)]
    np.testing.assert_array_equal([line.xy1 for line in lines], starts)
    np.testing.assert_array_equal(
        [line.xy2 for line in lines], example.block_corners().reshape(-1, 2) + d / 2
    )
    path = tmp_path / "keys.png"
    fig.savefig(path)
    assert path.stat().st_size > 0


def test_choose_cells_spreads_along_the_diagonal_and_avoids_invalid_cells():
    valid = np.ones((32, 32), dtype=bool)
    assert choose_cells(valid, (4, 4), 2) == [(0, 0), (3, 3)]
    valid[:16, :16] = False  # the top-left 2x2 cells have no true match
    valid[16:20, 16:24] = False  # cell (2, 2) has half of one
    chosen = choose_cells(valid, (4, 4), 4)
    assert len(set(chosen)) == 4
    assert all(r >= 2 or c >= 2 for r, c in chosen)
    assert (2, 2) not in chosen
    assert chosen[-1] == (3, 3)
    with pytest.raises(ValueError, match="n_cells=17"):
        choose_cells(valid, (4, 4), 17)


def test_every_block_is_kept_when_topk_is_every_low_res_key():
    sizes = {**SMALL, "topk": 64}
    example = selected_keys_example(**sizes, n_cells=2, seed=0)
    np.testing.assert_array_equal(example.keys, np.tile(np.arange(64), (2, 1)))
    fig = selected_keys_figure(**sizes, n_cells=2, seed=0)
    assert len(fig.axes[1].patches) == 2 * 64


def true_match(seed: int, size: int, xy: np.ndarray) -> np.ndarray:
    """Where the warp-copy of ``seed`` takes query pixel positions ``xy`` (.., 2) in the source.

    Re-draws the warp the way make_inputs does, and checks it reproduces make_inputs' target.
    """
    g = torch.Generator().manual_seed(seed)
    source = random_images(1, (size, size), g)
    theta = random_affine(1, g)
    target = F.grid_sample(
        source, F.affine_grid(theta, [1, 3, size, size], align_corners=False), align_corners=False
    )
    made = make_inputs("warp-copy", AttentionSpec.square(size, 32, v_channels=3), seed).target
    assert torch.allclose(target.permute(0, 2, 3, 1).reshape(-1, 3), made[0, 0]), "warp re-draw"
    normalised = 2 * xy / size - 1  # align_corners=False: pixel edges at -1 and 1
    warped = normalised @ theta[0, :, :2].numpy().T + theta[0, :, 2].numpy()
    return (warped + 1) * size / 2


@pytest.mark.parametrize("seed", [0, 1])
def test_a_kept_block_lies_at_each_cells_true_match(seed):
    # With the euclid affinity (the authors' module) the warp-copy features match well: for
    # every query cell fully inside the warp, some kept block's centre lies within one block
    # side d of where the warp takes the cell's centre. A random choice of κ=6 of the 64
    # blocks passes for a cell about one time in four.
    example = selected_keys_example(**SMALL, n_cells=16, seed=seed, affinity="euclid")
    side, d = example.geometry.cell_side, example.geometry.d
    centres = np.array([((c + 0.5) * side, (r + 0.5) * side) for r, c in example.cells])
    matches = true_match(seed, SMALL["map_size"], centres)
    blocks = example.block_corners() + d / 2
    full = [
        example.valid[r * side : (r + 1) * side, c * side : (c + 1) * side].all()
        for r, c in example.cells
    ]
    assert sum(full) >= 6
    for n in np.flatnonzero(full):
        distance = np.hypot(*(blocks[n] - matches[n]).T)
        assert distance.min() <= d, (example.cells[n], matches[n], blocks[n])


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="n_cells=17"):
        selected_keys_example(**SMALL, n_cells=17)
    with pytest.raises(ValueError, match="phase1_res=5"):
        selected_keys_figure(**{**SMALL, "phase1_res": 5})
