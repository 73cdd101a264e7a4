"""GPA's block-routed relatives (BRA, VSA, MoBA, NSA's selection) against dense oracles.

Each oracle is written here from its paper's rule with plain loops in float64: which key blocks
every query keeps, then one masked softmax over the kept keys (VSA: plus its gated coarse
branch). The implementations must give the same outputs and input gradients.
"""

import itertools

import pytest
import torch

from attnbench import registry
from attnbench.impls.gpa.common import Geometry
from attnbench.impls.gpa.pytorch import select_keys
from attnbench.registry import UnsupportedError
from attnbench.spec import AttentionSpec

B, H, C, CV = 2, 4, 6, 5


def block_tokens(hw, side):
    """The row-major tokens of every side x side block of a map, blocks row-major."""
    h, w = hw
    return [
        [(r * side + a) * w + c * side + b for a in range(side) for b in range(side)]
        for r in range(h // side)
        for c in range(w // side)
    ]


def best(scores, topk, forced=None):
    """The indices of the topk largest scores, ties to the lower index, ``forced`` first."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    if forced is not None:
        order = [forced] + [j for j in order if j != forced]
    return set(order[:topk])


def mean(x, tokens):
    return x[..., tokens, :].mean(dim=-2)


def own_block(t, q_hw, kv_hw, side):
    """The key block under query token t (the kv map scaled to the q map)."""
    r, c = divmod(t, q_hw[1])
    return (r * kv_hw[0] // q_hw[0]) // side * (kv_hw[1] // side) + (
        c * kv_hw[1] // q_hw[1]
    ) // side


def region_mask(q, k, q_hw, kv_hw, side, topk, shared, scale):
    """BRA and VSA's fine branch: regions route on pooled logits (summed over heads if shared)."""
    mask = torch.zeros(B, H, q.shape[2], k.shape[2], dtype=torch.bool)
    groups, blocks = block_tokens(q_hw, side), block_tokens(kv_hw, side)
    for b, g in itertools.product(range(B), range(len(groups))):
        per_head = [
            [scale * float(mean(q[b, h], groups[g]) @ mean(k[b, h], blk)) for blk in blocks]
            for h in range(H)
        ]
        for h in range(H):
            scores = [sum(s) for s in zip(*per_head)] if shared else per_head[h]
            for j in best(scores, topk):
                mask[b, h, torch.tensor(groups[g])[:, None], torch.tensor(blocks[j])] = True
    return mask


def token_mask(q, k, q_hw, kv_hw, side, topk, scale, rule, head_group):
    """MoBA (rule 'token', head_group 1) and NSA (rule 'softmax'): every query routes, its own
    block kept."""
    mask = torch.zeros(B, H, q.shape[2], k.shape[2], dtype=torch.bool)
    blocks = block_tokens(kv_hw, side)
    for b, t in itertools.product(range(B), range(q.shape[2])):
        for first in range(0, H, head_group):
            importance = torch.zeros(len(blocks), dtype=torch.float64)
            for h in range(first, first + head_group):
                logits = torch.stack([scale * q[b, h, t] @ mean(k[b, h], blk) for blk in blocks])
                importance += logits.softmax(0) if rule == "softmax" else logits
            kept = best(importance.tolist(), topk, own_block(t, q_hw, kv_hw, side))
            for h, j in itertools.product(range(first, first + head_group), kept):
                mask[b, h, t, torch.tensor(blocks[j])] = True
    return mask


def masked_attention(q, k, v, mask, scale):
    scores = (scale * q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def vsa_coarse(q, k, v, q_hw, kv_hw, side, scale):
    """softmax(scale q_c k_cᵀ) v_c per query tile, given to every query of the tile."""
    groups, blocks = block_tokens(q_hw, side), block_tokens(kv_hw, side)
    q_c = torch.stack([mean(q, g) for g in groups], dim=2)
    k_c = torch.stack([mean(k, blk) for blk in blocks], dim=2)
    v_c = torch.stack([mean(v, blk) for blk in blocks], dim=2)
    coarse = (scale * q_c @ k_c.transpose(-2, -1)).softmax(-1) @ v_c
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    for g, tokens in enumerate(groups):
        out[:, :, tokens] = coarse[:, :, g : g + 1]
    return out


def oracle(name, params, q, k, v, q_hw, kv_hw):
    scale = C**-0.5
    with torch.no_grad():
        if name == "bra.torch":
            args = (params["region"], params["topk"], params["shared_heads"], scale)
            mask = region_mask(q, k, q_hw, kv_hw, *args)
        elif name == "vsa.torch":
            mask = region_mask(q, k, q_hw, kv_hw, params["tile"], params["topk"], False, scale)
        else:
            rule, group = ("token", 1) if name == "moba.torch" else ("softmax", params["group"])
            args = (params["block"], params["topk"], scale, rule, group)
            mask = token_mask(q, k, q_hw, kv_hw, *args)
    out = masked_attention(q, k, v, mask, scale)
    if name == "vsa.torch":
        out = out + params["gate"] * vsa_coarse(q, k, v, q_hw, kv_hw, params["tile"], scale)
    return out


CASES = [  # name, oracle's parameters, the implementation's, q map, kv map
    ("bra.torch", {"region": 2, "topk": 3, "shared_heads": True}, {}, (8, 8), (8, 8)),
    ("bra.torch", {"region": 2, "topk": 5, "shared_heads": False}, {}, (4, 8), (8, 4)),
    ("vsa.torch", {"tile": 2, "topk": 3, "gate": 0.7}, {}, (8, 8), (8, 8)),
    ("vsa.torch", {"tile": 2, "topk": 2, "gate": 0.0}, {}, (4, 4), (8, 8)),
    ("moba.torch", {"block": 2, "topk": 3}, {}, (8, 8), (8, 8)),
    ("moba.torch", {"block": 2, "topk": 2}, {}, (8, 4), (4, 8)),
    ("nsa.torch", {"block": 2, "topk": 3, "group": 4}, {"head_group": 0}, (8, 8), (8, 8)),
    ("nsa.torch", {"block": 4, "topk": 2, "group": 2}, {"head_group": 2}, (8, 8), (4, 8)),
]


def inputs(q_hw, kv_hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    nq, nk = q_hw[0] * q_hw[1], kv_hw[0] * kv_hw[1]
    q = 2 * torch.randn(B, H, nq, C, generator=g, dtype=torch.float64)
    k = 2 * torch.randn(B, H, nk, C, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, nk, CV, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize(("name", "params", "own", "q_hw", "kv_hw"), CASES)
def test_matches_the_dense_oracle_of_its_paper(name, params, own, q_hw, kv_hw):
    impl_params = {k: v for k, v in params.items() if k != "group"} | own
    impl = registry.create(name, **impl_params)
    q, k, v = inputs(q_hw, kv_hw)
    out = impl(q, k, v, q_hw, kv_hw)
    ref_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = oracle(name, params, *ref_inputs, q_hw, kv_hw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad)
    ref.backward(grad)
    for x, got, want in zip("qkv", (q, k, v), ref_inputs):
        torch.testing.assert_close(
            got.grad, want.grad, rtol=1e-10, atol=1e-12, msg=lambda m, x=x: f"{name} d{x}: {m}"
        )
    weights = impl.weights(q.detach(), k.detach(), q_hw, kv_hw)
    torch.testing.assert_close(weights @ v.detach(), out.detach(), rtol=1e-10, atol=1e-12)


def test_bra_routed_per_head_keeps_what_gpa_with_cells_of_one_keeps():
    # One pooled query per region and per-head routing: GPA with cell 1 and d = the region.
    q, k, _ = (t.detach() for t in inputs((8, 8), (8, 8)))
    bra = registry.create("bra.torch", region=2, topk=5, shared_heads=False)
    spec = AttentionSpec.from_inputs(q, k, k, (8, 8), (8, 8))
    geom = Geometry(d=2, s=1, topk=5, q_hw=(8, 8), kv_hw=(8, 8))
    assert torch.equal(bra.kept(q, k, spec), select_keys(q, k, geom, "dot", C**-0.5))


@pytest.mark.parametrize("name", ["bra.torch", "moba.torch", "nsa.torch", "vsa.torch"])
def test_tied_blocks_go_to_the_lower_index(name):
    # Equal keys everywhere: every block scores alike, so the first blocks are kept (MoBA and
    # NSA: the own block first, then the lowest others).
    q = torch.randn(1, H, 16, C, dtype=torch.float64)
    k = torch.ones(1, H, 16, C, dtype=torch.float64)
    side = {"bra.torch": "region", "vsa.torch": "tile"}.get(name, "block")
    impl = registry.create(name, **{side: 2, "topk": 2})
    spec = AttentionSpec.from_inputs(q, k, k, (4, 4), (4, 4))
    kept = impl.kept(q, k, spec)
    if name in ("moba.torch", "nsa.torch"):
        own = [own_block(t, (4, 4), (4, 4), 2) for t in range(16)]
        want = [sorted({o, 0 if o else 1}) for o in own]
        assert kept[0, 0].tolist() == want
    else:
        assert (kept == torch.tensor([0, 1])).all()


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("bra.torch", {"region": 3}, "q map height 8 is not divisible by the group side 3"),
        ("moba.torch", {"block": 3}, "kv map height 8 is not divisible by the block side 3"),
        ("vsa.torch", {"tile": 4, "topk": 5}, "topk=5 exceeds the 4 key blocks"),
        ("nsa.torch", {"head_group": 3}, "heads=4 is not divisible by head_group=3"),
    ],
)
def test_sizes_that_do_not_divide_are_named(name, params, message):
    q, k, v = (t.detach() for t in inputs((8, 8), (8, 8)))
    with pytest.raises(UnsupportedError, match=message):
        registry.create(name, **params)(q, k, v, (8, 8), (8, 8))


def test_routing_and_attending_flops_are_counted_apart():
    spec = AttentionSpec(
        batch=1, heads=1, q_tokens=64, kv_tokens=64, channels=8, v_channels=8,
        q_hw=(8, 8), kv_hw=(8, 8), dtype=torch.float32, device="cpu",
    )  # fmt: skip
    moba = registry.create("moba.torch", block=2, topk=3)
    # Every query against 16 pooled blocks; then against 3 blocks of 4 keys, scores and values.
    assert moba.phase_flops(spec) == (2 * 64 * 16 * 8, 2 * 64 * 12 * 16)
    bra = registry.create("bra.torch", region=2, topk=3)
    assert bra.phase_flops(spec) == (2 * 16 * 16 * 8, 2 * 64 * 12 * 16)
    assert bra.flops(spec, backward=True) == 2 * 16 * 16 * 8 + 3 * 2 * 64 * 12 * 16
