"""``Attention.weights``: the dense attention matrix of every implementation that exposes one.

Generated from the registry. Each implementation's weights must reproduce its own output
(``weights @ v == output``: every method here is linear in v), and under its exact parameters
they must equal softmax(scale q k^T) computed here.
"""

import pytest
import torch

from attnbench import registry
from attnbench.spec import AttentionSpec

Q_HW, KV_HW = (8, 8), (8, 8)
# Parameters that make each family approximate on 8x8 maps (the registry defaults may not fit).
APPROXIMATE = {
    "gpa": [{"downsample": 2, "topk": 3}, {"downsample": 2, "topk": 5, "affinity": "euclid"}],
    "nystrom": [{"landmarks": 8}, {"landmarks": 4, "landmark_mode": "pool2d"}],
    "performer": [{"features": 16}],
}


def inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n, nk = Q_HW[0] * Q_HW[1], KV_HW[0] * KV_HW[1]
    q = 2 * torch.randn(2, 2, n, 8, generator=g, dtype=dtype)
    k = 2 * torch.randn(2, 2, nk, 8, generator=g, dtype=dtype)
    v = torch.randn(2, 2, nk, 5, generator=g, dtype=dtype)
    return q, k, v


def exposes_weights(name: str) -> bool:
    return registry.get(name).dense_weights is not registry.Attention.dense_weights


def runnable(impl, q, k, v):
    reasons = impl.unsupported_reasons(AttentionSpec.from_inputs(q, k, v, Q_HW, KV_HW))
    if reasons:
        pytest.skip(f"{impl.label}: {reasons}")


@pytest.mark.parametrize("name", registry.list_impls())
def test_weights_reproduce_the_output(name):
    if not registry.get(name).is_available("cpu"):
        pytest.skip(f"{name}: {registry.get(name).availability('cpu')}")
    if not exposes_weights(name):
        pytest.skip(f"{name} exposes no weights")
    q, k, v = inputs()
    for params in APPROXIMATE.get(registry.get(name).family, [{}]):
        impl = registry.create(name, **params)
        runnable(impl, q, k, v)
        weights = impl.weights(q, k, Q_HW, KV_HW)
        assert weights.shape == (2, 2, 64, 64)
        torch.testing.assert_close(
            weights @ v, impl(q, k, v, Q_HW, KV_HW), msg=lambda m, i=impl: f"{i.label}: {m}"
        )


@pytest.mark.parametrize("name", registry.list_impls())
def test_exact_weights_are_the_softmax(name):
    cls = registry.get(name)
    if not cls.is_available("cpu") or not exposes_weights(name):
        pytest.skip(f"{name} unavailable or without weights")
    q, k, v = inputs(seed=1)
    params = cls().exact_params(AttentionSpec.from_inputs(q, k, v, Q_HW, KV_HW))
    if params is None:
        pytest.skip(f"{name} has no exact configuration")
    impl = registry.create(name, **params)
    runnable(impl, q, k, v)
    scores = torch.einsum("bhqc,bhkc->bhqk", q, k) * 8**-0.5
    expected = (scores - scores.amax(-1, keepdim=True)).exp()
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(impl.weights(q, k, Q_HW, KV_HW), expected)


def test_gpa_weights_are_zero_off_the_kept_blocks():
    from attnbench.impls.gpa import select_keys

    q, k, _ = inputs(seed=2)
    impl = registry.create("gpa.torch", downsample=2, topk=3)
    geom = impl.geometry(AttentionSpec.from_inputs(q, k, k, Q_HW, KV_HW))
    weights = impl.weights(q, k, Q_HW, KV_HW)
    keys = select_keys(q, k, geom)  # (B, H, m, κ) low-res keys of each 4x4-pixel query cell
    nonzero = weights[0, 0, 0] > 0  # query (0, 0), in cell 0
    blocks = {(int(i) // 4, int(i) % 4) for i in keys[0, 0, 0]}
    expected = torch.tensor([(t // 8 // 2, t % 8 // 2) in blocks for t in range(64)])
    assert torch.equal(nonzero, expected), "weights outside the cell's kept blocks"
    assert int(nonzero.sum()) == 3 * 4


def test_none_has_zero_weights():
    q, k, _ = inputs()
    assert not registry.create("none").weights(q, k).any()


def test_too_large_a_matrix_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "MAX_WEIGHT_ELEMENTS", 1000)
    q, k, _ = inputs()
    with pytest.raises(ValueError, match="at most 1000"):
        registry.create("full.sdpa").weights(q, k)


def test_implementations_without_weights_say_so():
    @registry.register("test.noweights")
    class NoWeights(registry.Attention):
        def forward(self, q, k, v, spec):
            return v

    try:
        q, k, _ = inputs()
        with pytest.raises(registry.UnsupportedError, match="exposes no attention weights"):
            registry.create("test.noweights").weights(q, k)
    finally:
        registry.unregister("test.noweights")
