"""The fidelity step of a micro case: errors against exact attention in float64 on the CPU.

Every method of a suite is scored on the same inputs, so exact attention's result for an input
is computed once and kept (the last :data:`REFERENCES_KEPT`, looked up by content).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import torch
import torch.nn.functional as F

from attnbench.spec import AttentionSpec


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64."""
    return ((got.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def copy_psnr(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> float:
    """PSNR (dB, data range 1) of the copied image against the warped one, valid pixels."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    mask = valid[..., None].expand_as(target)
    got = out.double().cpu().clamp(0, 1)[mask]
    return peak_signal_noise_ratio(got, target[mask], data_range=1.0).item()


REFERENCES_KEPT = 16  # exact results kept by exact_reference: one suite's inputs, ~0.5 GiB at 128²


def output_grad(shape) -> torch.Tensor:
    """The output gradient every fidelity case back-propagates (fp64, fixed seed)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def fingerprint(*tensors: torch.Tensor) -> tuple:
    """Shapes and a digest of the contents: equal for equal tensors, whatever object holds them."""
    digest = hashlib.blake2b(digest_size=16)
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return (*(tuple(t.shape) for t in tensors), str(tensors[0].dtype), digest.hexdigest())


_references: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()


def exact_reference(q, k, v, scale, with_grad: bool):
    """Exact attention's output (and, with ``with_grad``, its input gradients for
    :func:`output_grad`, flattened and concatenated) on fp64 CPU inputs.

    Every method of a suite is compared on the same inputs, so the last
    :data:`REFERENCES_KEPT` results are kept, looked up by the inputs' contents.
    """
    key = (*fingerprint(q, k, v), scale, with_grad)
    if key in _references:
        _references.move_to_end(key)
        return _references[key]
    ref_in = [t.detach().clone().requires_grad_(with_grad) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*ref_in, scale=scale)
    grads = None
    if with_grad:
        out.backward(output_grad(out.shape))
        grads = torch.cat([t.grad.flatten() for t in ref_in])
    _references[key] = out.detach(), grads
    if len(_references) > REFERENCES_KEPT:
        _references.popitem(last=False)
    return _references[key]


RECALL_BLOCK_ELEMS = 1 << 24  # exact probabilities per step of the recall (128 MiB in fp64)
WORST_SHARE = 0.1  # attn_recall_p10: the mean recall of this share of queries, the worst


def attention_recall(mask: torch.Tensor, q, k, scale: float | None) -> tuple[float, float]:
    """The share of exact attention's probability mass on the kept keys ``mask`` [B, H, Nq,
    Nk]: its mean over queries, and its mean over the worst :data:`WORST_SHARE` of queries.
    Exact probabilities in float64 (q, k: fp64 CPU), a band of queries at a time."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    band = max(1, RECALL_BLOCK_ELEMS // (q.shape[0] * q.shape[1] * k.shape[2]))
    recalls = []
    for start in range(0, q.shape[2], band):
        probs = (scale * q[:, :, start : start + band] @ k.transpose(-2, -1)).softmax(dim=-1)
        kept = mask[:, :, start : start + band].to(probs.device)
        recalls.append((probs * kept).sum(dim=-1).flatten())
    recall = torch.cat(recalls)
    worst = recall.sort().values[: max(1, int(WORST_SHARE * len(recall)))]
    return recall.mean().item(), worst.mean().item()


def measure_recall(impl, args, inputs, spec: AttentionSpec) -> dict:
    """``attn_recall`` and ``attn_recall_p10`` of a method that keeps a subset of keys; null
    with a note for one that does not."""
    with torch.no_grad():
        mask = impl.kept_keys(*(t.detach() for t in args[:2]), spec)
    if mask is None:
        note = f"attn_recall: {impl.name} keeps no subset of the keys (it weighs them all)"
        return {"attn_recall": None, "attn_recall_p10": None, "notes": [note]}
    mean, worst = attention_recall(mask, inputs.q, inputs.k, impl.params.get("scale"))
    return {"attn_recall": mean, "attn_recall_p10": worst, "notes": []}


def measure_fidelity(impl, inputs, spec: AttentionSpec, with_grad: bool) -> dict:
    """Errors of outputs (and input gradients) against exact fp64 attention on the CPU, the
    copy PSNR of warp inputs, and the attention recall (:func:`measure_recall`)."""
    ref, ref_grad = exact_reference(
        inputs.q, inputs.k, inputs.v, impl.params.get("scale"), with_grad
    )
    args = [
        t.detach().to(device=spec.device, dtype=spec.dtype).requires_grad_(with_grad)
        for t in (inputs.q, inputs.k, inputs.v)
    ]
    grad_spec = dataclasses.replace(spec, requires_grad=with_grad)
    out = impl.forward(*args, grad_spec)
    result = {"rel_err_out": relative_error(out, ref)}
    if inputs.target is not None:
        result["copy_psnr"] = copy_psnr(out.detach(), inputs.target, inputs.valid)
    if with_grad:
        out.backward(output_grad(ref.shape).to(device=spec.device, dtype=spec.dtype))
        got = torch.cat([t.grad.double().cpu().flatten() for t in args])
        result["rel_err_grad"] = relative_error(got, ref_grad)
    return result | measure_recall(impl, args, inputs, spec)
