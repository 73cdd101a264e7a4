"""Neighbourhood and window attention against an oracle written here from their definitions.

The oracle builds the dense [N, N] boolean mask of which keys each query sees, by plain loops
over the rules (issue 14, the module docstrings), and applies a masked softmax in float64.
"""

import dataclasses

import pytest
import torch

from attnbench import registry
from attnbench.impls import neighborhood
from attnbench.registry import UnsupportedError
from attnbench.spec import AttentionSpec

NATTEN_REASONS = registry.get("neighborhood.natten").availability("cpu")
needs_natten = pytest.mark.skipif(bool(NATTEN_REASONS), reason="; ".join(NATTEN_REASONS))
FLEX_REASONS = registry.get("neighborhood.flex").availability("cpu")
needs_flex = pytest.mark.skipif(bool(FLEX_REASONS), reason="; ".join(FLEX_REASONS))


def axis_neighbours(length, kernel, dilation, i):
    """Key positions of query position i along one axis (NATTEN's rule, by enumeration)."""
    group = list(range(i % dilation, length, dilation))  # i's sub-grid
    p = group.index(i)
    start = min(max(p - kernel // 2, 0), len(group) - kernel)
    return set(group[start : start + kernel])


def neighbourhood_oracle_mask(hw, kernel, dilation):
    h, w = hw
    mask = torch.zeros(h * w, h * w, dtype=torch.bool)
    for i in range(h):
        rows = axis_neighbours(h, kernel, dilation, i)
        for j in range(w):
            cols = axis_neighbours(w, kernel, dilation, j)
            for r in rows:
                for c in cols:
                    mask[i * w + j, r * w + c] = True
    return mask


def axis_windows(length, window, shift):
    """Window index of every position: boundaries at 0, length and shift + multiples of w."""
    cuts = sorted({0, length} | set(range(shift, length, window)))
    return [sum(1 for c in cuts[1:] if c <= x) for x in range(length)]


def window_oracle_mask(hw, window, shift):
    h, w = hw
    rows, cols = axis_windows(h, window, shift), axis_windows(w, window, shift)
    ids = [(rows[i], cols[j]) for i in range(h) for j in range(w)]
    return torch.tensor([[a == b for b in ids] for a in ids])


def masked_oracle(q, k, v, mask):
    """softmax over the allowed keys of scale q k^T, times v, in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("bhqc,bhkc->bhqk", q, k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("bhqk,bhkv->bhqv", weights, v)


def make_inputs(b, heads, hw, c, cv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = hw[0] * hw[1]
    q = 2 * torch.randn(b, heads, n, c, generator=g, dtype=torch.float64)
    k = 2 * torch.randn(b, heads, n, c, generator=g, dtype=torch.float64)
    v = torch.randn(b, heads, n, cv, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)]


def check(impl, hw, mask, b, heads, c, cv, dtype, grad):
    q, k, v = make_inputs(b, heads, hw, c, cv, dtype)
    for t in (q, k, v):
        t.requires_grad_(grad)
    ref_inputs = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    ref = masked_oracle(*ref_inputs, mask)
    out = impl(q, k, v, q_hw=hw, kv_hw=hw)
    rtol, atol = impl.tolerance(dtype)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(
        out.double(), ref, rtol=rtol, atol=atol, msg=lambda m: f"{impl}: {m}"
    )
    if not grad:
        return
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    for name, t, r in zip("qkv", (q, k, v), ref_inputs):
        torch.testing.assert_close(
            t.grad.double(), r.grad, rtol=rtol, atol=atol, msg=lambda m, x=name: f"{impl} d{x}: {m}"
        )


# (batch, heads, map, C, Cv, kernel, dilation): square and rectangular maps, kernels that hit
# the borders everywhere, dilation 1 to 3, C != Cv.
NEIGHBOURHOOD_CASES = {
    "square-7-k3": (1, 1, (7, 7), 4, 4, 3, 1),
    "rect-6x9-k3-d2": (2, 2, (6, 9), 8, 5, 3, 2),
    "rect-9x10-k3-d3": (1, 2, (9, 10), 4, 6, 3, 3),
    "rect-5x8-k5": (2, 1, (5, 8), 4, 3, 5, 1),
    "rect-11x7-k1-d2": (1, 1, (11, 7), 3, 2, 1, 2),
    "square-8-k3-d2": (1, 2, (8, 8), 4, 4, 3, 2),
}
FLEX_CASES = ["rect-6x9-k3-d2"]  # each shape compiles (seconds on a CPU)


def test_oracle_rule_by_hand():
    # Length 7, kernel 3: centred inside, shifted inward at both borders.
    assert [sorted(axis_neighbours(7, 3, 1, i)) for i in (0, 1, 3, 6)] == [
        [0, 1, 2],
        [0, 1, 2],
        [2, 3, 4],
        [4, 5, 6],
    ]
    # Length 9, dilation 2: sub-grids 0,2,4,6,8 and 1,3,5,7.
    assert sorted(axis_neighbours(9, 3, 2, 0)) == [0, 2, 4]
    assert sorted(axis_neighbours(9, 3, 2, 7)) == [3, 5, 7]
    assert sorted(axis_neighbours(9, 3, 2, 4)) == [2, 4, 6]
    # Windows of 4 with shift 2 on 8: [0, 2), [2, 6), [6, 8).
    assert axis_windows(8, 4, 2) == [0, 0, 1, 1, 1, 1, 2, 2]
    assert axis_windows(8, 4, 0) == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("case", sorted(NEIGHBOURHOOD_CASES))
def test_neighbourhood_mask_matches_oracle(case):
    _, _, hw, _, _, kernel, dilation = NEIGHBOURHOOD_CASES[case]
    mask = neighborhood.neighbourhood_mask(hw, kernel, dilation)
    assert torch.equal(mask, neighbourhood_oracle_mask(hw, kernel, dilation))
    assert (mask.sum(dim=1) == kernel * kernel).all()


@pytest.mark.parametrize("tiles", [None, 2, 3], ids=["one-tile", "tiles-2", "tiles-3"])
@pytest.mark.parametrize("case", sorted(NEIGHBOURHOOD_CASES))
def test_neighbourhood_torch_output_and_gradients(case, tiles, monkeypatch):
    b, heads, hw, c, cv, kernel, dilation = NEIGHBOURHOOD_CASES[case]
    if tiles:  # small tiles (padded at the map's edges), one row of tiles per band
        monkeypatch.setattr(neighborhood.pytorch, "TILE", tiles)
        monkeypatch.setattr(neighborhood.pytorch, "BAND_ELEMENTS", 1)
    impl = registry.create("neighborhood.torch", kernel=kernel, dilation=dilation)
    mask = neighbourhood_oracle_mask(hw, kernel, dilation)
    check(impl, hw, mask, b, heads, c, cv, torch.float64, grad=True)


def test_neighbourhood_torch_float32_and_bfloat16():
    b, heads, hw, c, cv, kernel, dilation = NEIGHBOURHOOD_CASES["rect-6x9-k3-d2"]
    impl = registry.create("neighborhood.torch", kernel=kernel, dilation=dilation)
    mask = neighbourhood_oracle_mask(hw, kernel, dilation)
    check(impl, hw, mask, b, heads, c, cv, torch.float32, grad=True)
    check(impl, hw, mask, b, heads, c, cv, torch.bfloat16, grad=False)


@needs_flex
@pytest.mark.parametrize("case", FLEX_CASES)
def test_neighbourhood_flex_forward(case):
    b, heads, hw, c, cv, kernel, dilation = NEIGHBOURHOOD_CASES[case]
    impl = registry.create("neighborhood.flex", kernel=kernel, dilation=dilation)
    mask = neighbourhood_oracle_mask(hw, kernel, dilation)
    check(impl, hw, mask, b, heads, c, cv, torch.float32, grad=False)


@needs_flex
def test_flex_block_mask_visits_every_attended_block():
    # A 12x40 map with 128-token blocks: query blocks span row ends, key spans cross blocks.
    hw, kernel, dilation = (12, 40), 5, 2
    block_mask = neighborhood.flex_block_mask(hw, kernel, dilation, "cpu", backward=False)
    dense = block_mask.to_dense()[0, 0].bool()  # (q blocks, kv blocks)
    mask = neighbourhood_oracle_mask(hw, kernel, dilation)
    n, size = hw[0] * hw[1], neighborhood.FLEX_BLOCK
    blocks = -(-n // size)
    padded = torch.zeros(blocks * size, blocks * size, dtype=torch.bool)
    padded[:n, :n] = mask
    needed = padded.reshape(blocks, size, blocks, size).any(dim=3).any(dim=1)
    assert not (needed & ~dense).any(), "an attended key block is not visited"


@needs_flex
def test_flex_failed_call_does_not_poison_later_calls():
    b, heads, hw, c, cv, kernel, dilation = NEIGHBOURHOOD_CASES[FLEX_CASES[0]]
    impl = registry.create("neighborhood.flex", kernel=kernel, dilation=dilation)
    q, k, v = make_inputs(b, heads, hw, c, cv, torch.float32)
    impl(q, k, v, hw, hw)
    (key,) = [key for key in neighborhood._FLEX_PLANS if key[0] == tuple(q.shape)]
    mask, _ = neighborhood._FLEX_PLANS[key]

    def broken(*args, **kwargs):
        raise RuntimeError("compilation failed")

    neighborhood._FLEX_PLANS[key] = mask, broken
    with pytest.raises(RuntimeError, match="compilation failed"):
        impl(q, k, v, hw, hw)
    assert key not in neighborhood._FLEX_PLANS
    oracle = masked_oracle(q, k, v, neighbourhood_oracle_mask(hw, kernel, dilation))
    torch.testing.assert_close(impl(q, k, v, hw, hw).double(), oracle, rtol=1e-4, atol=1e-5)


@needs_natten
@pytest.mark.parametrize("case", sorted(NEIGHBOURHOOD_CASES))
def test_neighbourhood_natten_forward(case):
    b, heads, hw, c, cv, kernel, dilation = NEIGHBOURHOOD_CASES[case]
    impl = registry.create("neighborhood.natten", kernel=kernel, dilation=dilation)
    if kernel == 1:  # na2d refuses kernel_size=1
        reasons = impl.unsupported_reasons(AttentionSpec.square(8, 8))
        assert "kernel=1 (NATTEN's na2d needs kernel >= 2; allowed: an odd kernel >= 3)" in reasons
        return
    # Without libnatten (always so on a CPU) NATTEN needs C == Cv, a power of two >= 8.
    spec = AttentionSpec(b, heads, hw[0] * hw[1], hw[0] * hw[1], c, cv, q_hw=hw, kv_hw=hw)
    assert any(
        "needs C == Cv, a power of two in [8, 512]" in r for r in impl.unsupported_reasons(spec)
    )
    c = cv = 8
    mask = neighbourhood_oracle_mask(hw, kernel, dilation)
    check(impl, hw, mask, b, heads, c, cv, torch.float32, grad=False)


@pytest.mark.parametrize(
    "name",
    [
        "neighborhood.torch",
        pytest.param("neighborhood.flex", marks=needs_flex),
        pytest.param("neighborhood.natten", marks=needs_natten),
    ],
)
def test_kernel_as_large_as_the_map_is_exact_attention(name):
    hw = (7, 7)
    impl = registry.create(name, kernel=7)
    spec = AttentionSpec.square(7, 4)
    assert impl.exact_params(spec) == {"kernel": 7, "dilation": 1}
    dtype = torch.float64 if torch.float64 in impl.DTYPES else torch.float32
    c, cv = (8, 8) if name.endswith("natten") else (4, 3)
    grad = impl.supports(dataclasses.replace(spec, dtype=dtype, requires_grad=True))
    check(impl, hw, torch.ones(49, 49, dtype=torch.bool), 2, 2, c, cv, dtype, grad=grad)


# (batch, heads, map, C, Cv, window, shift): shift 0 and w/2, square and rectangular.
WINDOW_CASES = {
    "square-8-w4": (2, 2, (8, 8), 4, 4, 4, 0),
    "square-8-w4-s2": (2, 2, (8, 8), 4, 4, 4, 2),
    "rect-8x12-w4-s2": (1, 2, (8, 12), 8, 5, 4, 2),
    "rect-6x9-w3-s1": (2, 1, (6, 9), 4, 6, 3, 1),
    "rect-6x4-w2-s1": (1, 1, (6, 4), 3, 2, 2, 1),
    "square-6-w6-s3": (1, 1, (6, 6), 4, 4, 6, 3),
}


@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_window_output_and_gradients(case):
    b, heads, hw, c, cv, window, shift = WINDOW_CASES[case]
    impl = registry.create("window.torch", window=window, shift=shift)
    mask = window_oracle_mask(hw, window, shift)
    check(impl, hw, mask, b, heads, c, cv, torch.float64, grad=True)


def test_window_float32():
    b, heads, hw, c, cv, window, shift = WINDOW_CASES["rect-8x12-w4-s2"]
    impl = registry.create("window.torch", window=window, shift=shift)
    check(impl, hw, window_oracle_mask(hw, window, shift), b, heads, c, cv, torch.float32, True)


def test_window_as_large_as_the_map_is_exact_attention():
    impl = registry.create("window.torch", window=6)
    assert impl.exact_params(AttentionSpec.square(6, 4)) == {"window": 6, "shift": 0}
    check(impl, (6, 6), torch.ones(36, 36, dtype=torch.bool), 2, 2, 4, 3, torch.float64, True)


@pytest.mark.parametrize(
    "name, params, hw",
    [
        ("neighborhood.torch", {"kernel": 3, "dilation": 2}, (6, 9)),
        ("window.torch", {"window": 3, "shift": 1}, (6, 9)),
    ],
)
def test_weights_are_the_masked_softmax(name, params, hw):
    impl = registry.create(name, **params)
    q, k, v = make_inputs(1, 2, hw, 4, 3)
    if name.startswith("window"):
        mask = window_oracle_mask(hw, params["window"], params["shift"])
    else:
        mask = neighbourhood_oracle_mask(hw, params["kernel"], params["dilation"])
    weights = impl.weights(q, k, hw, hw)
    assert torch.equal(weights > 0, mask.expand_as(weights))
    torch.testing.assert_close(weights @ v, masked_oracle(q, k, v, mask))


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("neighborhood.torch", {"kernel": 4}, "kernel=4 is not allowed (allowed: an odd integer"),
        ("neighborhood.torch", {"kernel": 0}, "kernel=0 is not allowed (allowed: an integer >= 1"),
        ("neighborhood.flex", {"dilation": 0}, "dilation=0 is not allowed (allowed: an integer"),
        ("window.torch", {"window": 0}, "window=0 is not allowed (allowed: an integer >= 1"),
        ("window.torch", {"shift": -1}, "shift=-1 is not allowed (allowed: an integer >= 0"),
        ("window.torch", {"window": 8, "shift": 8},
         "shift=8 is not allowed (allowed: 0 <= shift < window=8)"),
    ],
)  # fmt: skip
def test_bad_parameters_name_value_and_range(name, params, message):
    with pytest.raises(ValueError) as err:
        registry.create(name, **params)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "name, params, q_hw, kv_hw, message",
    [
        ("neighborhood.torch", {"kernel": 5, "dilation": 2}, (12, 9), (12, 9),
         "kernel*dilation = 5*2 = 10 exceeds the map width 9 (allowed: kernel*dilation <= 9"),
        ("neighborhood.natten", {"kernel": 9}, (8, 8), (8, 8),
         "kernel*dilation = 9*1 = 9 exceeds the map height 8"),
        ("neighborhood.torch", {"kernel": 3}, (8, 8), (4, 4), "q map 8x8 differs from kv map 4x4"),
        ("window.torch", {"window": 4}, (8, 6), (8, 6),
         "map width 6 is not a multiple of window=4 (allowed: map sides that are multiples of 4)"),
        ("window.torch", {"window": 4}, (8, 8), (4, 4), "q map 8x8 differs from kv map 4x4"),
    ],
)  # fmt: skip
def test_maps_that_do_not_fit_are_named(name, params, q_hw, kv_hw, message):
    impl = registry.create(name, **params)
    nq, nk = q_hw[0] * q_hw[1], kv_hw[0] * kv_hw[1]
    q, k = torch.zeros(1, 1, nq, 4), torch.zeros(1, 1, nk, 4)
    with pytest.raises(UnsupportedError) as err:
        impl(q, k, k, q_hw=q_hw, kv_hw=kv_hw)
    assert message in str(err.value)


def test_forward_only_backends_say_why():
    spec = AttentionSpec.square(8, 4, requires_grad=True)
    flex = registry.create("neighborhood.flex", kernel=3).unsupported_reasons(spec)
    assert any("FlexAttention's compiled CPU kernel is forward-only" in r for r in flex)
    natten = registry.create("neighborhood.natten", kernel=3).unsupported_reasons(spec)
    assert any("backward" in r or "not installed" in r for r in natten)
    assert registry.create("neighborhood.torch", kernel=3).supports(spec)
    assert registry.create("window.torch", window=4).supports(spec)


def test_natten_on_cuda_without_libnatten_says_so():
    cls = registry.get("neighborhood.natten")
    if cls.missing_dependencies():
        assert any('pip install "attnbench[natten]"' in r for r in cls.availability("cuda"))
    elif not cls.has_libnatten():
        assert any("libnatten" in r for r in cls.availability("cuda"))


def test_neighbourhood_torch_memory_is_bounded_by_bands():
    impl = registry.create("neighborhood.torch", kernel=13)
    small, large = AttentionSpec.square(256, 64), AttentionSpec.square(512, 64)
    assert neighborhood.band_tile_rows((512, 512), 13, 1, 64, 64) < 512 // neighborhood.TILE
    band = neighborhood.BAND_ELEMENTS * 4
    for spec in (small, large):
        # A band and a few copies of the output and inputs, never anything N x N.
        assert impl.memory_bytes(spec) <= band + spec.input_bytes + 3 * spec.output_bytes
        assert impl.memory_bytes(spec, backward=True) <= 2 * band + 8 * spec.input_bytes
    naive = registry.create("full.naive").memory_bytes(large)
    assert impl.memory_bytes(large, backward=True) < naive / 100


def test_flops_count_the_attended_pairs():
    spec = AttentionSpec(2, 3, 64, 64, 8, 4, q_hw=(8, 8), kv_hw=(8, 8))
    per_pair = 2 * (8 + 4) * 2 * 3
    assert registry.create("neighborhood.torch", kernel=3).flops(spec) == 64 * 9 * per_pair
    for shift in (0, 2):
        impl = registry.create("window.torch", window=4, shift=shift)
        pairs = int(window_oracle_mask((8, 8), 4, shift).sum())
        assert impl.flops(spec) == pairs * per_pair
        assert impl.flops(spec, backward=True) == 3 * pairs * per_pair


def test_labels():
    assert registry.create("neighborhood.torch").label == "neighborhood.torch(kernel=7)"
    assert (
        registry.create("neighborhood.flex", kernel=5, dilation=2).label
        == "neighborhood.flex(kernel=5,dilation=2)"
    )
    assert registry.create("window.torch").label == "window.torch(window=8)"
    assert registry.create("window.torch", shift=4).label == "window.torch(window=8,shift=4)"
