"""The affine-copying task (the GPA paper's image-distortion experiment, Jetchev et al. 2021).

A generator sees an image M with its pose B (source branch) and a target pose τ(B) (target
branch) and must produce τ(M): the image under a random affine warp A = I + U(-0.15, 0.15). It
can only do so well by copying detail from the source through its attention-copying blocks.
Loss L_self only: L1 (default), LPIPS or a weighted sum. The copy hit rate scores each block's
attention against the warp (:mod:`attnbench.tasks.hit_rate`). The loop, checkpoints, resume
and DDP are :mod:`attnbench.tasks.training`'s.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attnbench.tasks.base import (
    COMPARISON_COLUMNS,
    TEST_SEED,
    TRAIN_COLUMNS,
    Task,
    TaskTable,
    make_source,
    pair_options,
    pose_picture,
    write_grid,
)


def save_grid(path: Path, batch: dict, output: torch.Tensor) -> None:
    """One row per sample: source, target pose, output, target, |error| (the paper's Fig. 5b)."""
    output = output.clamp(0, 1)
    write_grid(
        path,
        [
            batch["source"],
            pose_picture(batch["target_pose"]),
            output,
            batch["target"],
            (output - batch["target"]).abs(),
        ],
    )


def warp_truth(items: list[dict], q_hw, kv_hw) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query's true source: where the pair's warp takes it."""
    from attnbench.tasks.hit_rate import source_points

    return source_points(torch.stack([item["theta"] for item in items]), q_hw, kv_hw)


TABLE = TaskTable(
    "copying",
    "Training: copying through attention",
    "Held-out metrics after training, mean ± sample standard deviation over seeds (runs "
    "that diverged or failed are counted in 'runs ok' and left out of the means). The copy "
    "hit rate is the share of the largest decoder level's attention mass within 1 (r=1) or "
    "2 pixels (r=2) of each query's true source. Steps done and training time (the sum of "
    "the steps) are means over seeds: a run with a time budget may stop before its steps. "
    "Attention memory is the peak of the attention blocks alone at batch 1; step time is "
    "the mean over seeds of each run's median training step. The last columns compare PSNR "
    "and the hit rate at r=1 with `none` and `full.sdpa`: the difference of the "
    "means and the p-value of Welch's t-test (unequal variances; empty with fewer than two "
    "seeds on either side, or no spread on both). A method with its own generator overrides "
    "(such as `none (no copying at any level)`, the paper's NO) is a method of its "
    "own.",
    TRAIN_COLUMNS + COMPARISON_COLUMNS,
)


class CopyingTask(Task):
    """Affine copying: L_self on (M, B) -> (τ(M), τ(B)) pairs of one image."""

    name = "copying"
    table = TABLE
    outputs_figure = True
    truth = staticmethod(warp_truth)

    def datasets(self, size):
        from attnbench.data import AffineCopyDataset

        data = self.case.data
        source = make_source(data, size)
        return (
            AffineCopyDataset(source, data.train_size, seed=self.case.seed, **pair_options(data)),
            AffineCopyDataset(source, data.test_size, seed=TEST_SEED, **pair_options(data)),
        )

    def generator_loss(self, net, batch: dict, step: int) -> torch.Tensor:
        out = net(batch["source"], batch["source_pose"], batch["target_pose"])
        return self.loss_fn(out, batch["target"])

    def metrics(self, pred, target):
        return {}, ["fid: not computed for the affine-copying task"]

    def save_grid(self, path: Path, batch: dict, output: torch.Tensor) -> None:
        save_grid(path, batch, output)
