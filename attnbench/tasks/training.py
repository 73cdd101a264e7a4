"""The training loop the tasks share: one generator, its optimiser, checkpoints, resume, DDP.

A task (:mod:`attnbench.tasks.copying`, :mod:`attnbench.tasks.pose`) brings its data, its
losses and its metrics as a :class:`Task`; everything else is here, once. Every case trains the
same architecture (:class:`~attnbench.generators.CopyingGenerator`) with the same data, steps
and optimiser; only the attention at the large decoder levels changes.

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

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from attnbench import registry
from attnbench.results import new_row
from attnbench.suite import TrainCase, TrainSuite

TEST_SEED = 2**31 - 1  # the held-out set's seed: no training seed draws the same items
clock = time.perf_counter  # times the training steps (their sum is what a budget limits)
HIT_RATE_MAX_ENTRIES = 1 << 24  # Nq x Nk of the largest level scored (64x64 maps: 4096²)
PAIR_KEYS = ("source", "source_pose", "target", "target_pose")

# (items, query map, key map) -> (points [B, Nq, 2], inside [B, Nq]): every query's true source.
Truth = Callable[[list[dict], tuple[int, int], tuple[int, int]], tuple[torch.Tensor, torch.Tensor]]


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1), once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def average_gradients(module: torch.nn.Module) -> None:
    """Average ``module``'s gradients over the ranks (what DDP does for the generator)."""
    _, world_size = world()
    if world_size == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def make_source(suite: TrainSuite, size: tuple[int, int], held_out: bool = False):
    """The item source the data config names, at the generator's image size.

    ``held_out``: the DeepFashion source of the held-out pairs (``test_pairs``, with
    ``test_root`` and ``test_annotations`` where given) when the config names them.
    """
    from attnbench.data import DeepFashion, ImageFolder, Mannequin

    data = suite.data
    if data.source == "mannequin":
        return Mannequin(size=size, sigma=data.sigma)
    if data.source == "folder":
        return ImageFolder(data.root, size, fit=data.fit)
    root, annotations, pairs = data.root, data.annotations, data.pairs
    if held_out and data.test_pairs is not None:
        root, annotations = data.test_root or root, data.test_annotations or annotations
        pairs = data.test_pairs
    return DeepFashion(root, annotations, pairs, size=size, sigma=data.sigma, fit=data.fit)


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


def collate(items: list[dict], device: str, keys: tuple[str, ...] = PAIR_KEYS) -> dict:
    """Stack the ``keys`` tensors of dataset items into a batch on ``device``."""
    return {key: torch.stack([item[key] for item in items]).to(device) for key in keys}


def batch_items(dataset, step: int, batch: int, rank: int, world_size: int) -> list[dict]:
    """The rank's share of the global batch of ``step`` (items cycle through the dataset)."""
    per_rank = batch // world_size
    start = step * batch + rank * per_rank
    return [dataset[(start + j) % len(dataset)] for j in range(per_rank)]


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


class Task:
    """What a training task brings to the loop: data, losses, metrics, its own networks.

    Subclasses set ``name`` and implement ``datasets``, ``generator_loss`` and ``save_grid``;
    the others have defaults for a task without networks of its own.
    """

    name = ""
    batch_keys: tuple[str, ...] = PAIR_KEYS

    def __init__(self, case: TrainCase, suite: TrainSuite, device: str) -> None:
        self.case, self.suite, self.device = case, suite, device

    def datasets(self, size: tuple[int, int]) -> tuple[torch.utils.data.Dataset, ...]:
        """(train set, held-out set) at the generator's image size; both have pose_channels."""
        raise NotImplementedError

    def setup(self, model: torch.nn.Module, loss_fn: Loss) -> None:
        """Build the task's own networks and optimisers once the generator exists."""

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

    truth: Truth | None = None  # where each query's true source lies; None: no hit rate

    def metrics(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[dict, list[str]]:
        """Task metrics of held-out outputs against targets (CPU tensors), and notes."""
        return {}, []

    def save_grid(self, path: Path, batch: dict, output: torch.Tensor) -> None:
        """The PNG of a few held-out samples with their outputs."""
        raise NotImplementedError


@torch.no_grad()
def evaluate(model, test_set, task: Task, loss_fn: Loss, eval_batch: int, device: str):
    """Metrics on the whole held-out set, and its first batch with outputs (for the grid)."""
    from attnbench.metrics import MetricUnavailable, image_metrics, lpips_model

    model.eval()
    preds, targets, losses = [], [], []
    first = None
    for start in range(0, len(test_set), eval_batch):
        items = [test_set[i] for i in range(start, min(start + eval_batch, len(test_set)))]
        batch = collate(items, device, task.batch_keys)
        out = model(batch["source"], batch["source_pose"], batch["target_pose"])
        losses.append(loss_fn(out, batch["target"]).item() * len(items))
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
    model.train()
    return result | extra | {"notes": notes + extra_notes}, first


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
    from attnbench.tasks.hit_rate import RADII, hit_mass_at

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
                q, k = block.recorded
                points, inside = truth(chosen, block.map_size, block.map_size)
                for j in range(len(chosen)):  # one pair at a time: Nq x Nk weights each
                    weights = block.attention.weights(
                        q[j : j + 1], k[j : j + 1], block.map_size, block.map_size
                    )
                    where = (
                        points[j : j + 1].to(weights.device),
                        inside[j : j + 1].to(weights.device),
                    )
                    masses, count = hit_mass_at(weights, *where, block.map_size)
                    for r in RADII:
                        sums[name][r] += masses[r]
                    counts[name] += count
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


def _attention_memory_worker(config, impl: str, params: dict, device: str) -> int:
    from attnbench.generators import CopyingGenerator
    from attnbench.measure import peak_memory

    torch.manual_seed(0)  # the weights do not change the memory; only the shapes do
    model = CopyingGenerator(config, attention=impl, attention_params=params)
    model = model.to(device)
    inputs = model.attention_block_inputs(batch=1, device=device)
    blocks = dict(model.attention_blocks())

    def run_blocks():
        for name, block_inputs in inputs.items():
            blocks[name].attention_call(*block_inputs).sum().backward()

    return peak_memory(run_blocks, device)


def attention_memory(config, impl: str, params: dict, device: str) -> int:
    """Peak bytes of forward+backward through the attention blocks alone at batch 1.

    The paper's measure (its Fig. 5a). It runs in a fresh process: in a process that has
    trained before, the allocator's free memory would hide part of the peak on the CPU. The
    peak depends on the shapes alone, so it is measured once per (config, implementation,
    parameters, device) in a process, not once per seed.
    """
    return _attention_memory(config, impl, json.dumps(params, sort_keys=True), device)


@functools.cache
def _attention_memory(config, impl: str, params: str, device: str) -> int:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Not multiprocessing.Pool: a worker's exception that fails to unpickle hangs a Pool
    # forever; the executor raises BrokenProcessPool instead.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        future = pool.submit(_attention_memory_worker, config, impl, json.loads(params), device)
        return future.result()


def unsupported_blocks(model, batch: int, device: str) -> list[str]:
    """Why some copying block's attention cannot train at this batch: ``"<block>: <reason>"``."""
    reasons = []
    for name, block in model.attention_blocks():
        spec = dataclasses.replace(block.spec(batch, device=device), requires_grad=True)
        reasons += [f"{name}: {r}" for r in block.attention.unsupported_reasons(spec)]
    return reasons


def replicas_identical(*models: torch.nn.Module) -> bool:
    """Whether every rank holds exactly the same weights (all-gathered and compared)."""
    flat = torch.cat([p.detach().flatten() for m in models for p in m.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world()[1])]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def make_task(case: TrainCase, suite: TrainSuite, device: str) -> Task:
    """The task ``case.task`` names, for this case."""
    from attnbench.tasks import TASKS

    return TASKS[case.task](case, suite, device)


def train_case(
    case: TrainCase, suite: TrainSuite, row: dict, out_dir: Path, resume: bool, progress: bool
) -> dict:
    """Train and evaluate one case; fill ``row`` (status, metrics) and return it."""
    from tqdm import tqdm

    from attnbench.generators import CopyingGenerator
    from attnbench.metrics import MetricUnavailable
    from attnbench.suite import generator_config

    rank, world_size = world()
    device = case.device
    if suite.batch % world_size:
        row.update(
            status="error",
            reason=f"batch={suite.batch} does not divide over {world_size} processes "
            f"(allowed: a multiple of {world_size})",
        )
        return row
    overrides = json.loads(case.generator)
    task = make_task(case, suite, device)
    train_set, test_set = task.datasets(generator_config(case.preset, overrides).image_size)
    config = generator_config(case.preset, {"pose_channels": train_set.pose_channels, **overrides})
    torch.manual_seed(case.seed)
    model = CopyingGenerator(config, attention=case.impl, attention_params=case.params_dict)
    model = model.to(device)
    row["label"] = registry.create(case.impl, **model.attention_params).label
    row["n_params"] = model.n_params()
    reasons = unsupported_blocks(model, suite.batch // world_size, device)
    if reasons:
        row.update(status="unsupported", reason="; ".join(reasons))
        return row
    row["attn_mem_bytes"] = attention_memory(config, case.impl, case.params_dict, device)
    try:
        loss_fn = Loss(suite.loss, device)
    except MetricUnavailable as err:  # an LPIPS loss without its weights: never a substitute
        row.update(status="unsupported", reason=f"loss {suite.loss}: {err}")
        return row
    task.setup(model, loss_fn)
    optimiser = torch.optim.Adam(parameter_groups(model, case.lr, case.temperature_lr))
    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)

    checkpoint = checkpoint_path(out_dir, case)
    start, elapsed, step_times, curve = 0, 0.0, [], []
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint, device)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        task.load_state_dict(state)
        start, elapsed, step_times = state["step"], state["elapsed"], state["step_times"]
        curve = state.get("curve", [])
        torch.set_rng_state(state["rng"])
    budget_s = None if case.budget_minutes is None else 60 * case.budget_minutes
    schedule = LearningRate(case.lr, case.steps, budget_s, case.schedule, case.warmup_steps)

    bar = tqdm(
        range(start, case.steps),
        initial=start,
        total=case.steps,
        disable=not progress or rank != 0,
        leave=False,
        desc=f"{row['label']} seed {case.seed}",
        dynamic_ncols=True,
    )
    done = start
    for step in bar:
        if budget_s is not None and elapsed >= budget_s:
            break
        for group in optimiser.param_groups:
            group["lr"] = schedule(step, elapsed) * group.get("lr_factor", 1.0)
        tic = clock()
        items = batch_items(train_set, step, suite.batch, rank, world_size)
        loss = task.generator_loss(net, collate(items, device, task.batch_keys), step)
        if not math.isfinite(loss.item()):
            row.update(
                status="diverged", reason=f"loss became {loss.item()} at step {step}", steps=step
            )
            return row
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step_times.append(clock() - tic)
        elapsed += step_times[-1]
        if world_size > 1:  # one clock for all ranks: they stop and schedule alike
            shared = torch.tensor([elapsed], dtype=torch.float64)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            elapsed = float(shared)
        bar.set_postfix(loss=f"{loss.item():.4f}", step_s=f"{step_times[-1]:.2f}")
        done = step + 1
        out_of_time = budget_s is not None and elapsed >= budget_s
        if done % suite.checkpoint_every == 0 or done == case.steps or out_of_time:
            if task.truth is not None:
                hits = copy_hit_rates(
                    model, test_set, suite.hit_samples, suite.eval_batch, device, task.truth
                )
                curve.append({"step": done, "time_s": elapsed, **hits})
            if rank == 0:
                save_checkpoint(
                    checkpoint,
                    {
                        "model": model.state_dict(),
                        "optimiser": optimiser.state_dict(),
                        "step": done,
                        "elapsed": elapsed,
                        "step_times": step_times,
                        "curve": curve,
                        "rng": torch.get_rng_state(),
                        **task.state_dict(),
                    },
                )
    bar.close()

    if world_size > 1:
        row["world_size"] = world_size
        row["replicas_identical"] = replicas_identical(model, *task.networks().values())
        if not row["replicas_identical"]:
            row.update(status="error", reason="DistributedDataParallel replicas diverged")
            return row
    metrics, (grid_batch, grid_out) = evaluate(
        model, test_set, task, loss_fn, suite.eval_batch, device
    )
    notes = metrics.pop("notes")
    row.update(metrics)
    if task.truth is not None:
        row["copy_hit_rate"] = copy_hit_rates(
            model, test_set, len(test_set), suite.eval_batch, device, task.truth
        )
    row.update(
        steps=done,
        hit_curve=curve,
        train_time_s=elapsed,
        step_time_s=float(torch.tensor(step_times).median()) if step_times else None,
        reason="; ".join(notes),
    )
    if rank == 0:
        grid = Path(f"{case.suite}-{device}-grids") / f"{case.case_id}.png"
        n = min(suite.grid_samples, len(grid_batch["source"]))
        task.save_grid(out_dir / grid, {k: v[:n] for k, v in grid_batch.items()}, grid_out[:n])
        row["grid_png"] = str(grid)
    return row


def empty_train_row(case: TrainCase, ctx: dict) -> dict:
    """Every key a train row has, metrics null until measured."""
    row = new_row(case, "train", ctx, "float32")
    row.update(
        task=case.task,
        preset=case.preset,
        batch=case.batch,
        lr=case.lr,
        loss=case.loss,
        data=json.loads(case.data),
        generator=json.loads(case.generator),
        budget_minutes=case.budget_minutes,
        max_steps=case.steps,
        schedule=case.schedule,
        warmup_steps=case.warmup_steps,
        temperature_lr=case.temperature_lr,
        grid_png=None,
    )
    if case.task_config != "{}":
        row["task_config"] = json.loads(case.task_config)
    return row
