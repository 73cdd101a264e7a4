"""Training under ``torchrun --nproc_per_node N``: ranks, the process group, gradients averaged
over the ranks for a task's own networks, and a check that every rank holds the same weights.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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


def replicas_identical(*models: torch.nn.Module) -> bool:
    """Whether every rank holds exactly the same weights (all-gathered and compared)."""
    flat = torch.cat([p.detach().flatten() for m in models for p in m.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world()[1])]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])
