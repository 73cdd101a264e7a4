"""What a training run optimises and how: the loss (L1, LPIPS or both), Adam's parameter groups
(the copying blocks' temperatures at their own rate) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Loss:
    """L1, LPIPS or a weighted sum of both, on images in [0, 1]."""

    def __init__(self, spec: str | dict[str, float], device: str):
        weights = {spec: 1.0} if isinstance(spec, str) else dict(spec)
        self.weights = {k: w for k, w in weights.items() if w > 0}
        self.lpips = None
        if "lpips" in self.weights:
            from attnbench.metrics import lpips_model

            self.lpips = lpips_model("vgg").to(device)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = pred.new_zeros(())
        if "l1" in self.weights:
            total = total + self.weights["l1"] * F.l1_loss(pred, target)
        if self.lpips is not None:
            total = total + self.weights["lpips"] * self.lpips(pred.clamp(0, 1), target)
        return total


def parameter_groups(model, lr: float, temperature_lr: float | None) -> list[dict]:
    """Adam's groups: the copying blocks' log-temperatures at ``temperature_lr``, the rest at lr.

    Each group's ``lr_factor`` is its rate over ``lr``; the schedule scales both alike.
    """
    temperatures = [p for n, p in model.named_parameters() if n.endswith("log_temperature")]
    ids = {id(p) for p in temperatures}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest, "lr": lr, "lr_factor": 1.0}]
    if temperatures:
        factor = (temperature_lr or lr) / lr
        groups.append({"params": temperatures, "lr": lr * factor, "lr_factor": factor})
    return groups


class LearningRate:
    """Linear warm-up over ``warmup`` steps, then constant or a cosine decay to zero.

    The decay follows the run's progress: max(step / steps, elapsed / budget_s), so a run that
    a time budget stops still ends its schedule.
    """

    def __init__(
        self, lr: float, steps: int, budget_s: float | None, kind: str, warmup: int
    ) -> None:
        self.lr, self.steps, self.budget_s = lr, steps, budget_s
        self.kind, self.warmup = kind, warmup

    def __call__(self, step: int, elapsed: float) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.lr
        progress = step / self.steps
        if self.budget_s is not None:
            progress = max(progress, elapsed / self.budget_s)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
