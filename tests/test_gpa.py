"""Grid Partitioned Attention: every backend against the reference, exact limits, errors."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnbench import registry
from attnbench.impls.gpa import cpp, select_keys
from attnbench.impls.gpa import flex as flex_module
from attnbench.impls.gpa import pytorch as vectorised
from attnbench.registry import UnsupportedError
from attnbench.spec import AttentionSpec

CPP_REASONS = registry.get("gpa.cpp").availability("cpu")  # builds the kernel where it can
needs_cpp = pytest.mark.skipif(bool(CPP_REASONS), reason="; ".join(CPP_REASONS))
CPP = pytest.param("gpa.cpp", marks=needs_cpp)
FAST_BACKENDS = ["gpa.torch", "gpa.flex", CPP]
GRAD_BACKENDS = ["gpa.torch", CPP]


def inputs(b, h, q_hw, kv_hw, c, cv, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    nq, nk = q_hw[0] * q_hw[1], kv_hw[0] * kv_hw[1]
    q = 2 * torch.randn(b, h, nq, c, generator=g, dtype=dtype)
    k = 2 * torch.randn(b, h, nk, c, generator=g, dtype=dtype)
    v = torch.randn(b, h, nk, cv, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def run_reference(params, q, k, v, q_hw, kv_hw):
    ref = registry.create("gpa.reference", **params)
    return ref.run(q, k, v, AttentionSpec.from_inputs(q, k, v, q_hw, kv_hw))


@st.composite
def configs(draw, max_cells=3):
    d = draw(st.integers(1, 3))
    s = draw(st.integers(1, 2))
    q_hw = (draw(st.integers(1, max_cells)) * s * d, draw(st.integers(1, max_cells)) * s * d)
    kv_low = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    kv_hw = (kv_low[0] * d, kv_low[1] * d)
    return {
        "b": draw(st.integers(1, 2)),
        "h": draw(st.integers(1, 2)),
        "q_hw": q_hw,
        "kv_hw": kv_hw,
        "c": draw(st.integers(1, 8)),
        "cv": draw(st.integers(1, 8)),
        "seed": draw(st.integers(0, 2**16)),
        "params": {
            "downsample": d,
            "cell": s,
            "topk": draw(st.integers(1, kv_low[0] * kv_low[1])),
            "affinity": draw(st.sampled_from(["dot", "euclid"])),
        },
    }


def check_equals_reference(name, cfg):
    q, k, v = inputs(
        cfg["b"], cfg["h"], cfg["q_hw"], cfg["kv_hw"], cfg["c"], cfg["cv"], seed=cfg["seed"]
    )
    expected, expected_keys = run_reference(cfg["params"], q, k, v, cfg["q_hw"], cfg["kv_hw"])
    impl = registry.create(name, **cfg["params"])
    out = impl(q, k, v, q_hw=cfg["q_hw"], kv_hw=cfg["kv_hw"])
    geom = impl.geometry(AttentionSpec.from_inputs(q, k, v, cfg["q_hw"], cfg["kv_hw"]))
    keys = impl.select_keys(q, k, geom, impl.scale_for(cfg["c"]))
    assert torch.equal(keys, expected_keys), f"{impl.label}: selected keys differ"
    torch.testing.assert_close(
        out, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"{impl.label}: {m}"
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_torch_backend_equals_reference(cfg):
    check_equals_reference("gpa.torch", cfg)


@needs_cpp
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_cpp_backend_equals_reference(cfg):
    check_equals_reference("gpa.cpp", cfg)


@needs_cpp
@pytest.mark.parametrize("topk", [1, 3, 16, 17, 40, 256, 257, 290])
@pytest.mark.parametrize("constant_keys", [False, True])
def test_cpp_top_keys_beyond_one_row_of_maxima(topk, constant_keys):
    # 300 low-res keys: the kernel's top-κ folds them into 256 column maxima (then 16), bounds
    # the κ-th value by them (κ <= 16, κ <= 256) or takes every key (κ > 256). Constant keys
    # tie everywhere: the lowest indices must win.
    q, k, _ = inputs(2, 1, (4, 4), (20, 15), 3, 1, seed=8)
    if constant_keys:
        k = torch.ones_like(k)
    geom = registry.create("gpa.cpp", downsample=1, cell=2, topk=topk).geometry(
        AttentionSpec.from_inputs(q, k, k, (4, 4), (20, 15))
    )
    expected = select_keys(q, k, geom)
    assert torch.equal(cpp.select_keys(q, k, geom), expected)
    if constant_keys:
        assert torch.equal(expected, torch.arange(topk).expand_as(expected))


def low_res_relevance(q, k, hw, d, s, scale, affinity):
    """Phase 1 in fp64, computed independently: relevance [G, m, nk'] of every low-res key."""
    (h, w), g, c = hw, q.shape[0] * q.shape[1], q.shape[-1]

    def low(x):
        grid = x.double().reshape(g, h, w, c).permute(0, 3, 1, 2)
        return torch.nn.functional.avg_pool2d(grid, d).flatten(2).transpose(1, 2)

    q_low, k_low = low(q), low(k)
    if affinity == "dot":
        scores = scale * q_low @ k_low.transpose(1, 2)
    else:
        scores = -scale * torch.cdist(q_low, k_low) ** 2
    attn = scores.softmax(-1).reshape(g, h // (d * s), s, w // (d * s), s, -1)
    return attn.sum(dim=(2, 4)).reshape(g, -1, attn.shape[-1])


@needs_cpp
@pytest.mark.parametrize("affinity", ["dot", "euclid"])
@pytest.mark.parametrize("spread", [1.0, 12.0])
def test_cpp_float32_keeps_the_most_relevant_keys(affinity, spread):
    # fp32 runs the kernel's own exp (a polynomial); spread 12 puts full-resolution scores far
    # apart (13% of euclid's low-res scores are below the row maximum - 87, where e^x is
    # subnormal). Near-ties may go either way in fp32, so the kept keys are checked by
    # property: each is within rounding of the best key left out. Phase 2 is checked on the
    # kernel's keys against gpa.torch's phase 2 in fp64.
    b, h, hw, c, d, s, topk = 2, 2, (16, 24), 8, 2, 2, 5
    q, k, v = inputs(b, h, hw, hw, c, 6, dtype=torch.float32, seed=7)
    q = spread * q
    impl = registry.create("gpa.cpp", downsample=d, cell=s, topk=topk, affinity=affinity)
    geom = impl.geometry(AttentionSpec.from_inputs(q, k, v, hw, hw))
    keys, kept = cpp.select_keys(q, k, geom, affinity, c**-0.5, with_relevance=True)
    relevance = low_res_relevance(q, k, hw, d, s, c**-0.5, affinity)
    keys = keys.reshape(b * h, geom.m, topk)
    assert torch.all(keys.diff(dim=-1) > 0), "kept keys are listed in ascending order"
    torch.testing.assert_close(
        kept.reshape(b * h, geom.m, topk).double(), relevance.gather(-1, keys), rtol=1e-4, atol=1e-5
    )
    left_out = relevance.scatter(-1, keys, float("-inf")).amax(-1)
    assert torch.all(relevance.gather(-1, keys).amin(-1) >= left_out - 1e-4)
    out = impl(q, k, v, q_hw=hw, kv_hw=hw)
    expected = vectorised.grid_attention(
        q.double(), k.double(), v.double(), keys.reshape(b, h, geom.m, topk), geom, affinity
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


# FlexAttention compiles once per shape (seconds each), so its configurations vary in data,
# κ and scale over three fixed shapes: square, rectangular with another kv map, and d = 1.
FLEX_SHAPES = [
    dict(b=1, h=2, q_hw=(8, 8), kv_hw=(8, 8), c=8, cv=8, downsample=2, cell=2),
    dict(b=2, h=1, q_hw=(8, 16), kv_hw=(12, 8), c=4, cv=6, downsample=2, cell=2),
    dict(b=1, h=1, q_hw=(6, 3), kv_hw=(4, 5), c=3, cv=2, downsample=1, cell=3),
]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from(FLEX_SHAPES), data=st.data())
def test_flex_backend_equals_reference(shape, data):
    d = shape["downsample"]
    nk_low = (shape["kv_hw"][0] // d) * (shape["kv_hw"][1] // d)
    params = {
        "downsample": d,
        "cell": shape["cell"],
        "topk": data.draw(st.integers(1, nk_low), label="topk"),
        "scale": data.draw(st.sampled_from([None, 0.3]), label="scale"),
    }
    seed = data.draw(st.integers(0, 2**16), label="seed")
    args = [shape[key] for key in ("b", "h", "q_hw", "kv_hw", "c", "cv")]
    q, k, v = inputs(*args, dtype=torch.float32, seed=seed)
    expected, _ = run_reference(
        params, q.double(), k.double(), v.double(), shape["q_hw"], shape["kv_hw"]
    )
    impl = registry.create("gpa.flex", **params)
    out = impl(q, k, v, q_hw=shape["q_hw"], kv_hw=shape["kv_hw"])
    torch.testing.assert_close(
        out.double(), expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{impl.label}: {m}"
    )


def test_flex_euclid_equals_reference():
    shape = FLEX_SHAPES[0]
    params = {"downsample": 2, "cell": 2, "topk": 5, "affinity": "euclid"}
    q, k, v = inputs(1, 2, (8, 8), (8, 8), 8, 8, dtype=torch.float32, seed=3)
    expected, _ = run_reference(
        params, q.double(), k.double(), v.double(), shape["q_hw"], shape["kv_hw"]
    )
    out = registry.create("gpa.flex", **params)(q, k, v, q_hw=(8, 8), kv_hw=(8, 8))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def exact_attention(q, k, v, scale, affinity="dot"):
    q, k, v = q.double(), k.double(), v.double()
    if affinity == "dot":
        scores = scale * q @ k.transpose(-1, -2)
    else:
        scores = -scale * torch.cdist(q, k) ** 2
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("name", ["gpa.reference", *FAST_BACKENDS])
@pytest.mark.parametrize("affinity", ["dot", "euclid"])
def test_all_low_res_keys_is_exact_attention(name, affinity):
    # 8x16 queries, 12x8 keys, d = 2: 6 x 4 = 24 low-res keys, all kept.
    q, k, v = inputs(2, 2, (8, 16), (12, 8), 8, 8, dtype=torch.float32, seed=1)
    impl = registry.create(name, downsample=2, cell=2, topk=24, affinity=affinity)
    out = impl(q, k, v, q_hw=(8, 16), kv_hw=(12, 8))
    expected = exact_attention(q, k, v, 8**-0.5, affinity)
    err = ((out.double() - expected).norm() / expected.norm()).item()
    assert err < 1e-5, f"{impl.label}: relative error {err:.2e} against exact attention"


@pytest.mark.parametrize("name", ["gpa.reference", *FAST_BACKENDS])
def test_d1_s1_is_per_query_topk_attention(name):
    topk = 5
    q, k, v = inputs(1, 2, (4, 6), (5, 3), 4, 3, dtype=torch.float32, seed=2)
    impl = registry.create(name, downsample=1, cell=1, topk=topk)
    out = impl(q, k, v, q_hw=(4, 6), kv_hw=(5, 3))
    # Independent oracle: every query keeps its own κ highest-scoring keys, then exact softmax.
    scores = 0.5 * q.double() @ k.double().transpose(-1, -2)
    kth = scores.topk(topk, dim=-1).values[..., -1:]
    masked = scores.masked_fill(scores < kth, float("-inf"))
    expected = masked.softmax(-1) @ v.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gpa.reference", *FAST_BACKENDS])
def test_ties_go_to_the_lower_index(name):
    # Constant keys: every low-res key is equally relevant, so every cell keeps keys 0..κ-1,
    # and the output is the mean of the values of those blocks.
    q = torch.randn(1, 1, 64, 4)
    k = torch.ones(1, 1, 64, 4)
    v = torch.arange(64.0).reshape(1, 1, 64, 1).expand(1, 1, 64, 2).contiguous()
    out = registry.create(name, downsample=2, cell=2, topk=3)(q, k, v, q_hw=(8, 8), kv_hw=(8, 8))
    # Low-res keys 0, 1, 2 are the 2x2 blocks at columns 0-5 of rows 0-1.
    tokens = [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13]
    assert torch.allclose(out, torch.full_like(out, sum(tokens) / 12)), out[0, 0, :3]


def test_select_keys_for_inspection():
    q, k, _ = inputs(2, 3, (16, 16), (16, 16), 8, 8, seed=4)
    spec = AttentionSpec(2, 3, 256, 256, 8, 8, q_hw=(16, 16), kv_hw=(16, 16), dtype=torch.float64)
    geom = registry.create("gpa.torch", downsample=2, cell=2, topk=4).geometry(spec)
    keys, relevance = select_keys(q, k, geom, with_relevance=True)
    assert keys.shape == relevance.shape == (2, 3, geom.m, 4)
    assert torch.all(keys.diff(dim=-1) > 0), "kept keys are listed in ascending order"
    # Every kept key is at least as relevant as every key not kept.
    cells = low_res_relevance(q, k, (16, 16), 2, 2, 8**-0.5, "dot").reshape(2, 3, 16, 64)
    torch.testing.assert_close(cells.gather(-1, keys), relevance)
    dropped = cells.scatter(-1, keys, float("-inf")).amax(-1)
    assert torch.all(relevance.amin(-1) >= dropped)


@pytest.mark.parametrize("name", GRAD_BACKENDS)
@pytest.mark.parametrize("one_row_bands", [False, True])
@pytest.mark.parametrize("affinity", ["dot", "euclid"])
def test_backend_gradcheck(name, affinity, one_row_bands, monkeypatch):
    if one_row_bands:  # several phase-2 bands, each adding its share of the k, v gradients
        monkeypatch.setattr(vectorised, "PHASE2_BLOCK_BYTES", 1)
    q, k, v = inputs(1, 2, (4, 4), (4, 6), 3, 2, seed=5, grad=True)
    impl = registry.create(name, downsample=2, cell=1, topk=3, affinity=affinity)
    assert torch.autograd.gradcheck(
        lambda q, k, v: impl(q, k, v, q_hw=(4, 4), kv_hw=(4, 6)), (q, k, v)
    )


@pytest.mark.parametrize("backend_name", GRAD_BACKENDS)
@pytest.mark.parametrize("one_row_bands", [False, True])
@pytest.mark.parametrize("affinity", ["dot", "euclid"])
def test_backend_gradients_equal_reference(backend_name, affinity, one_row_bands, monkeypatch):
    if one_row_bands:
        monkeypatch.setattr(vectorised, "PHASE2_BLOCK_BYTES", 1)
    params = {"downsample": 2, "cell": 2, "topk": 4, "affinity": affinity}
    grads = []
    for name in ("gpa.reference", backend_name):
        q, k, v = inputs(2, 1, (8, 8), (6, 10), 5, 3, seed=6, grad=True)
        out = registry.create(name, **params)(q, k, v, q_hw=(8, 8), kv_hw=(6, 10))
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
        grads.append([t.grad for t in (q, k, v)])
    for which, ref, got in zip("qkv", *grads):
        torch.testing.assert_close(
            got, ref, rtol=1e-10, atol=1e-12, msg=lambda m, w=which: f"d{w}: {m}"
        )


@pytest.mark.parametrize(
    "params, q_hw, kv_hw, expected",
    [
        (
            {"downsample": 4, "cell": 2},
            (30, 32),
            (32, 32),
            "q map height 30 is not divisible by downsample d=4",
        ),
        (
            {"downsample": 2, "cell": 2},
            (14, 16),
            (16, 16),
            "q map height 14 is not divisible by d*s = 2*2 = 4",
        ),
        (
            {"downsample": 4, "cell": 2},
            (32, 32),
            (32, 30),
            "kv map width 30 is not divisible by downsample d=4",
        ),
        (
            {"downsample": 4, "cell": 4},
            (8, 8),
            (8, 8),
            "cell=4 is larger than the low-res query grid 2x2",
        ),
        (
            {"downsample": 4, "topk": 12},
            (8, 8),
            (8, 8),
            "topk=12 exceeds the 4 low-res keys (kv map 8x8 / d=4 -> 2x2",
        ),
        (
            {"phase1_res": 48},
            (64, 64),
            (64, 64),
            "phase1_res=48 does not divide the query map's longer side 64",
        ),
        ({}, (32, 32), (32, 32), "phase1_res=64 is larger than the query map's longer side 32"),
    ],
)
@pytest.mark.parametrize("name", ["gpa.reference", *FAST_BACKENDS])
def test_impossible_sizes_name_the_size_and_factor(name, params, q_hw, kv_hw, expected):
    q, k, v = inputs(1, 1, q_hw, kv_hw, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError) as err:
        registry.create(name, **params)(q, k, v, q_hw=q_hw, kv_hw=kv_hw)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "params, expected",
    [
        (
            {"downsample": 0},
            "parameter downsample=0 is not allowed (allowed: an integer >= 1 or None)",
        ),
        ({"topk": 0}, "parameter topk=0 is not allowed"),
        ({"affinity": "cosine"}, "allowed: one of 'dot', 'euclid'"),
        ({"downsample": 2, "phase1_res": 32}, "give downsample or phase1_res, not both"),
    ],
)
def test_bad_parameters(params, expected):
    with pytest.raises(ValueError) as err:
        registry.create("gpa.torch", **params)
    assert expected in str(err.value)


@pytest.mark.parametrize("name", ["gpa.reference", *FAST_BACKENDS])
def test_small_maps_work(name):
    # The released module fails below 128 px; any size the algorithm allows must work here.
    for hw, params in [
        ((2, 2), {"downsample": 1, "cell": 1, "topk": 2}),
        ((8, 8), {"phase1_res": 4}),
    ]:
        q, k, v = inputs(1, 1, hw, hw, 4, 4, dtype=torch.float32)
        out = registry.create(name, **params)(q, k, v, q_hw=hw, kv_hw=hw)
        assert out.shape == (1, 1, hw[0] * hw[1], 4) and torch.isfinite(out).all()


def test_labels_and_resolution():
    impl = registry.create("gpa.torch")
    assert impl.label == "gpa.torch(res=64,s=2,k=12)"
    assert impl.label_for(AttentionSpec.square(256, 160)) == "gpa.torch(d=4,s=2,k=12)"
    assert impl.geometry(AttentionSpec.square(256, 160)).m == 32 * 32
    euclid = registry.create("gpa.flex", downsample=2, topk=4, affinity="euclid")
    assert euclid.label == "gpa.flex(d=2,s=2,k=4,euclid)"


def test_pivot_flops():
    # DESIGN.md: 256 x 256, C = Cv = 160, pivot: 13.4 GFLOP against 2,749 for exact attention.
    spec = AttentionSpec.square(256, 160)
    gpa = registry.create("gpa.torch")
    phase1, phase2 = gpa.phase_flops(spec)
    assert phase1 == 2 * 4096 * 4096 * 160
    assert phase2 == 2 * 65536 * 12 * 16 * 320
    assert round(gpa.flops(spec) / 1e8) == 134
    assert round(spec.exact_flops() / gpa.flops(spec)) == 205
    assert gpa.flops(spec, backward=True) == phase1 + 3 * phase2


def test_flex_limits_are_reasons():
    flex = registry.create("gpa.flex", downsample=2, cell=2, topk=4)
    grad_cpu = AttentionSpec.square(16, 8, requires_grad=True)
    assert any("forward-only" in r for r in flex.unsupported_reasons(grad_cpu))
    with pytest.raises(
        UnsupportedError, match="FlexAttention's compiled CPU kernel is forward-only"
    ):
        q, k, v = inputs(1, 1, (16, 16), (16, 16), 8, 8, dtype=torch.float32, grad=True)
        flex(q, k, v, q_hw=(16, 16), kv_hw=(16, 16))
    cuda = AttentionSpec.square(16, 8, device="cuda")
    reasons = flex.unsupported_reasons(cuda)
    assert "key block size 4 on device=cuda" in " ".join(reasons)
    assert registry.create("gpa.flex", downsample=4, cell=1, topk=4).unsupported_reasons(cuda) == []


@pytest.mark.parametrize("q_block", [16, 64, 256, 1024])
@pytest.mark.parametrize("kv_block", [16, 64, 256])
def test_flex_cuda_tiles_divide_their_blocks(q_block, kv_block):
    t = flex_module.cuda_tiles(q_block, kv_block)
    for tile in ("BLOCK_M", "BLOCK_M1", "BLOCK_M2"):
        assert q_block % t[tile] == 0 and t[tile] >= 16
    for tile in ("BLOCK_N", "BLOCK_N1", "BLOCK_N2"):
        assert kv_block % t[tile] == 0 and t[tile] >= 16
    assert t["BLOCK_N1"] % t["BLOCK_M1"] == 0 and t["BLOCK_M2"] % t["BLOCK_N2"] == 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
@pytest.mark.parametrize("name", ["gpa.torch", "gpa.flex"])
@pytest.mark.parametrize(
    "params, q_hw, kv_hw",
    [
        ({"downsample": 4, "cell": 2, "topk": 5}, (32, 32), (32, 32)),  # the pivot's blocks
        ({"downsample": 4, "cell": 1, "topk": 3}, (16, 32), (24, 16)),  # cross, rectangular
    ],
)
def test_cuda_backends_and_their_gradients_equal_reference(name, params, q_hw, kv_hw):
    q, k, v = inputs(2, 2, q_hw, kv_hw, 24, 16, grad=True)
    ref, _ = run_reference(params, q, k, v, q_hw, kv_hw)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    leaves = [t.detach().float().cuda().requires_grad_() for t in (q, k, v)]
    out = registry.create(name, **params)(*leaves, q_hw=q_hw, kv_hw=kv_hw)
    grads = torch.autograd.grad(out, leaves, grad.float().cuda())
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


@needs_cpp
def test_cpp_limits_are_reasons():
    impl = registry.create("gpa.cpp", downsample=2, cell=2, topk=4)
    half = AttentionSpec.square(16, 8, dtype=torch.float16)
    assert "dtype=float16 (supported: float32, float64)" in impl.unsupported_reasons(half)
    cuda = AttentionSpec.square(16, 8, device="cuda")
    assert "device=cuda (supported: cpu)" in impl.unsupported_reasons(cuda)


def test_cpp_without_a_compiler_is_unavailable(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    reasons = registry.get("gpa.cpp").availability("cpu")
    assert "no C++ compiler: 'no-such-compiler' is not on PATH (set CXX)" in reasons


@needs_cpp
def test_cpp_exp_keeps_subnormal_relevances_apart():
    # Low-res scores 0, -200, -100, -95 (one query, one channel): e^-95 and e^-100 are
    # subnormal floats, e^-200 is 0. Keeping 2 keys must take 0 and 3, as a float32 softmax
    # orders them, not the lower index among keys rounded to one value.
    q_cells = torch.ones(1, 1, 1)
    k_low = torch.tensor([[[0.0], [-200.0], [-100.0], [-95.0]]])
    keys, kept = cpp.kernel().select_keys(q_cells, k_low, None, 1, 2, True, cpp.PHASE1_BAND_SCORES)
    assert keys.tolist() == [[[0, 3]]]
    expected = torch.softmax(k_low[0, :, 0], 0)[[0, 3]]
    torch.testing.assert_close(kept[0, 0], expected, rtol=1e-6, atol=0)


@needs_cpp
def test_cpp_phase1_bands(monkeypatch):
    # One cell per phase-1 matmul: the keys are those of a single band.
    q, k, _ = inputs(2, 1, (16, 12), (8, 12), 4, 1, seed=9)
    geom = registry.create("gpa.cpp", downsample=2, cell=2, topk=5).geometry(
        AttentionSpec.from_inputs(q, k, k, (16, 12), (8, 12))
    )
    whole = cpp.select_keys(q, k, geom)
    monkeypatch.setattr(cpp, "PHASE1_BAND_SCORES", 1)
    assert torch.equal(cpp.select_keys(q, k, geom), whole)
    assert torch.equal(whole, select_keys(q, k, geom))


@needs_cpp
def test_cpp_nan_inputs_give_nan_outputs_not_a_crash():
    # A NaN query makes its cell's relevances NaN: phase 1 must still return valid keys, and
    # only that query's output is NaN. An infinite key poisons every cell's phase 1.
    q, k, v = inputs(1, 1, (8, 8), (8, 8), 4, 3, dtype=torch.float32, seed=10)
    impl = registry.create("gpa.cpp", downsample=2, cell=2, topk=3)
    q[0, 0, 0, 0] = float("nan")
    out = impl(q, k, v, q_hw=(8, 8), kv_hw=(8, 8))
    assert torch.isnan(out[0, 0, 0]).all() and torch.isfinite(out[0, 0, 1:]).all()
    q[0, 0, 0, 0] = 0.0
    k[0, 0, 5, 1] = float("inf")
    out = impl(q, k, v, q_hw=(8, 8), kv_hw=(8, 8))
    assert out.shape == (1, 1, 64, 3)


def test_cpp_build_failure_is_a_reason(monkeypatch):
    # availability() tries the build, so a build that cannot succeed is a reason before any
    # call; it is not tried again.
    calls = []

    def failing_build():
        calls.append(1)
        raise OSError("no Python.h")

    monkeypatch.setattr(cpp, "_build_error", None)
    monkeypatch.setattr(cpp, "_load", failing_build)
    monkeypatch.setattr(cpp, "compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(cpp, "ninja_dir", lambda: "/usr/bin")
    reasons = registry.get("gpa.cpp").availability("cpu")
    assert "the C++ kernel failed to build: no Python.h" in reasons
    with pytest.raises(RuntimeError, match="no Python.h"):
        cpp.kernel()
    assert registry.get("gpa.cpp").availability("cpu") == reasons
    assert len(calls) == 1, "a failed build is not tried again"


def kept_block_token(params, q, k, v, hw, head):
    """A key token of ``head`` whose low-res block (d = 2) some cells keep and others do not."""
    _, keys = run_reference(params, q.double(), k.double(), v.double(), hw, hw)
    keys = keys[0, head]  # (m, κ)
    counts = torch.bincount(keys.flatten(), minlength=(hw[0] // 2) * (hw[1] // 2))
    block = next(i for i, n in enumerate(counts.tolist()) if 0 < n < len(keys))
    kw = hw[1] // 2
    return (block // kw) * 2 * hw[1] + (block % kw) * 2  # the block's top-left token


@pytest.mark.parametrize("name", FAST_BACKENDS)
@pytest.mark.parametrize("affinity", ["dot", "euclid"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_propagate_as_in_the_reference(name, affinity, where, value):
    # One NaN or ±inf entry: the same outputs NaN (and ±inf) as gpa.reference's, the finite
    # ones equal. For k and v the entry is in a block that some cells keep and others do not.
    hw, params = (8, 8), {"downsample": 2, "cell": 2, "topk": 3, "affinity": affinity}
    q, k, v = inputs(1, 2, hw, hw, 4, 3, dtype=torch.float32, seed=10)
    token = 5 if where == "q" else kept_block_token(params, q, k, v, hw, head=1)
    {"q": q, "k": k, "v": v}[where][0, 1, token, 1] = value  # head 0 stays finite
    expected, _ = run_reference(params, q.double(), k.double(), v.double(), hw, hw)
    out = registry.create(name, **params)(q, k, v, q_hw=hw, kv_hw=hw)
    torch.testing.assert_close(
        out.double(), expected, rtol=1e-4, atol=1e-5, equal_nan=True, msg=lambda m: f"{name}: {m}"
    )


@pytest.mark.parametrize("name", FAST_BACKENDS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_an_infinite_key_kept_by_phase_2_scores_minus_inf_under_euclid(name, value):
    # Every low-res key kept: phase 2 sees the infinite key, which -|q - k|² scores -inf (weight
    # 0), where 2 q.k - |k|² would give ±inf - inf = NaN.
    hw, params = (8, 8), {"downsample": 2, "cell": 2, "topk": 16, "affinity": "euclid"}
    q, k, v = inputs(1, 1, hw, hw, 4, 3, dtype=torch.float32, seed=10)
    k[0, 0, 9, 1] = value
    expected, _ = run_reference(params, q.double(), k.double(), v.double(), hw, hw)
    assert torch.isfinite(expected).all()
    out = registry.create(name, **params)(q, k, v, q_hw=hw, kv_hw=hw)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def gradients(name, params, q, k, v, q_hw, kv_hw, threads=None):
    """(out, dq, dk, dv) of ``name`` on leaf copies of q, k, v, with a fixed output gradient."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        out = registry.create(name, **params)(q, k, v, q_hw=q_hw, kv_hw=kv_hw)
        grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))
    finally:
        torch.set_num_threads(before)


@needs_cpp
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), threads=st.sampled_from([1, 2, 3]))
def test_cpp_backward_equals_reference(cfg, threads):
    # Rectangular and cross-attention maps, batch and heads, both affinities, C != Cv; with 2 or
    # 3 threads the cells are split between workers whose key and value gradients meet in tiles.
    q, k, v = inputs(
        cfg["b"], cfg["h"], cfg["q_hw"], cfg["kv_hw"], cfg["c"], cfg["cv"], seed=cfg["seed"]
    )
    args = (cfg["params"], q, k, v, cfg["q_hw"], cfg["kv_hw"])
    expected = gradients("gpa.reference", *args)
    got = gradients("gpa.cpp", *args, threads=threads)
    for which, ref, out in zip(["out", "dq", "dk", "dv"], expected, got):
        torch.testing.assert_close(
            out, ref, rtol=1e-10, atol=1e-12, msg=lambda m, w=which: f"{w}: {m}"
        )


@needs_cpp
@pytest.mark.parametrize("affinity", ["dot", "euclid"])
def test_cpp_backward_with_every_key_kept_is_exact_attentions(affinity):
    # 8x16 queries, 12x8 keys, d = 2: all 24 low-res keys kept, so gradients are exact attention's.
    q, k, v = inputs(2, 2, (8, 16), (12, 8), 8, 5, seed=1)
    params = {"downsample": 2, "cell": 2, "topk": 24, "affinity": affinity}
    got = gradients("gpa.cpp", params, q, k, v, (8, 16), (12, 8), threads=2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = exact_attention(*leaves, 8**-0.5, affinity)
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    expected = torch.autograd.grad(out, leaves, grad)
    for which, ref, g in zip("qkv", expected, got[1:]):
        torch.testing.assert_close(
            g, ref, rtol=1e-9, atol=1e-11, msg=lambda m, w=which: f"d{w}: {m}"
        )


@needs_cpp
def test_cpp_backward_with_tied_relevances_equals_reference():
    # Constant keys: every low-res key ties, every cell keeps keys 0..κ-1 (the lower indices),
    # and the blocks of those keys get the gradients of all 16 cells.
    q = torch.randn(1, 2, 64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    k = torch.ones(1, 2, 64, 4, dtype=torch.float64)
    v = torch.randn(1, 2, 64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = {"downsample": 2, "cell": 1, "topk": 3}
    expected = gradients("gpa.reference", params, q, k, v, (8, 8), (8, 8))
    got = gradients("gpa.cpp", params, q, k, v, (8, 8), (8, 8), threads=2)
    assert got[2][0, 0, 16:].abs().max() == 0, "blocks no cell keeps get no key gradient"
    for which, ref, g in zip(["out", "dq", "dk", "dv"], expected, got):
        torch.testing.assert_close(
            g, ref, rtol=1e-10, atol=1e-12, msg=lambda m, w=which: f"{w}: {m}"
        )


@needs_cpp
@pytest.mark.parametrize("affinity", ["dot", "euclid"])
def test_cpp_backward_in_float32_and_the_same_on_every_run(affinity):
    q, k, v = inputs(2, 2, (16, 16), (16, 12), 8, 6, dtype=torch.float32, seed=7)
    params = {"downsample": 2, "cell": 2, "topk": 5, "affinity": affinity}
    expected = gradients(
        "gpa.reference", params, q.double(), k.double(), v.double(), (16, 16), (16, 12)
    )
    first = gradients("gpa.cpp", params, q, k, v, (16, 16), (16, 12), threads=2)
    again = gradients("gpa.cpp", params, q, k, v, (16, 16), (16, 12), threads=2)
    for which, ref, g, h in zip(["out", "dq", "dk", "dv"], expected, first, again):
        assert torch.equal(g, h), f"{which}: two runs on 2 threads differ"
        torch.testing.assert_close(
            g.double(), ref, rtol=1e-4, atol=1e-5, msg=lambda m, w=which: f"{w}: {m}"
        )


@needs_cpp
@pytest.mark.parametrize("affinity", ["dot", "euclid"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_cpp_backward_non_finite_inputs_as_in_the_reference(affinity, where, value):
    # One NaN or ±inf entry in head 1: the gradients are non-finite where gpa.reference's are,
    # NaN where its are, the finite ones equal, head 0's untouched. Under euclid the key
    # gradient is taken expanded, dS^T q_s - 2 scale k colsum(dS) (gpa.torch's too), where the
    # reference differentiates |q - k|²: a sum of infinities of one sign there can be one of
    # mixed signs here, so an infinite entry of the reference's may be NaN in dk.
    hw, params = (8, 8), {"downsample": 2, "cell": 2, "topk": 3, "affinity": affinity}
    q, k, v = inputs(1, 2, hw, hw, 4, 3, dtype=torch.float32, seed=10)
    token = 5 if where == "q" else kept_block_token(params, q, k, v, hw, head=1)
    {"q": q, "k": k, "v": v}[where][0, 1, token, 1] = value
    expected = gradients("gpa.reference", params, q.double(), k.double(), v.double(), hw, hw)
    got = gradients("gpa.cpp", params, q, k, v, hw, hw, threads=2)
    for which, ref, g in zip(["out", "dq", "dk", "dv"], expected, got):
        g = g.double()
        assert torch.isfinite(g[0, 0]).all(), f"{which}: head 0 has no non-finite input"
        finite = ref.isfinite()
        assert torch.equal(g.isfinite(), finite), f"{which}: non-finite in other places"
        assert g[ref.isnan()].isnan().all(), f"{which}: a NaN of the reference's is not NaN"
        infinite = ref.isinf()
        if affinity == "euclid" and which == "dk":
            infinite &= ~g.isnan()
        assert torch.equal(g[infinite], ref[infinite]), f"{which}: infinities differ"
        torch.testing.assert_close(g[finite], ref[finite], rtol=1e-4, atol=1e-5, msg=which)
