"""What the attention of a generator needs: its peak memory as the paper measures it, and the
reasons a block's implementation cannot train at a batch size."""

from __future__ import annotations

import dataclasses
import functools
import json

import torch


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
