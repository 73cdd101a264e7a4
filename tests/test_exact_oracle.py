"""Every registered implementation against an exact fp64 oracle written here.

Generated from the registry: an implementation registered later is tested with no extra work.
Implementations that are approximations are run with the parameters under which they are exact
(``exact_params``); those that have none are measured for fidelity by the harness instead.
"""

import pytest
import torch

from attnbench import registry
from attnbench.spec import AttentionSpec
from tests.conftest import DEVICES

# (batch, heads, q map, kv map, C, Cv): self-attention, cross-attention with another map size
# and Cv != C, and rectangular maps.
CASES = {
    "self-8x8": (2, 2, (8, 8), (8, 8), 16, 16),
    "cross-8x8-4x4-cv24": (1, 3, (8, 8), (4, 4), 8, 24),
    "rect-4x8-8x4-cv4": (2, 1, (4, 8), (8, 4), 32, 4),
}


def oracle(q, k, v, scale):
    """softmax(scale q k^T) v in float64 with an explicit, max-shifted softmax."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("bhqc,bhkc->bhqk", q, k) * scale
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("bhqk,bhkv->bhqv", weights, v)


def make_inputs(case, dtype, device, seed=0):
    b, h, q_hw, kv_hw, c, cv = CASES[case]
    g = torch.Generator().manual_seed(seed)
    nq, nk = q_hw[0] * q_hw[1], kv_hw[0] * kv_hw[1]
    # Scaled up so that the softmax is far from uniform.
    q = 2 * torch.randn(b, h, nq, c, generator=g)
    k = 2 * torch.randn(b, h, nk, c, generator=g)
    v = torch.randn(b, h, nk, cv, generator=g)
    return [t.to(dtype=dtype, device=device).requires_grad_() for t in (q, k, v)], q_hw, kv_hw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", registry.list_impls())
def test_matches_exact_oracle(name, case, dtype, device):
    cls = registry.get(name)
    if not cls.is_available(device):
        pytest.skip(f"{name} unavailable on {device}: {cls.availability(device)}")
    (q, k, v), q_hw, kv_hw = make_inputs(case, dtype, device)
    spec = AttentionSpec.from_inputs(q, k, v, q_hw, kv_hw)
    params = cls().exact_params(spec)
    if params is None:
        pytest.skip(f"{name} has no exact configuration")
    impl = registry.create(name, **params)
    forward_only = not impl.supports(spec)
    if forward_only:
        for t in (q, k, v):
            t.requires_grad_(False)
        spec = AttentionSpec.from_inputs(q, k, v, q_hw, kv_hw)
    reasons = impl.unsupported_reasons(spec)
    if reasons:
        pytest.skip(f"{impl.label}: {reasons}")
    rtol, atol = impl.tolerance(dtype)

    out = impl(q, k, v, q_hw=q_hw, kv_hw=kv_hw)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = oracle(*ref_inputs, scale=spec.channels**-0.5)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(
        out.double(), ref, rtol=rtol, atol=atol, msg=lambda m: f"{impl.label} output: {m}"
    )
    if forward_only:
        return

    grad_out = torch.randn(
        ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    out.backward(grad_out.to(device=device, dtype=dtype))
    ref.backward(grad_out)
    for label, t, r in zip("qkv", (q, k, v), ref_inputs):
        torch.testing.assert_close(
            t.grad.double(),
            r.grad,
            rtol=rtol,
            atol=atol,
            msg=lambda m, x=label: f"{impl.label} d{x}: {m}",
        )
