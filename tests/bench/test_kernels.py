"""pytest-benchmark: GPA phase 1 and phase 2 (gpa.torch, gpa.cpp) and full.sdpa on fixed shapes.

Measure with ``.venv/bin/python -m pytest tests/bench``; ``make test`` runs each once with
``--benchmark-disable`` so that the benchmarks stay runnable and their results stay checked.
"""

import pytest
import torch

from attnbench import registry
from attnbench.impls.gpa import cpp, grid_attention, select_keys
from attnbench.spec import AttentionSpec

CPP_REASONS = registry.get("gpa.cpp").availability("cpu")
BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(bool(CPP_REASONS), reason="; ".join(CPP_REASONS))),
]

SIDE, C = 128, 64  # a 128x128 map, phase 1 at 32x32 (d = 4), cells 2x2, κ = 12


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, SIDE * SIDE, C, generator=g) for _ in range(3))
    spec = AttentionSpec.from_inputs(q, k, v, (SIDE, SIDE), (SIDE, SIDE))
    gpa = registry.create("gpa.torch", phase1_res=32)
    return gpa, gpa.geometry(spec), spec, q, k, v


def phases(backend, geom):
    """(phase 1, phase 2) of ``backend`` as functions of (q, k) and (q, k, v, keys)."""
    if backend == "torch":
        return (
            lambda q, k: select_keys(q, k, geom),
            lambda q, k, v, keys: grid_attention(q, k, v, keys, geom),
        )
    return (
        lambda q, k: cpp.select_keys(q, k, geom),
        lambda q, k, v, keys: cpp.attend(q, k, v, keys, geom, "dot", C**-0.5, False)[0],
    )


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpa_phase1(benchmark, case, backend):
    gpa, geom, spec, q, k, v = case
    keys = benchmark(phases(backend, geom)[0], q, k)
    assert keys.shape == (1, 1, geom.m, 12)
    assert torch.all(keys.diff(dim=-1) > 0) and keys.min() >= 0 and keys.max() < geom.nk_low


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpa_phase2(benchmark, case, backend):
    gpa, geom, spec, q, k, v = case
    keys = select_keys(q, k, geom)
    out = benchmark(phases(backend, geom)[1], q, k, v, keys)
    torch.testing.assert_close(out, gpa(q, k, v, q_hw=spec.q_hw, kv_hw=spec.kv_hw))


@torch.no_grad()
def test_full_sdpa(benchmark, case):
    _, _, spec, q, k, v = case
    sdpa = registry.create("full.sdpa")
    out = benchmark(sdpa.forward, q, k, v, spec)
    weights = (q[0, 0, :4] @ k[0, 0].T * C**-0.5).softmax(-1)
    torch.testing.assert_close(out[0, 0, :4], weights @ v[0, 0], rtol=1e-4, atol=1e-5)
