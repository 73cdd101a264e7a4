"""Evaluation of a training run on its held-out set: the metrics, and the copy hit rate of every
copying block (:mod:`attnbench.tasks.hit_rate`)."""

from __future__ import annotations

import torch

from attnbench.tasks.base import PAIR_KEYS, Task, Truth
from attnbench.tasks.optim import Loss

HIT_RATE_MAX_ENTRIES = 1 << 24  # Nq x Nk of the largest level scored (64x64 maps: 4096²)
COPY_THRESHOLD = 0.5  # a run copies once its largest level's r=1 hit rate reaches this


def collate(items: list[dict], device: str, keys: tuple[str, ...] = PAIR_KEYS) -> dict:
    """Stack the ``keys`` tensors of dataset items into a batch on ``device``."""
    return {key: torch.stack([item[key] for item in items]).to(device) for key in keys}


def held_out_outputs(model, test_set, task: Task, eval_batch: int, device: str):
    """Every batch of the held-out set with the generator's output, in order, the model in
    eval mode meanwhile (its mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(test_set), eval_batch):
            items = [test_set[i] for i in range(start, min(start + eval_batch, len(test_set)))]
            batch = collate(items, device, task.batch_keys)
            yield batch, model(batch["source"], batch["source_pose"], batch["target_pose"])
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model, test_set, task: Task, loss_fn: Loss, eval_batch: int, device: str):
    """Metrics on the whole held-out set, and its first batch with outputs (for the grid)."""
    from attnbench.metrics import MetricUnavailable, image_metrics, lpips_model

    preds, targets, losses = [], [], []
    first = None
    for batch, out in held_out_outputs(model, test_set, task, eval_batch, device):
        losses.append(loss_fn(out, batch["target"]).item() * len(out))
        preds.append(out.clamp(0, 1).cpu())
        targets.append(batch["target"].cpu())
        if first is None:
            first = (batch, out)
    pred, target = torch.cat(preds), torch.cat(targets)
    metrics = image_metrics(pred, target)
    result = {
        "test_l1": metrics["l1"],
        "test_loss": sum(losses) / len(test_set),
        "ssim": metrics["ssim"],
        "psnr": metrics["psnr"],
    }
    notes = []
    try:
        lpips = loss_fn.lpips if loss_fn.lpips is not None else lpips_model("vgg").to(device)
        result["lpips"] = sum(
            lpips(pred[i : i + eval_batch].to(device), target[i : i + eval_batch].to(device)).item()
            * len(pred[i : i + eval_batch])
            for i in range(0, len(pred), eval_batch)
        ) / len(pred)
    except MetricUnavailable as err:
        result["lpips"] = None
        notes.append(f"lpips: {err}")
    extra, extra_notes = task.metrics(pred, target)
    return result | extra | {"notes": notes + extra_notes}, first


@torch.no_grad()
def held_out_psnr(model, test_set, task: Task, eval_batch: int, device: str) -> float:
    """PSNR (dB, images in [0, 1]) of the generator's outputs on the whole held-out set, as
    the final evaluation computes it."""
    from attnbench.metrics import image_metrics

    preds, targets = [], []
    for batch, out in held_out_outputs(model, test_set, task, eval_batch, device):
        preds.append(out.clamp(0, 1).cpu())
        targets.append(batch["target"].cpu())
    return image_metrics(torch.cat(preds), torch.cat(targets))["psnr"]


def first_copy(curve: list[dict], threshold: float = COPY_THRESHOLD):
    """``(steps_to_copy, time_to_copy_s, note)``: the step and training time of the first
    evaluation of ``curve`` at which the largest level's r=1 hit rate reaches ``threshold``
    (a crossing between two evaluations is located at the later one); ``(None, None, why)``
    where no evaluation does."""
    scored = [point for point in curve if point.get("largest") is not None]
    for point in scored:
        if point["largest"] >= threshold:
            return point["step"], point["time_s"], None
    if not scored:
        return None, None, "steps_to_copy: no evaluation scored the largest level's hit rate"
    best = max(scored, key=lambda point: point["largest"])
    return (
        None,
        None,
        (
            f"steps_to_copy: the largest level's hit rate stayed below {threshold:g} in "
            f"{len(scored)} evaluations (highest {best['largest']:.3f} at step {best['step']})"
        ),
    )


@torch.no_grad()
def copy_hit_rates(model, test_set, items: int, eval_batch: int, device: str, truth: Truth) -> dict:
    """``copy_hit_rate`` of every copying block on the first ``items`` held-out pairs (at most all).

    ``truth`` gives every query's true source (the task's: a warp, or the mannequin's
    correspondence). A level whose dense weights would exceed ``HIT_RATE_MAX_ENTRIES`` per pair
    (maps above 64x64) is not scored: its rates are None.

    Returns ``{"largest": r1 of the largest level, "largest_r2": r2 of it, "levels":
    {block name: {"r1": ..., "r2": ...}}}`` (see :mod:`attnbench.tasks.hit_rate`); a level
    whose sources all fall outside the map has None. The weights come from each block's
    implementation (``Attention.weights``), one pair at a time.
    """
    from attnbench.tasks.hit_rate import RADII

    items = min(items, len(test_set))
    every_block = model.attention_blocks()
    blocks = [
        (name, block)
        for name, block in every_block
        if (block.map_size[0] * block.map_size[1]) ** 2 <= HIT_RATE_MAX_ENTRIES
    ]
    sums = {name: dict.fromkeys(RADII, 0.0) for name, _ in blocks}
    counts = dict.fromkeys(sums, 0)
    was_training = model.training
    model.eval()
    for _, block in blocks:
        block.record = True
    try:
        for start in range(0, items, eval_batch):
            chosen = [test_set[i] for i in range(start, min(start + eval_batch, items))]
            batch = collate(chosen, device)
            model(batch["source"], batch["source_pose"], batch["target_pose"])
            for name, block in blocks:
                where = truth(chosen, *[block.map_size] * 2)
                counts[name] += add_hit_masses(block, where, sums[name])
    finally:
        for _, block in blocks:
            block.record, block.recorded = False, None
        model.train(was_training)
    levels = {
        name: {
            f"r{r}": (sums[name][r] / counts[name] if name in counts and counts[name] else None)
            for r in RADII
        }
        for name, _ in every_block
    }
    largest = levels[every_block[-1][0]]
    return {"largest": largest["r1"], "largest_r2": largest["r2"], "levels": levels}


def add_hit_masses(block, truth: tuple[torch.Tensor, torch.Tensor], sums: dict) -> int:
    """Add to ``sums`` (per radius) the attention mass near each query's true source, over the
    pairs the block has just recorded, one pair at a time (Nq x Nk weights each); returns how
    many queries were scored."""
    from attnbench.tasks.hit_rate import RADII, hit_mass_at

    q, k = block.recorded
    points, inside = truth
    total = 0
    for j in range(len(q)):
        weights = block.attention.weights(q[j : j + 1], k[j : j + 1], *[block.map_size] * 2)
        where = points[j : j + 1].to(weights.device), inside[j : j + 1].to(weights.device)
        masses, count = hit_mass_at(weights, *where, block.map_size)
        for r in RADII:
            sums[r] += masses[r]
        total += count
    return total
