"""Attention recall: the share of exact attention's probability mass on the keys a method keeps."""

import pytest
import torch

from attnbench import registry
from attnbench.inputs import make_inputs
from attnbench.kinds.micro.fidelity import attention_recall, measure_fidelity
from attnbench.spec import AttentionSpec


def test_recall_of_a_hand_made_case():
    # One query, four keys; scores 0, 0, log 2, log 4 (scale 1): probabilities 1/8, 1/8, 2/8,
    # 4/8. A second query sees the keys reversed. Keeping keys 2 and 3 keeps 6/8 for the
    # first query and 2/8 for the second: mean 1/2, the worst (one query of two) 2/8.
    weights = [[1.0, 1.0, 2.0, 4.0], [4.0, 2.0, 1.0, 1.0]]
    scores = torch.log(torch.tensor(weights, dtype=torch.float64))
    q = scores[None, None]  # (1, 1, 2, 4): q k^T = scores with k the identity
    keys = torch.eye(4, dtype=torch.float64)[None, None]
    mask = torch.tensor([[False, False, True, True]] * 2)[None, None]
    mean, worst = attention_recall(mask, q, keys, scale=1.0)
    assert mean == pytest.approx(0.5) and worst == pytest.approx(2 / 8)


def test_exact_attention_keeps_everything_and_approximations_keep_nothing_named():
    spec = AttentionSpec(1, 1, 64, 64, 8, 8, (8, 8), (8, 8), torch.float32, "cpu")
    inputs = make_inputs("gaussian", spec, 0)
    full = measure_fidelity(registry.create("full.sdpa"), inputs, spec, False)
    assert full["attn_recall"] == pytest.approx(1.0)
    assert full["attn_recall_p10"] == pytest.approx(1.0)
    nystrom = measure_fidelity(registry.create("nystrom.torch", landmarks=8), inputs, spec, False)
    assert nystrom["attn_recall"] is None
    assert nystrom["notes"] == [
        "attn_recall: nystrom.torch keeps no subset of the keys (it weighs them all)"
    ]


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("gpa.torch", {"downsample": 2, "topk": 3}),
        ("bra.torch", {"region": 2, "topk": 3}),
        ("moba.torch", {"block": 2, "topk": 3}),
        ("window.torch", {"window": 4}),
        ("neighborhood.torch", {"kernel": 3}),
    ],
)
def test_recall_is_the_exact_mass_on_the_support_of_the_methods_weights(name, params):
    spec = AttentionSpec(1, 2, 64, 64, 8, 8, (8, 8), (8, 8), torch.float32, "cpu")
    inputs = make_inputs("smooth", spec, 0)
    impl = registry.create(name, **params)
    got = measure_fidelity(impl, inputs, spec, False)
    q, k = inputs.q.float(), inputs.k.float()
    support = impl.weights(q, k, (8, 8), (8, 8)) > 0
    exact = (inputs.q @ inputs.k.transpose(-2, -1) * 8**-0.5).softmax(-1)
    per_query = (exact * support).sum(-1).flatten()
    assert got["attn_recall"] == pytest.approx(per_query.mean().item(), rel=1e-9)
    worst = per_query.sort().values[: len(per_query) // 10]
    assert got["attn_recall_p10"] == pytest.approx(worst.mean().item(), rel=1e-9)
    assert 0 < got["attn_recall_p10"] <= got["attn_recall"] < 1
