"""What a training task brings to the loop (:mod:`attnbench.tasks.training`), and the helpers
tasks share: the held-out seed, the item source a data config names.

A task is a :class:`Task` subclass in its own module, listed in :data:`attnbench.tasks.TASKS`:
its name (the suites' ``task:``), its configuration model (a suite's key of the task's name),
its checks of a suite, its data, losses, metrics, networks, grid picture and report table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from attnbench.kinds.train.suite import DataConfig, TrainCase

TEST_SEED = 2**31 - 1  # the held-out set's seed: no training seed draws the same items
PAIR_KEYS = ("source", "source_pose", "target", "target_pose")

# (items, query map, key map) -> (points [B, Nq, 2], inside [B, Nq]): every query's true source.
Truth = Callable[[list[dict], tuple[int, int], tuple[int, int]], tuple[torch.Tensor, torch.Tensor]]


# Columns of the report's training tables (attnbench.report.train_tables), by key: what every
# run reports, and each tested metric's difference from `none` and `full.sdpa` with its p-value.
TRAIN_COLUMNS = (
    "label", "runs", "test_l1", "ssim", "psnr", "lpips", "fid", "hit_r1", "hit_r2", "steps_done",
    "train_s", "attn_mib", "step_ms", "n_params",
)  # fmt: skip
COMPARISON_COLUMNS = (
    "psnr_vs_none", "psnr_p_vs_none", "psnr_vs_full", "psnr_p_vs_full", "hit_r1_vs_none",
    "hit_r1_p_vs_none", "hit_r1_vs_full", "hit_r1_p_vs_full",
)  # fmt: skip


@dataclass(frozen=True)
class TaskTable:
    """The report's table of a task's runs: file stem, title, description, and its columns
    (keys of the training table's columns; ``headers`` renames some)."""

    name: str
    title: str
    about: str
    columns: tuple[str, ...]
    headers: tuple[tuple[str, str], ...] = ()


class Task:
    """A training task. Subclasses set ``name`` and implement ``datasets``,
    ``generator_loss`` and ``save_grid``; the other methods default to a task without
    networks, metrics or settings of its own.

    ``Config``: the model of the task's own settings (a suite's key named like the task), or
    None. ``table``: its report table. ``outputs_figure``: its grids show source, target
    pose, output, target in their first four columns (the report's outputs figure reads them).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None
    table: ClassVar[TaskTable | None] = None
    outputs_figure: ClassVar[bool] = False
    batch_keys: tuple[str, ...] = PAIR_KEYS
    truth: Truth | None = None  # where each query's true source lies; None: no hit rate

    def __init__(self, case: TrainCase) -> None:
        self.case, self.device = case, case.device

    @classmethod
    def check(cls, suite, file: str) -> list[str]:
        """What the suite model cannot check of a suite of this task."""
        return []

    def datasets(self, size: tuple[int, int]) -> tuple[torch.utils.data.Dataset, ...]:
        """(train set, held-out set) at the generator's image size; both have pose_channels."""
        raise NotImplementedError

    def setup(self, model: torch.nn.Module, loss_fn) -> None:
        """Build the task's own networks and optimisers once the generator exists."""
        self.loss_fn = loss_fn

    def generator_loss(self, net, batch: dict, step: int) -> torch.Tensor:
        """The generator's loss on a training batch (the task may update its networks first)."""
        raise NotImplementedError

    def networks(self) -> dict[str, torch.nn.Module]:
        """The task's own networks (checkpointed, and checked identical across ranks)."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the task beyond the generator."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s keys from a checkpoint's state."""

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[dict, list[str]]:
        """Task metrics of held-out outputs against targets (CPU tensors), and notes."""
        return {}, []

    def save_grid(self, path: Path, batch: dict, output: torch.Tensor) -> None:
        """The PNG of a few held-out samples with their outputs."""
        raise NotImplementedError


def make_source(data: DataConfig, size: tuple[int, int], held_out: bool = False):
    """The item source the data config names, at the generator's image size.

    ``held_out``: the DeepFashion source of the held-out pairs (``test_pairs``, with
    ``test_root`` and ``test_annotations`` where given) when the config names them.
    """
    from attnbench.data import DeepFashion, ImageFolder, Mannequin

    if data.source == "mannequin":
        return Mannequin(size=size, sigma=data.sigma)
    if data.source == "folder":
        return ImageFolder(data.root, size, fit=data.fit)
    root, annotations, pairs = data.root, data.annotations, data.pairs
    if held_out and data.test_pairs is not None:
        root, annotations = data.test_root or root, data.test_annotations or annotations
        pairs = data.test_pairs
    return DeepFashion(root, annotations, pairs, size=size, sigma=data.sigma, fit=data.fit)


def pair_options(data: DataConfig) -> dict:
    """The pair datasets' options a data config sets."""
    return {"sigma": data.sigma, "noise": data.noise, "coords": data.pose == "heatmaps+coords"}


def pose_picture(pose: torch.Tensor) -> torch.Tensor:
    """[N, P, H, W] conditioning maps -> [N, 3, H, W] grey picture (max over channels)."""
    picture = pose.amax(dim=1, keepdim=True).clamp(0, 1)
    return picture.expand(-1, 3, -1, -1)


def write_grid(path: Path, columns: list[torch.Tensor]) -> None:
    """A PNG with one row per sample and one column per [N, 3, H, W] tensor of ``columns``."""
    from torchvision.utils import save_image

    tiles = torch.stack([c.clamp(0, 1) for c in columns], dim=1).flatten(0, 1)  # row-major
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(tiles.cpu(), path, nrow=len(columns), padding=2, pad_value=1.0)
