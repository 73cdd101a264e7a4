"""Picture figures for ``attnbench report``: copying outputs and the keys GPA keeps.

Two figures after Jetchev, Yildirim, Bracher and Vollgraf, "Grid Partitioned Attention:
Efficient Transformer Approximation with Inductive Bias for High Resolution Detail Generation"
(2021, arXiv 2107.03742):

- :func:`copying_outputs_figure` (their Fig. 5b): held-out samples of the affine-copying task
  as columns; the source and the target, then one row of outputs per method. It reads the PNG
  grids that :func:`attnbench.tasks.copying.save_grid` writes.
- :func:`selected_keys_figure` (their Fig. 9): on a ``warp-copy`` input (queries from an
  affinely warped copy of a random image, keys from the image itself), a few query cells and
  the κ low-resolution key blocks GPA's phase 1 keeps for each, joined by lines whose opacity
  follows the key's relevance. :func:`selected_keys_example` computes what it draws.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot; the caller
saves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch, Rectangle
from PIL import Image

if TYPE_CHECKING:
    from attnbench.impls.gpa.common import Geometry

GRID_COLUMNS = ("source", "target pose", "output", "target", "|error|")  # save_grid's columns
GRID_PADDING = 2  # save_grid's padding between and around tiles, in pixels
MIN_VALID = 0.75  # a query cell is eligible when this share of its pixels has a true match
ALPHA_FLOOR = 0.15  # weakest line opacity, so that low-relevance keys stay visible


def read_grid(path: Path) -> np.ndarray:
    """Read a PNG grid written by ``save_grid`` and check its layout.

    Args:
        path: the PNG: N samples x 5 columns of square T x T tiles, 2-pixel padding, so
            width 5 (T + 2) + 2 and height N (T + 2) + 2.

    Returns:
        The image as float RGB in [0, 1], shape (height, width, 3).

    Raises:
        ValueError: naming the file, the size found and the size expected, when the image
            does not fit the 5-column layout.
    """
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    height, width = pixels.shape[:2]
    n_cols, pad = len(GRID_COLUMNS), GRID_PADDING
    layout = (
        f"{n_cols} columns of square T x T tiles "
        f"(width {n_cols}*(T+{pad})+{pad}, height N*(T+{pad})+{pad})"
    )
    if (width - pad) % n_cols or (width - pad) // n_cols <= pad:
        raise ValueError(
            f"{path}: {width}x{height} pixels does not fit save_grid's layout of {layout}: "
            f"the width {width} is not {n_cols}*(T+{pad})+{pad} for any tile side T >= 1"
        )
    step = (width - pad) // n_cols
    if (height - pad) % step or height <= pad:
        raise ValueError(
            f"{path}: {width}x{height} pixels does not fit save_grid's layout of {layout}: "
            f"the width gives T={step - pad}, so the height must be N*{step}+{pad} "
            f"(e.g. {step + pad} or {2 * step + pad}), not {height}"
        )
    return pixels


def grid_samples(grid: np.ndarray) -> int:
    """Number of samples (rows of tiles) in a grid image from :func:`read_grid`."""
    step = (grid.shape[1] - GRID_PADDING) // len(GRID_COLUMNS)
    return (grid.shape[0] - GRID_PADDING) // step


def crop_tile(grid: np.ndarray, sample: int, column: int) -> np.ndarray:
    """One tile of a ``save_grid`` image, without its padding.

    Args:
        grid: image from :func:`read_grid`, (height, width, channels).
        sample: row of the grid (held-out sample), from 0.
        column: index into :data:`GRID_COLUMNS` (0 source, 1 target pose, 2 output, 3 target,
            4 |error|).

    Returns:
        The T x T tile, (T, T, channels).

    Raises:
        IndexError: ``sample`` or ``column`` outside the grid.
    """
    n = grid_samples(grid)
    if not (0 <= sample < n and 0 <= column < len(GRID_COLUMNS)):
        raise IndexError(
            f"tile (sample {sample}, column {column}) is outside the grid "
            f"({n} samples x {len(GRID_COLUMNS)} columns)"
        )
    step = (grid.shape[1] - GRID_PADDING) // len(GRID_COLUMNS)
    tile = step - GRID_PADDING
    top, left = sample * step + GRID_PADDING, column * step + GRID_PADDING
    return grid[top : top + tile, left : left + tile]


def copying_outputs_figure(entries: list[tuple[str, Path]], title: str, samples: int = 3) -> Figure:
    """Copying outputs per method on the first held-out samples (the paper's Fig. 5b).

    Args:
        entries: (method label, path of its ``save_grid`` PNG); every grid shows the same
            held-out set, so the source and target rows come from the first.
        title: the figure's title.
        samples: how many held-out samples (columns) to show; fewer if a grid has fewer.

    Returns:
        A figure of (2 + len(entries)) rows x samples columns of images: the source, the
        target, then each method's output, labelled on the left.

    Raises:
        ValueError: no entries, ``samples`` < 1, or a PNG that does not fit the grid layout.
    """
    if not entries:
        raise ValueError("copying_outputs_figure needs at least one (label, grid PNG) entry")
    if samples < 1:
        raise ValueError(f"samples={samples} is not allowed (allowed: an integer >= 1)")
    grids = [read_grid(Path(path)) for _, path in entries]
    n = min(samples, *(grid_samples(grid) for grid in grids))
    rows = [("source", grids[0], GRID_COLUMNS.index("source"))]
    rows.append(("target", grids[0], GRID_COLUMNS.index("target")))
    rows += [
        (label, grid, GRID_COLUMNS.index("output")) for (label, _), grid in zip(entries, grids)
    ]

    fig = Figure(figsize=(1.7 * n + 2.2, 1.7 * len(rows) + 0.7), layout="constrained")
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (label, grid, column) in enumerate(rows):
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(crop_tile(grid, i, column), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"held-out sample {i + 1}", fontsize=10)
            if i == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle(title, fontsize=12)
    return fig


@dataclass(frozen=True)
class SelectedKeys:
    """What :func:`selected_keys_figure` draws: query cells and the keys phase 1 keeps.

    Attributes:
        geometry: GPA's geometry for the map (d, s, κ, cell grid).
        query_image: the warped copy, (hq, wq, 3) RGB in [0, 1].
        key_image: the source image, (hk, wk, 3) RGB in [0, 1].
        valid: (hq, wq) bool, the query pixels whose warp lands inside the source.
        cells: (row, col) of each chosen query cell on ``geometry.cells_hw``.
        keys: (n_cells, κ) int, each cell's kept low-res keys (row i // (wk/d), col
            i % (wk/d)), ascending, as ``select_keys`` returns them.
        relevance: (n_cells, κ) float, the relevance of each kept key.
        affinity: the similarity phase 1 used.
        seed: the seed of the warp-copy inputs.
    """

    geometry: Geometry
    query_image: np.ndarray
    key_image: np.ndarray
    valid: np.ndarray
    cells: list[tuple[int, int]]
    keys: np.ndarray
    relevance: np.ndarray
    affinity: str
    seed: int

    @property
    def cell_indices(self) -> list[int]:
        """Row-major index of each chosen cell (its position in ``select_keys``' output)."""
        return [r * self.geometry.cells_hw[1] + c for r, c in self.cells]

    def block_corners(self) -> np.ndarray:
        """Top-left pixel (x, y) of each kept key's d x d block on the key map, (n_cells, κ, 2)."""
        d, key_cols = self.geometry.d, self.geometry.kv_low[1]
        return np.stack([(self.keys % key_cols) * d, (self.keys // key_cols) * d], axis=-1)

    def alphas(self, floor: float = ALPHA_FLOOR) -> np.ndarray:
        """Line opacities (n_cells, κ): relevance / the cell's largest, at least ``floor``."""
        scaled = self.relevance / self.relevance.max(axis=1, keepdims=True)
        return np.clip(scaled, floor, 1.0)


def choose_cells(
    valid: np.ndarray, cells_hw: tuple[int, int], n_cells: int
) -> list[tuple[int, int]]:
    """Query cells spread along the map's diagonal, avoiding those mostly without a match.

    Target points lie evenly from 20% to 80% of the way down the diagonal; each takes the
    nearest cell not yet taken, preferring cells with at least :data:`MIN_VALID` of their pixels
    valid (ties to the lower row-major index).

    Args:
        valid: (hq, wq) bool mask of query pixels with a true match.
        cells_hw: the cell grid (rows, cols); each cell covers (hq/rows) x (wq/cols) pixels.
        n_cells: how many cells to choose.

    Returns:
        (row, col) of each chosen cell, in order along the diagonal.

    Raises:
        ValueError: ``n_cells`` < 1 or more than there are cells.
    """
    rows, cols = cells_hw
    if not 1 <= n_cells <= rows * cols:
        raise ValueError(
            f"n_cells={n_cells} is not allowed (allowed: 1 to the {rows * cols} query cells "
            f"of the {rows}x{cols} cell grid)"
        )
    side_r, side_c = valid.shape[0] // rows, valid.shape[1] // cols
    share = valid.reshape(rows, side_r, cols, side_c).mean(axis=(1, 3))  # (rows, cols)
    centre_r, centre_c = np.meshgrid(np.arange(rows) + 0.5, np.arange(cols) + 0.5, indexing="ij")
    fractions = [0.5] if n_cells == 1 else np.linspace(0.2, 0.8, n_cells)
    chosen: list[tuple[int, int]] = []
    for t in fractions:
        distance = np.hypot(centre_r - t * rows, centre_c - t * cols)
        ranked = sorted(
            (share[r, c] < MIN_VALID, distance[r, c], r * cols + c)
            for r in range(rows)
            for c in range(cols)
            if (r, c) not in chosen
        )
        index = ranked[0][2]
        chosen.append((index // cols, index % cols))
    return chosen


def selected_keys_example(
    map_size: int = 64,
    phase1_res: int = 16,
    cell: int = 2,
    topk: int = 12,
    n_cells: int = 4,
    seed: int = 0,
    affinity: str = "dot",
    channels: int = 32,
) -> SelectedKeys:
    """Run GPA's phase 1 on a ``warp-copy`` example and keep a few cells' selections.

    Args:
        map_size: side of the square query and key maps, in pixels.
        phase1_res: side of the low-resolution grid (d = map_size / phase1_res).
        cell: s, the side of a query cell on the low-resolution grid.
        topk: κ, the low-res keys kept per cell.
        n_cells: how many query cells to report (see :func:`choose_cells`).
        seed: seed of the warp-copy inputs.
        affinity: GPA's similarity, "dot" (``gpa.torch``'s default) or "euclid".
        channels: C, the query/key feature channels.

    Returns:
        The images, the chosen cells and their kept keys with relevances.

    Raises:
        ValueError: sizes or parameters GPA cannot run, or a bad ``n_cells``.
    """
    from attnbench import registry
    from attnbench.impls.gpa.pytorch import select_keys
    from attnbench.inputs import make_inputs
    from attnbench.spec import AttentionSpec

    spec = AttentionSpec.square(map_size, channels, v_channels=3)
    gpa = registry.create(
        "gpa.torch", phase1_res=phase1_res, cell=cell, topk=topk, affinity=affinity
    )
    geom = gpa.geometry(spec)
    inputs = make_inputs("warp-copy", spec, seed)
    keys, relevance = select_keys(
        inputs.q, inputs.k, geom, affinity, gpa.scale_for(channels), with_relevance=True
    )
    hq, wq = geom.q_hw
    hk, wk = geom.kv_hw
    valid = inputs.valid[0, 0].reshape(hq, wq).numpy()
    cells = choose_cells(valid, geom.cells_hw, n_cells)
    index = [r * geom.cells_hw[1] + c for r, c in cells]
    return SelectedKeys(
        geometry=geom,
        query_image=inputs.target[0, 0].reshape(hq, wq, 3).numpy(),
        key_image=inputs.v[0, 0].reshape(hk, wk, 3).numpy(),
        valid=valid,
        cells=cells,
        keys=keys[0, 0, index].numpy(),
        relevance=relevance[0, 0, index].numpy(),
        affinity=affinity,
        seed=seed,
    )


def outline(
    xy: tuple[float, float], side: float, colour: tuple[float, ...], linewidth: float, **kw
) -> Rectangle:
    """An unfilled square of ``side`` at top-left ``xy`` (image coordinates), dark-edged."""
    halo = [patheffects.withStroke(linewidth=linewidth + 1.5, foreground="black")]
    return Rectangle(
        xy, side, side, fill=False, edgecolor=colour, linewidth=linewidth, path_effects=halo, **kw
    )


def draw_images(ax_q, ax_k, example: SelectedKeys) -> None:
    """The queries' image (the warped copy) on ``ax_q`` and the keys' image (the source) on
    ``ax_k``, faded so that outlines stand out; the key panel's y axis on its right, out of the
    way of the lines that cross the gap between the panels."""
    for ax, image, name in (
        (ax_q, example.query_image, "queries: warped copy"),
        (ax_k, example.key_image, "keys: source image"),
    ):
        h, w = image.shape[:2]
        ax.imshow(image.clip(0, 1), extent=(0, w, h, 0), interpolation="nearest", alpha=0.55)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
    ax_k.yaxis.tick_right()
    ax_k.yaxis.set_label_position("right")


def draw_selections(fig: Figure, ax_q, ax_k, example: SelectedKeys) -> list[Rectangle]:
    """Each chosen query cell outlined on ``ax_q``, its kept key blocks outlined on ``ax_k`` in
    its colour (tab10, repeating after ten cells), and a line of ``fig`` from the cell's centre
    to each block with the key's opacity (:meth:`SelectedKeys.alphas`).

    Returns:
        The cells' outlines, labelled for the legend.
    """
    geom = example.geometry
    d, side = geom.d, geom.cell_side
    colours = matplotlib.colormaps["tab10"].colors
    handles = []
    alphas, corners = example.alphas(), example.block_corners()
    for n, (row, col) in enumerate(example.cells):
        colour = colours[n % len(colours)]
        top, left = row * side, col * side
        handles.append(
            ax_q.add_patch(
                outline((left, top), side, colour, 2.5, label=f"cell (row {row}, col {col})")
            )
        )
        for (k_left, k_top), alpha in zip(corners[n], alphas[n]):
            ax_k.add_patch(outline((k_left, k_top), d, colour, 1.8))
            line = ConnectionPatch(
                xyA=(left + side / 2, top + side / 2),
                coordsA="data",
                axesA=ax_q,
                xyB=(k_left + d / 2, k_top + d / 2),
                coordsB="data",
                axesB=ax_k,
                color=colour,
                alpha=float(alpha),
                linewidth=1.3,
            )
            line.set_in_layout(False)
            fig.add_artist(line)
    return handles


def selected_keys_figure(**params) -> Figure:
    """The keys GPA's phase 1 keeps for a few query cells (the paper's Fig. 9).

    Left, the queries' image (the warped copy) with the chosen cells outlined; right, the
    keys' image (the source) with each cell's κ kept d x d key blocks outlined in the cell's
    colour, and a line from the cell's centre to each block whose opacity is the key's
    relevance relative to the cell's most relevant key (:meth:`SelectedKeys.alphas`). The
    images are drawn faded so that the outlines stand out; colours repeat after ten cells.

    Args:
        params: the example's parameters (:func:`selected_keys_example`: map_size,
            phase1_res, cell, topk, n_cells, seed, affinity, channels).

    Returns:
        The figure; the data it draws is ``selected_keys_example(**params)``.

    Raises:
        ValueError: as :func:`selected_keys_example`.
    """
    example = selected_keys_example(**params)
    fig = Figure(figsize=(11, 6.6), layout="constrained")
    ax_q, ax_k = fig.subplots(1, 2)
    draw_images(ax_q, ax_k, example)
    handles = draw_selections(fig, ax_q, ax_k, example)
    geom = example.geometry
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(len(handles), 4),
        fontsize=10,
        title="query cell: its kept key blocks and lines share its colour; "
        "line opacity = relevance / the cell's highest",
        title_fontsize=10,
    )
    fig.suptitle(
        f"GPA phase 1: key blocks kept per query cell ({geom.q_hw[0]}x{geom.q_hw[1]} map, "
        f"d={geom.d}, s={geom.s}, κ={geom.topk}, {example.affinity} affinity, "
        f"warp-copy seed {example.seed})",
        fontsize=12,
    )
    return fig
