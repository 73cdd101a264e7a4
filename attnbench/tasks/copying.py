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

from attnbench.tasks.training import TEST_SEED, Task, make_source, pose_picture, write_grid


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


class CopyingTask(Task):
    """Affine copying: L_self on (M, B) -> (τ(M), τ(B)) pairs of one image."""

    name = "copying"
    truth = staticmethod(warp_truth)

    def datasets(self, size):
        from attnbench.data import AffineCopyDataset

        data = self.suite.data
        source = make_source(self.suite, size)
        pairs = {"sigma": data.sigma, "noise": data.noise, "coords": data.pose == "heatmaps+coords"}
        return (
            AffineCopyDataset(source, data.train_size, seed=self.case.seed, **pairs),
            AffineCopyDataset(source, data.test_size, seed=TEST_SEED, **pairs),
        )

    def setup(self, model, loss_fn) -> None:
        self.loss_fn = loss_fn

    def generator_loss(self, net, batch: dict, step: int) -> torch.Tensor:
        out = net(batch["source"], batch["source_pose"], batch["target_pose"])
        return self.loss_fn(out, batch["target"])

    def metrics(self, pred, target):
        return {}, ["fid: not computed for the affine-copying task"]

    def save_grid(self, path: Path, batch: dict, output: torch.Tensor) -> None:
        save_grid(path, batch, output)
