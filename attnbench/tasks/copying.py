"""The affine-copying task (the GPA paper's image-distortion experiment, Jetchev et al. 2021).

A generator sees an image M with its pose B (source branch) and a target pose τ(B) (target
branch) and must produce τ(M): the image under a random affine warp A = I + U(-0.15, 0.15). It
can only do so well by copying detail from the source through its attention-copying blocks.
Every case trains the same architecture with the same data, steps and optimiser; only the
attention at the large decoder levels changes. Loss L_self only: L1 (default), LPIPS or a
weighted sum.

A run checkpoints every ``checkpoint_every`` steps (atomically) and continues from its
checkpoint when resumed; a non-finite loss ends it with a ``diverged`` row naming the step.
Evaluation uses a fixed held-out set (its own seed, fixed transforms): test L1 and loss, SSIM,
PSNR, LPIPS where its weights exist, attention memory as in the paper (forward+backward through
the attention blocks alone at batch 1), step time, parameter count, and a PNG grid.

Under ``torchrun --nproc_per_node N`` the model is wrapped in DistributedDataParallel (gloo on
CPU, nccl on CUDA); each rank takes its share of every batch and rank 0 writes rows, checkpoints
and grids.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from attnbench import registry
from attnbench.results import TRAIN_KEYS, new_row
from attnbench.suite import TrainCase, TrainSuite

TEST_SEED = 2**31 - 1  # the held-out set's seed: no training seed draws the same items


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


def make_source(suite: TrainSuite, size: tuple[int, int]):
    """The item source the data config names, at the generator's image size."""
    from attnbench.data import DeepFashion, ImageFolder, Mannequin

    data = suite.data
    if data.source == "mannequin":
        return Mannequin(size=size, sigma=data.sigma)
    if data.source == "folder":
        return ImageFolder(data.root, size, fit=data.fit)
    return DeepFashion(
        data.root, data.annotations, data.pairs, size=size, sigma=data.sigma, fit=data.fit
    )


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


PAIR_KEYS = ("source", "source_pose", "target", "target_pose")


def collate(items: list[dict], device: str) -> dict:
    """Stack the image and pose tensors of dataset items into a batch on ``device``."""
    return {key: torch.stack([item[key] for item in items]).to(device) for key in PAIR_KEYS}


def batch_items(dataset, step: int, batch: int, rank: int, world_size: int) -> list[dict]:
    """The rank's share of the global batch of ``step`` (items cycle through the dataset)."""
    per_rank = batch // world_size
    start = step * batch + rank * per_rank
    return [dataset[(start + j) % len(dataset)] for j in range(per_rank)]


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


def save_grid(path: Path, batch: dict, output: torch.Tensor) -> None:
    """One row per sample: source, target pose, output, target, |error| (the paper's Fig. 5b)."""
    from torchvision.utils import save_image

    output = output.clamp(0, 1)
    columns = [
        batch["source"],
        pose_picture(batch["target_pose"]),
        output,
        batch["target"],
        (output - batch["target"]).abs(),
    ]
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # (N * 5, 3, H, W), row-major
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(tiles.cpu(), path, nrow=len(columns), padding=2, pad_value=1.0)


@torch.no_grad()
def evaluate(model, test_set, loss_fn: Loss, eval_batch: int, device: str) -> tuple[dict, dict]:
    """Metrics on the whole held-out set, and its first batch with outputs (for the grid)."""
    from attnbench.metrics import MetricUnavailable, image_metrics, lpips_model

    model.eval()
    preds, targets, losses = [], [], []
    first = None
    for start in range(0, len(test_set), eval_batch):
        items = [test_set[i] for i in range(start, min(start + eval_batch, len(test_set)))]
        batch = collate(items, device)
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
    model.train()
    return result | {"notes": notes}, first


def _attention_memory_worker(preset_name: str, impl: str, params: dict, device: str) -> int:
    from attnbench.generators import CopyingGenerator, preset
    from attnbench.measure import peak_memory

    torch.manual_seed(0)  # the weights do not change the memory; only the shapes do
    model = CopyingGenerator(preset(preset_name), attention=impl, attention_params=params)
    model = model.to(device)
    inputs = model.attention_block_inputs(batch=1, device=device)
    blocks = dict(model.attention_blocks())

    def run_blocks():
        for name, (target_feat, source_feat) in inputs.items():
            blocks[name].attention_call(target_feat, source_feat).sum().backward()

    return peak_memory(run_blocks, device)


def attention_memory(preset_name: str, impl: str, params: dict, device: str) -> int:
    """Peak bytes of forward+backward through the attention blocks alone at batch 1.

    The paper's measure (its Fig. 5a). It runs in a fresh process: in a process that has
    trained before, the allocator's free memory would hide part of the peak on the CPU.
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_attention_memory_worker, (preset_name, impl, params, device))


def replicas_identical(model: torch.nn.Module) -> bool:
    """Whether every rank holds exactly the same weights (all-gathered and compared)."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world()[1])]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def train_case(
    case: TrainCase, suite: TrainSuite, row: dict, out_dir: Path, resume: bool, progress: bool
) -> dict:
    """Train and evaluate one case; fill ``row`` (status, metrics) and return it."""
    from tqdm import tqdm

    from attnbench.data import AffineCopyDataset
    from attnbench.generators import CopyingGenerator, preset

    rank, world_size = world()
    device = case.device
    if suite.batch % world_size:
        row.update(
            status="error",
            reason=f"batch={suite.batch} does not divide over {world_size} processes "
            f"(allowed: a multiple of {world_size})",
        )
        return row
    config = preset(case.preset)
    torch.manual_seed(case.seed)
    model = CopyingGenerator(config, attention=case.impl, attention_params=case.params_dict)
    model = model.to(device)
    row["label"] = registry.create(case.impl, **model.attention_params).label
    row["n_params"] = model.n_params()
    row["attn_mem_bytes"] = attention_memory(case.preset, case.impl, case.params_dict, device)
    source = make_source(suite, config.image_size)
    train_set = AffineCopyDataset(
        source,
        suite.data.train_size,
        seed=case.seed,
        sigma=suite.data.sigma,
        noise=suite.data.noise,
    )
    test_set = AffineCopyDataset(
        source, suite.data.test_size, seed=TEST_SEED, sigma=suite.data.sigma, noise=suite.data.noise
    )
    loss_fn = Loss(suite.loss, device)
    optimiser = torch.optim.Adam(model.parameters(), lr=case.lr)
    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)

    checkpoint = out_dir / f"{case.suite}-{device}-checkpoints" / f"{case.case_id}.pt"
    start, elapsed, step_times = 0, 0.0, []
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        start, elapsed, step_times = state["step"], state["elapsed"], state["step_times"]
        torch.set_rng_state(state["rng"])

    bar = tqdm(
        range(start, case.steps),
        initial=start,
        total=case.steps,
        disable=not progress or rank != 0,
        leave=False,
        desc=f"{row['label']} seed {case.seed}",
        dynamic_ncols=True,
    )
    for step in bar:
        tic = time.perf_counter()
        batch = collate(batch_items(train_set, step, suite.batch, rank, world_size), device)
        out = net(batch["source"], batch["source_pose"], batch["target_pose"])
        loss = loss_fn(out, batch["target"])
        if not math.isfinite(loss.item()):
            row.update(
                status="diverged", reason=f"loss became {loss.item()} at step {step}", steps=step
            )
            return row
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step_times.append(time.perf_counter() - tic)
        elapsed += step_times[-1]
        bar.set_postfix(loss=f"{loss.item():.4f}", step_s=f"{step_times[-1]:.2f}")
        done = step + 1
        if rank == 0 and (done % suite.checkpoint_every == 0 or done == case.steps):
            save_checkpoint(
                checkpoint,
                {
                    "model": model.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "step": done,
                    "elapsed": elapsed,
                    "step_times": step_times,
                    "rng": torch.get_rng_state(),
                },
            )
    bar.close()

    if world_size > 1:
        row["world_size"] = world_size
        row["replicas_identical"] = replicas_identical(model)
        if not row["replicas_identical"]:
            row.update(status="error", reason="DistributedDataParallel replicas diverged")
            return row
    metrics, (grid_batch, grid_out) = evaluate(model, test_set, loss_fn, suite.eval_batch, device)
    notes = metrics.pop("notes")
    notes.append("fid: not computed for the affine-copying task")
    row.update(metrics)
    row.update(
        steps=case.steps,
        train_time_s=elapsed,
        step_time_s=float(torch.tensor(step_times).median()) if step_times else None,
        reason="; ".join(notes),
    )
    if rank == 0:
        grid = Path(f"{case.suite}-{device}-grids") / f"{case.case_id}.png"
        n = min(suite.grid_samples, len(grid_batch["source"]))
        save_grid(out_dir / grid, {k: v[:n] for k, v in grid_batch.items()}, grid_out[:n])
        row["grid_png"] = str(grid)
    return row


def empty_train_row(case: TrainCase, ctx: dict) -> dict:
    """Every key a train row has, metrics null until measured."""
    row = new_row(case, "train", ctx, "float32", TRAIN_KEYS)
    row.update(
        task=case.task,
        preset=case.preset,
        batch=case.batch,
        lr=case.lr,
        loss=case.loss,
        data=json.loads(case.data),
        grid_png=None,
    )
    return row
