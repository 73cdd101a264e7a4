"""The training loop every task shares: build, resume, train, evaluate one case into its row.

A task (:mod:`attnbench.tasks.copying`, :mod:`attnbench.tasks.pose`) brings its data, its
losses and its metrics as a :class:`~attnbench.tasks.base.Task`; everything else is here, once.
Every case trains the same architecture (:class:`~attnbench.generators.CopyingGenerator`) with
the same data, steps and optimiser; only the attention at the large decoder levels changes.

A run checkpoints every ``checkpoint_every`` steps (atomically; the task's own networks and
optimisers too) and continues from its checkpoint when resumed; a non-finite loss ends it with
a ``diverged`` row naming the step. Evaluation uses a fixed held-out set (its own seed, fixed
transforms): test L1 and loss, SSIM, PSNR, LPIPS where its weights exist, the task's own metrics,
the copy hit rate, attention memory as in the paper (forward+backward through the attention
blocks alone at batch 1), step time, parameter count, and a PNG grid.

Under ``torchrun --nproc_per_node N`` the generator is wrapped in DistributedDataParallel (gloo
on CPU, nccl on CUDA), a task's other networks average their gradients over the ranks; each rank
takes its share of every batch and rank 0 writes rows, checkpoints and grids.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from attnbench import registry
from attnbench.kinds.train.suite import TrainCase, generator_config
from attnbench.tasks.base import Task
from attnbench.tasks.distributed import replicas_identical, world
from attnbench.tasks.evaluation import (
    collate,
    copy_hit_rates,
    evaluate,
    first_copy,
    held_out_psnr,
)
from attnbench.tasks.memory import attention_memory, unsupported_blocks
from attnbench.tasks.optim import LearningRate, Loss, parameter_groups

clock = time.perf_counter  # times the training steps (their sum is what a budget limits)


def checkpoint_path(out_dir: Path, case: TrainCase) -> Path:
    """Where a run of ``case`` keeps its checkpoint."""
    return Path(out_dir) / f"{case.suite}-{case.device}-checkpoints" / f"{case.case_id}.pt"


def load_checkpoint(path: Path, device: str = "cpu") -> dict:
    """A checkpoint's state; tensors and plain types only (``weights_only``), so that loading a
    checkpoint someone sent cannot run code."""
    return torch.load(path, map_location=device, weights_only=True)


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at."""
    return int(load_checkpoint(path)["step"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a killed write never replaces a good checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def batch_items(dataset, step: int, batch: int, rank: int, world_size: int) -> list[dict]:
    """The rank's share of the global batch of ``step`` (items cycle through the dataset)."""
    per_rank = batch // world_size
    start = step * batch + rank * per_rank
    return [dataset[(start + j) % len(dataset)] for j in range(per_rank)]


@dataclass
class Run:
    """One training run: its networks, data and optimiser, and how far it has come."""

    case: TrainCase
    task: Task
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    loss_fn: Loss
    optimiser: torch.optim.Optimizer
    train_set: torch.utils.data.Dataset
    test_set: torch.utils.data.Dataset
    step: int = 0
    elapsed: float = 0.0  # seconds of training steps
    step_times: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)  # the evaluations during training

    def state(self) -> dict:
        """What a checkpoint keeps."""
        return {
            "model": self.model.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "step_times": self.step_times,
            "curve": self.curve,
            "rng": torch.get_rng_state(),
            **self.task.state_dict(),
        }

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's state."""
        self.model.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.task.load_state_dict(state)
        self.step, self.elapsed, self.step_times = (
            state["step"],
            state["elapsed"],
            state["step_times"],
        )
        self.curve = state.get("curve", [])
        torch.set_rng_state(state["rng"])


def build(case: TrainCase, row: dict) -> Run | None:
    """The run's networks, data and optimiser; None where the row says why it cannot train."""
    from attnbench.generators import CopyingGenerator
    from attnbench.metrics import MetricUnavailable
    from attnbench.tasks import TASKS

    _, world_size = world()
    if case.batch % world_size:
        row.update(
            status="error",
            reason=f"batch={case.batch} does not divide over {world_size} processes "
            f"(allowed: a multiple of {world_size})",
        )
        return None
    task = TASKS[case.task](case)
    train_set, test_set = task.datasets(generator_config(case.preset, case.generator).image_size)
    overrides = {"pose_channels": train_set.pose_channels, **case.generator}
    config = generator_config(case.preset, overrides)
    torch.manual_seed(case.seed)
    model = CopyingGenerator(config, attention=case.impl, attention_params=case.params_dict)
    model = model.to(case.device)
    row["label"] = registry.create(case.impl, **model.attention_params).label
    row["n_params"] = model.n_params()
    reasons = unsupported_blocks(model, case.batch // world_size, case.device)
    if reasons:
        row.update(status="unsupported", reason="; ".join(reasons))
        return None
    row["attn_mem_bytes"] = attention_memory(config, case.impl, case.params_dict, case.device)
    try:
        loss_fn = Loss(case.loss, case.device)
    except MetricUnavailable as err:  # an LPIPS loss without its weights: never a substitute
        row.update(status="unsupported", reason=f"loss {case.loss}: {err}")
        return None
    task.setup(model, loss_fn)
    optimiser = torch.optim.Adam(parameter_groups(model, case.lr, case.temperature_lr))
    net = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    return Run(case, task, model, net, loss_fn, optimiser, train_set, test_set)


def train_step(run: Run, schedule: LearningRate) -> float:
    """One optimiser step of the generator (and of the task's networks); returns the loss."""
    case, task = run.case, run.task
    rank, world_size = world()
    for group in run.optimiser.param_groups:
        group["lr"] = schedule(run.step, run.elapsed) * group.get("lr_factor", 1.0)
    tic = clock()
    items = batch_items(run.train_set, run.step, case.batch, rank, world_size)
    loss = task.generator_loss(run.net, collate(items, case.device, task.batch_keys), run.step)
    if not math.isfinite(loss.item()):
        return loss.item()
    run.optimiser.zero_grad(set_to_none=True)
    loss.backward()
    run.optimiser.step()
    run.step_times.append(clock() - tic)
    run.elapsed += run.step_times[-1]
    if world_size > 1:  # one clock for all ranks: they stop and schedule alike
        shared = torch.tensor([run.elapsed], dtype=torch.float64)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        run.elapsed = float(shared)
    run.step += 1
    return loss.item()


def checkpoint(run: Run, path: Path) -> None:
    """Evaluate on the way — the held-out PSNR and, where the task knows the true sources, the
    copy hit rate on the first held-out pairs — and save the run (rank 0)."""
    case, task, every = run.case, run.task, run.case.evaluation
    point = {"step": run.step, "time_s": run.elapsed}
    point["psnr"] = held_out_psnr(run.model, run.test_set, task, every.eval_batch, case.device)
    if task.truth is not None:
        point |= copy_hit_rates(
            run.model, run.test_set, every.hit_samples, every.eval_batch, case.device, task.truth
        )
    run.curve.append(point)
    if world()[0] == 0:
        save_checkpoint(path, run.state())


def train(run: Run, row: dict, path: Path, progress: bool) -> bool:
    """Train to the case's steps or time budget, checkpointing on the way; False where the
    loss diverged (the row says at which step)."""
    from tqdm import tqdm

    case = run.case
    budget_s = None if case.budget_minutes is None else 60 * case.budget_minutes
    schedule = LearningRate(case.lr, case.steps, budget_s, case.schedule, case.warmup_steps)
    bar = tqdm(
        total=case.steps,
        initial=run.step,
        disable=not progress or world()[0] != 0,
        leave=False,
        desc=f"{row['label']} seed {case.seed}",
        dynamic_ncols=True,
    )
    with bar:
        while run.step < case.steps and (budget_s is None or run.elapsed < budget_s):
            loss = train_step(run, schedule)
            if not math.isfinite(loss):
                row.update(status="diverged", reason=f"loss became {loss} at step {run.step}")
                row["steps"] = run.step
                return False
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", step_s=f"{run.step_times[-1]:.2f}")
            out_of_time = budget_s is not None and run.elapsed >= budget_s
            if (
                run.step % case.evaluation.checkpoint_every == 0
                or run.step == case.steps
                or (out_of_time)
            ):
                checkpoint(run, path)
    return True


def finish(run: Run, row: dict, out_dir: Path) -> None:
    """Evaluate on the whole held-out set; the row's metrics, curve, times and grid."""
    case, task, every = run.case, run.task, run.case.evaluation
    metrics, (grid_batch, grid_out) = evaluate(
        run.model, run.test_set, task, run.loss_fn, every.eval_batch, case.device
    )
    notes = metrics.pop("notes")
    row.update(metrics)
    if task.truth is not None:
        row["copy_hit_rate"] = copy_hit_rates(
            run.model, run.test_set, len(run.test_set), every.eval_batch, case.device, task.truth
        )
        row["steps_to_copy"], row["time_to_copy_s"], note = first_copy(run.curve)
        notes += [note] if note else []
    times = run.step_times
    row.update(
        steps=run.step,
        hit_curve=run.curve,
        train_time_s=run.elapsed,
        step_time_s=float(torch.tensor(times).median()) if times else None,
        reason="; ".join(notes),
    )
    if world()[0] == 0:
        grid = Path(f"{case.suite}-{case.device}-grids") / f"{case.case_id}.png"
        n = min(every.grid_samples, len(grid_batch["source"]))
        task.save_grid(out_dir / grid, {k: v[:n] for k, v in grid_batch.items()}, grid_out[:n])
        row["grid_png"] = str(grid)


def train_case(case: TrainCase, row: dict, out_dir: Path, resume: bool, progress: bool) -> dict:
    """Train and evaluate one case: build -> resume -> train -> evaluate; fill ``row`` (status,
    metrics) and return it."""
    run = build(case, row)
    if run is None:
        return row
    path = checkpoint_path(out_dir, case)
    if resume and path.exists():
        run.restore(load_checkpoint(path, case.device))
    if not train(run, row, path, progress):
        return row
    if world()[1] > 1:
        row["world_size"] = world()[1]
        row["replicas_identical"] = replicas_identical(run.model, *run.task.networks().values())
        if not row["replicas_identical"]:
            row.update(status="error", reason="DistributedDataParallel replicas diverged")
            return row
    finish(run, row, out_dir)
    return row
