"""Nyströmformer (``nystrom.torch``) and Performer FAVOR+ (``performer.torch``).

Behaviour against exact attention and the papers' claims, parameters, labels, cost formulas,
cross-attention, half precision, and cross-checks against the PyPI packages
``nystrom-attention`` and ``performer-pytorch`` where their math is the same.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from attnbench import registry
from attnbench.impls.nystrom import (
    iterative_pinv,
    nystrom_attention,
    pool2d_grid,
    pool2d_means,
    segment_means,
)
from attnbench.impls.performer import draw_projection, positive_features
from attnbench.measure import cpu_peak_supported, peak_memory
from attnbench.registry import UnsupportedError
from attnbench.spec import AttentionSpec
from tests.conftest import DEVICES


def inputs(b, h, nq, nk, c, cv, dtype=torch.float64, seed=0, spread=2.0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = spread * torch.randn(b, h, nq, c, generator=g, dtype=dtype)
    k = spread * torch.randn(b, h, nk, c, generator=g, dtype=dtype)
    v = torch.randn(b, h, nk, cv, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def exact(q, k, v, scale=None):
    """softmax(scale q k^T) v in float64, max-shifted."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhqc,bhkc->bhqk", q, k) * scale
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    return torch.einsum("bhqk,bhkv->bhqv", weights / weights.sum(dim=-1, keepdim=True), v)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def worst(out, ref):
    """Text naming the worst element, its value and the reference's."""
    diff = (out.double() - ref.double()).abs()
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return f"worst at {idx}: {out[idx].item():.6g} vs {ref[idx].item():.6g}"


def quiet_importorskip(module):
    """pytest.importorskip without the packages' import-time DeprecationWarnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(module)


# ---------------------------------------------------------------------------- Nyström: landmarks


def segment_means_by_loop(x, segments):
    """Each segment [floor(i n / L), floor((i + 1) n / L)) averaged by a plain loop (dim 2)."""
    n = x.shape[2]
    bounds = [i * n // segments for i in range(segments + 1)]
    return torch.stack(
        [x[:, :, bounds[i] : bounds[i + 1]].mean(dim=2) for i in range(segments)], dim=2
    )


@pytest.mark.parametrize("n,segments", [(12, 4), (12, 5), (37, 8), (50, 7), (9, 9), (10, 1)])
def test_segment_means_partition_tokens_without_padding(n, segments):
    x = torch.randn(2, 3, n, 4, dtype=torch.float64)
    got = segment_means(x, segments, dim=2)
    ref = segment_means_by_loop(x, segments)
    torch.testing.assert_close(got, ref, msg=lambda m: f"n={n}, L={segments}: {m}")
    sizes = [(i + 1) * n // segments - i * n // segments for i in range(segments)]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1, f"sizes {sizes}"
    # Constant tokens must give the same constant: padding or truncation would change it.
    ones = segment_means(torch.ones(1, 1, n, 2), segments, dim=2)
    assert torch.all(ones == 1), f"means of ones are {ones.flatten().tolist()} (padding leaks)"


def test_pool2d_means_are_adaptive_avg_pool_on_evenly_tiled_maps():
    x = torch.randn(2, 3, 8 * 12, 5, dtype=torch.float64)
    got = pool2d_means(x, (8, 12), (4, 3))  # (2, 3, 12, 5)
    image = x.reshape(2, 3, 8, 12, 5).permute(0, 1, 4, 2, 3).reshape(2 * 3, 5, 8, 12)
    pooled = F.adaptive_avg_pool2d(image, (4, 3)).reshape(2, 3, 5, 12).transpose(-2, -1)
    torch.testing.assert_close(got, pooled)


def test_pool2d_means_partition_uneven_maps():
    h, w, (lh, lw) = 7, 10, (3, 4)
    x = torch.randn(1, 2, h * w, 3, dtype=torch.float64)
    got = pool2d_means(x, (h, w), (lh, lw)).reshape(1, 2, lh, lw, 3)
    image = x.reshape(1, 2, h, w, 3)
    rows = [i * h // lh for i in range(lh + 1)]
    cols = [j * w // lw for j in range(lw + 1)]
    for i in range(lh):
        for j in range(lw):
            tile = image[:, :, rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
            torch.testing.assert_close(
                got[:, :, i, j], tile.mean(dim=(2, 3)), msg=lambda m, t=(i, j): f"tile {t}: {m}"
            )


@pytest.mark.parametrize(
    "landmarks,hw,grid",
    [
        (256, (64, 64), (16, 16)),
        (64, (16, 64), (4, 16)),
        (16, (1, 50), (1, 16)),
        (100, (8, 8), (8, 8)),
    ],
)
def test_pool2d_grid_follows_the_map_aspect(landmarks, hw, grid):
    got = pool2d_grid(landmarks, hw)
    assert got == grid, f"L={landmarks} on {hw}: grid {got}, expected {grid}"


def test_pool2d_grid_never_exceeds_the_budget_or_the_map():
    for landmarks in (1, 7, 50, 251, 256):
        for hw in ((1, 1), (3, 40), (32, 64), (64, 33), (5, 5)):
            lh, lw = pool2d_grid(landmarks, hw)
            assert 1 <= lh <= hw[0] and 1 <= lw <= hw[1], f"L={landmarks} {hw} -> {lh}x{lw}"
            assert lh * lw <= max(landmarks, 1), f"L={landmarks} {hw} -> {lh}x{lw} > L"


def test_pool2d_and_segment_landmarks_agree_on_a_one_row_map():
    # A 1 x w map tiled 1 x L is the same partition as L segments, also when L does not divide.
    q, k, v = inputs(2, 2, 50, 30, 8, 6)
    seg = registry.create("nystrom.torch", landmarks=8)
    pool = registry.create("nystrom.torch", landmarks=8, landmark_mode="pool2d")
    a = seg(q, k, v, q_hw=(1, 50), kv_hw=(1, 30))
    b = pool(q, k, v, q_hw=(1, 50), kv_hw=(1, 30))
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=lambda m: f"pool2d vs seg: {m}")
    assert rel_err(a, exact(q, k, v)) > 1e-3, "8 landmarks should not be exact here"


def test_pool2d_needs_map_shapes():
    q, k, v = inputs(1, 1, 16, 16, 4, 4)
    pool = registry.create("nystrom.torch", landmarks=4, landmark_mode="pool2d")
    reasons = pool.unsupported_reasons(AttentionSpec.from_inputs(q, k, v))
    assert any("landmark_mode='pool2d'" in r and "q_hw=None" in r for r in reasons), reasons
    with pytest.raises(UnsupportedError, match="pool2d"):
        pool(q, k, v)
    seg = registry.create("nystrom.torch", landmarks=4)
    assert seg.unsupported_reasons(AttentionSpec.from_inputs(q, k, v)) == []


# ------------------------------------------------------------------ Nyström: exactness and pinv

EXACT_CASES = {  # (batch, heads, q map, kv map, C, Cv)
    "self-8x8": (2, 2, (8, 8), (8, 8), 16, 16),
    "cross-8x8-4x4-cv24": (1, 3, (8, 8), (4, 4), 8, 24),
    "rect-5x7-3x9-cv4": (2, 1, (5, 7), (3, 9), 32, 4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", ["segments", "pool2d"])
@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_landmarks_covering_all_tokens_give_exact_attention(case, mode, dtype):
    # With one landmark per token on both sides F = A = B = S and F A^+ B = S S^+ S = S, which
    # nystrom.torch computes as exact softmax attention (the docstring says why). Tolerance:
    # the implementation's own per-dtype tolerance (fp32 1e-4 rel / 1e-5 abs, fp64 1e-10 /
    # 1e-12), the rounding of one softmax-attention pass in that dtype.
    b, h, q_hw, kv_hw, c, cv = EXACT_CASES[case]
    nq, nk = q_hw[0] * q_hw[1], kv_hw[0] * kv_hw[1]
    q, k, v = inputs(b, h, nq, nk, c, cv, dtype=dtype)
    spec = AttentionSpec.from_inputs(q, k, v, q_hw, kv_hw)
    impl = registry.create("nystrom.torch", landmark_mode=mode, landmarks=max(nq, nk))
    assert impl.covers_all_tokens(spec)
    assert impl.exact_params(spec) == {"landmarks": max(nq, nk), "landmark_mode": "segments"}
    out = impl(q, k, v, q_hw=q_hw, kv_hw=kv_hw)
    ref = exact(q, k, v)
    rtol, atol = impl.tolerance(dtype)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol, msg=lambda m: m)


@pytest.mark.parametrize("nq,nk", [(64, 64), (32, 48), (64, 16)])
def test_nystrom_formula_with_landmarks_equal_to_tokens_converges_to_exact(nq, nk):
    # The formula itself, no shortcut, landmarks = tokens, float64. A singular direction sigma of
    # S starts the iteration at x = sigma^2 / (||S||_1 ||S||_inf) >= sigma^2 / Nq and grows about
    # 3.25x per step while small; unsettled directions leave an output error of at most sigma.
    # After 40 steps every sigma above sqrt(Nq / 3.25^40) ~ 4e-10 has settled, so the output
    # error is below ~1e-9 plus float64 rounding amplified by cond(S) (<= 1e4 here, ~1e-12):
    # tolerance 1e-8. Six steps are not enough on these peaked inputs (hence the shortcut).
    q, k, v = inputs(1, 2, nq, nk, 16, 8, seed=1)
    ref = exact(q, k, v)
    out = nystrom_attention(q, k, v, q, k, 0.25, pinv_iters=40)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8, msg=lambda m: f"40 iters: {m}")
    if nq != nk:
        return  # one side is small and well conditioned: few iterations suffice there
    err6 = (nystrom_attention(q, k, v, q, k, 0.25, pinv_iters=6) - ref).abs().max().item()
    assert err6 > 1e-3, f"6 iterations gave max error {err6:.2e}; the shortcut claim is stale"


@pytest.mark.parametrize("shape", [(16, 16), (24, 10), (10, 24)])
def test_pinv_error_falls_with_iterations(shape):
    g = torch.Generator().manual_seed(2)
    lq, lk = shape
    a = torch.softmax(2 * torch.randn(3, lq, lk, generator=g, dtype=torch.float64), dim=-1)
    ref = torch.linalg.pinv(a)
    iters = [1, 2, 4, 6, 8, 12, 16, 24, 32]
    errs = [((iterative_pinv(a, i) - ref).norm() / ref.norm()).item() for i in iters]
    for i in range(len(iters) - 1):
        if errs[i] > 1e-10:  # until float64 rounding is reached the error must keep falling
            assert errs[i + 1] < errs[i], f"error rose from {iters[i]} to {iters[i + 1]}: {errs}"
    assert errs[-1] < 1e-10, f"not converged after {iters[-1]} iterations: {errs}"
    z = iterative_pinv(a, 32)  # Penrose conditions A Z A = A and Z A Z = Z (any shape)
    torch.testing.assert_close(a @ z @ a, a, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(z @ a @ z, z, rtol=1e-9, atol=1e-8)


def test_pinv_initial_scale_is_per_matrix():
    # Scaling one matrix of a batch must not change the others' iterates (a global max would).
    g = torch.Generator().manual_seed(3)
    a = torch.softmax(torch.randn(2, 12, 12, generator=g, dtype=torch.float64), dim=-1)
    b = a.clone()
    b[1] = b[1] * 50
    torch.testing.assert_close(iterative_pinv(b, 6)[0], iterative_pinv(a, 6)[0])


# ------------------------------------------------------- Nyström: approximation, cross, gradients


def smooth_inputs(n, c, cv, seed):
    """Queries varying smoothly along the sequence (16 knots, linear), keys = queries + noise."""
    g = torch.Generator().manual_seed(seed)
    knots = torch.randn(2, c, 16, generator=g, dtype=torch.float64)  # (H, C, 16)
    q = 2 * F.interpolate(knots, size=n, mode="linear").transpose(-2, -1)[None]  # (1, H, n, C)
    k = q + 0.1 * torch.randn(q.shape, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, n, cv, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("family", ["gaussian", "smooth"])
def test_nystrom_error_falls_as_landmarks_grow(family):
    # Default 6 iterations. (More iterations can raise the error on unstructured inputs: the
    # truncated iteration damps A's small singular values, a regularisation the exact A^+ lacks.)
    if family == "gaussian":
        q, k, v = inputs(1, 2, 256, 256, 16, 8, spread=1.0, seed=4)
    else:
        q, k, v = smooth_inputs(256, 16, 8, seed=4)
    ref = exact(q, k, v)
    errs = [
        rel_err(registry.create("nystrom.torch", landmarks=m)(q, k, v), ref)
        for m in (4, 16, 64, 128, 256)
    ]
    assert all(a > b for a, b in zip(errs, errs[1:])), f"errors {errs} do not fall with L"
    assert errs[-1] < 1e-12, f"256 landmarks of 256 tokens: error {errs[-1]:.2e}"


@pytest.mark.parametrize("mode", ["segments", "pool2d"])
def test_nystrom_cross_attention_shapes_and_gradients(mode):
    q, k, v = inputs(2, 2, 50, 21, 8, 5, dtype=torch.float32, grad=True)
    impl = registry.create("nystrom.torch", landmarks=6, landmark_mode=mode)
    out = impl(q, k, v, q_hw=(5, 10), kv_hw=(3, 7))
    assert out.shape == (2, 2, 50, 5) and out.dtype == torch.float32
    out.square().sum().backward()
    for name, t in zip("qkv", (q, k, v)):
        assert t.grad is not None and t.grad.shape == t.shape, f"d{name} missing"
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, f"d{name} is {t.grad}"


@pytest.mark.parametrize("mode", ["segments", "pool2d"])
def test_nystrom_gradients_match_finite_differences(mode):
    q, k, v = inputs(1, 2, 10, 6, 4, 3, spread=1.0, grad=True)
    impl = registry.create("nystrom.torch", landmarks=3, landmark_mode=mode)

    def fn(q, k, v):
        return impl(q, k, v, q_hw=(2, 5), kv_hw=(2, 3))

    assert torch.autograd.gradcheck(fn, (q, k, v)), f"{impl.label}: gradcheck failed"


# ---------------------------------------------------------------------------- Performer: kernel


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orthogonal", "iid"])
def test_performer_kernel_estimate_is_unbiased(orthogonal):
    # Raw features (no stabiliser, no eps): E[phi(q) . phi(k)] = exp(q . k / sqrt(C)). The
    # per-seed estimates are independent, so the mean of N of them lies within 5 standard errors
    # of the truth (12 entries: a false alarm below 1e-4 under a normal approximation). Without
    # the QR sign correction the orthogonal blocks are biased and this fails by > 20 errors.
    c, m, seeds = 8, 16, 2000
    g = torch.Generator().manual_seed(1)
    q = 0.5 * torch.randn(1, 1, 3, c, generator=g, dtype=torch.float64)
    k = 0.5 * torch.randn(1, 1, 4, c, generator=g, dtype=torch.float64)
    target = torch.exp(q[0, 0] @ k[0, 0].T / math.sqrt(c))
    estimates = []
    for seed in range(seeds):
        w = draw_projection(m, c, orthogonal, torch.Generator().manual_seed(seed))
        phi_q = positive_features(q, w, c**-0.25, is_query=True, eps=0.0, stabilise=False)
        phi_k = positive_features(k, w, c**-0.25, is_query=False, eps=0.0, stabilise=False)
        estimates.append(phi_q[0, 0] @ phi_k[0, 0].T)
    estimates = torch.stack(estimates)
    stderr = estimates.std(dim=0) / math.sqrt(seeds)
    z = (estimates.mean(dim=0) - target) / stderr
    assert z.abs().max() < 5, f"bias of {z.abs().max():.1f} standard errors; z = {z.tolist()}"
    assert (5 * stderr / target).max() < 0.1, "the bound is too loose to detect a 10% bias"


def test_orthogonal_blocks_have_orthogonal_rows_and_chi_norms():
    c, m = 8, 20  # two full blocks and a truncated third
    w = draw_projection(m, c, True, torch.Generator().manual_seed(0))
    assert w.shape == (m, c)
    for start in (0, 8, 16):
        block = w[start : start + c]
        gram = block @ block.T
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-10, f"rows {start}.. not orthogonal: {off.abs().max():.2e}"
    norms = w.norm(dim=1)
    assert norms.std() > 0.1, f"row norms {norms.tolist()} look fixed, not chi-distributed"


def test_performer_stabilisers_match_the_unstabilised_features_up_to_a_constant():
    q, k, _ = inputs(1, 2, 5, 7, 4, 1, spread=1.0)
    w = draw_projection(6, 4, True, torch.Generator().manual_seed(0))
    for x, is_query, dims in ((q, True, (-1,)), (k, False, (-2, -1))):
        raw = positive_features(x, w, 4**-0.25, is_query, eps=0.0, stabilise=False)
        stab = positive_features(x, w, 4**-0.25, is_query, eps=0.0)
        ratio = raw / stab  # the stabiliser's exp: constant per row (queries) or per head (keys)
        spread = ratio.amax(dim=dims) / ratio.amin(dim=dims) - 1
        assert spread.abs().max() < 1e-12, f"is_query={is_query}: ratio varies by {spread}"
        assert stab.amax() <= 1 / math.sqrt(6) + 1e-12, "stabilised features exceed 1/sqrt(m)"


# ----------------------------------------------------------------- Performer: output behaviour


def test_performer_error_falls_as_features_grow():
    # Monte-Carlo error ~ 1/sqrt(m): averaged over 8 seeds it must fall at each step and drop
    # below 0.35 of the m=8 error at m=512 (1/sqrt(64) = 0.125 in the limit).
    q, k, v = inputs(2, 2, 64, 48, 16, 8, spread=0.5, dtype=torch.float32)
    ref = exact(q, k, v)
    means = []
    for m in (8, 32, 128, 512):
        errs = [
            rel_err(registry.create("performer.torch", features=m, seed=s)(q, k, v), ref)
            for s in range(8)
        ]
        means.append(sum(errs) / len(errs))
    assert all(a > b for a, b in zip(means, means[1:])), f"mean errors {means} do not fall"
    assert means[-1] < 0.35 * means[0], f"mean errors {means}: m=512 not well below m=8"


def test_performer_same_seed_same_output():
    q, k, v = inputs(1, 2, 30, 20, 8, 4, dtype=torch.float32)
    a = registry.create("performer.torch", features=32, seed=3)
    b = registry.create("performer.torch", features=32, seed=3)
    out_a, out_b = a(q, k, v), b(q, k, v)
    assert torch.equal(out_a, out_b), worst(out_a, out_b)
    assert torch.equal(a(q, k, v), out_a), "a second call with redraw='never' changed the output"
    other = registry.create("performer.torch", features=32, seed=4)(q, k, v)
    assert not torch.allclose(other, out_a), "seed 4 gave the same output as seed 3"


def test_performer_redraw_every_call_changes_the_output():
    q, k, v = inputs(1, 2, 30, 20, 8, 4, dtype=torch.float32)
    impl = registry.create("performer.torch", features=32, redraw="every_call", seed=5)
    first = impl(q, k, v)
    w_first = impl.last_projection
    second = impl(q, k, v)
    assert not torch.equal(impl.last_projection, w_first), "no new matrix was drawn"
    assert not torch.allclose(first, second), "output did not change between calls"
    replay = registry.create("performer.torch", features=32, redraw="every_call", seed=5)
    assert torch.equal(replay(q, k, v), first), "a new instance with the same seed differs"


def test_performer_grad_and_no_grad_paths_agree():
    q, k, v = inputs(2, 2, 40, 30, 8, 6, dtype=torch.float32)
    impl = registry.create("performer.torch", features=24)
    with torch.no_grad():
        plain = impl(q, k, v)
    q.requires_grad_()
    tracked = impl(q, k, v)
    torch.testing.assert_close(tracked.detach(), plain, rtol=0, atol=0)


def test_performer_cross_attention_shapes_and_gradients():
    q, k, v = inputs(2, 3, 50, 21, 8, 5, dtype=torch.float32, grad=True)
    impl = registry.create("performer.torch", features=16)
    out = impl(q, k, v)
    assert out.shape == (2, 3, 50, 5) and out.dtype == torch.float32
    out.square().sum().backward()
    for name, t in zip("qkv", (q, k, v)):
        assert t.grad is not None and t.grad.shape == t.shape, f"d{name} missing"
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, f"d{name} is {t.grad}"


def test_performer_gradients_match_finite_differences():
    # The features are computed partly in place; with the stabilisers off (they are detached
    # constants, as in performer-pytorch, so finite differences would also see them move) the
    # formula is smooth and its autograd gradient must match finite differences.
    q, k, v = inputs(1, 2, 6, 5, 4, 3, spread=1.0, grad=True)
    w = draw_projection(8, 4, True, torch.Generator().manual_seed(0))

    def favor(q, k, v):
        phi_q = positive_features(q, w, 4**-0.25, is_query=True, stabilise=False)
        phi_k = positive_features(k, w, 4**-0.25, is_query=False, stabilise=False)
        num = phi_q @ (phi_k.transpose(-2, -1) @ v)
        return num / (phi_q @ phi_k.sum(dim=-2).unsqueeze(-1))

    assert torch.autograd.gradcheck(favor, (q, k, v)), "gradcheck failed"


def favor_by_formula(q, k, v, w):
    """FAVOR+ written out of place, stabilisers detached (as performer-pytorch does)."""
    c, m = q.shape[-1], w.shape[0]
    xq, xk = q * c**-0.25, k * c**-0.25
    dq, dk = xq @ w.T, xk @ w.T  # (B, H, N, m)
    sq = dq.amax(dim=-1, keepdim=True).detach()
    sk = dk.amax(dim=(-2, -1), keepdim=True).detach()
    phi_q = (torch.exp(dq - xq.square().sum(-1, keepdim=True) / 2 - sq) + 1e-4) / math.sqrt(m)
    phi_k = (torch.exp(dk - xk.square().sum(-1, keepdim=True) / 2 - sk) + 1e-4) / math.sqrt(m)
    return (phi_q @ (phi_k.transpose(-2, -1) @ v)) / (phi_q @ phi_k.sum(dim=-2)[..., None])


def test_performer_output_and_gradients_match_the_written_out_formula():
    q, k, v = inputs(2, 2, 12, 9, 4, 3, spread=1.0, grad=True)
    impl = registry.create("performer.torch", features=8)
    out = impl(q, k, v)
    ref = favor_by_formula(q, k, v, impl.last_projection)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"output: {m}")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, x=name: f"d{x}: {m}")


# --------------------------------------------------------------------------------------- Both


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "name,params", [("nystrom.torch", {"landmarks": 8}), ("performer.torch", {"features": 64})]
)
def test_half_precision_computes_in_float32(name, params, dtype):
    q, k, v = inputs(2, 2, 60, 40, 16, 8, dtype=torch.float32, spread=1.0)
    half = [t.to(dtype) for t in (q, k, v)]
    impl = registry.create(name, **params)
    out = impl(*half)
    assert out.dtype == dtype and torch.isfinite(out).all(), f"{impl.label}: non-finite output"
    # Internally float32: the same as the float32 run on the rounded inputs, cast back.
    same = impl(*(t.float() for t in half)).to(dtype)
    assert torch.equal(out, same), f"{impl.label} {dtype}: {worst(out, same)}"
    full = impl(q, k, v)  # and close to float32 on the unrounded inputs
    assert rel_err(out, full) < 3e-2, f"{impl.label} {dtype}: rel err {rel_err(out, full):.3g}"


@pytest.mark.parametrize(
    "name,param,value,allowed",
    [
        ("nystrom.torch", "landmarks", 0, "an integer >= 1"),
        ("nystrom.torch", "landmark_mode", "grid", "one of 'segments', 'pool2d'"),
        ("nystrom.torch", "pinv_iters", 0, "an integer in [1, 100]"),
        ("nystrom.torch", "landmarks", 2.5, "an integer >= 1"),
        ("performer.torch", "features", 0, "an integer >= 1"),
        ("performer.torch", "orthogonal", "yes", "true or false"),
        ("performer.torch", "redraw", "sometimes", "one of 'never', 'every_call'"),
        ("performer.torch", "seed", -1, "an integer >= 0"),
    ],
)
def test_bad_parameters_name_parameter_value_and_allowed(name, param, value, allowed):
    with pytest.raises(ValueError) as err:
        registry.create(name, **{param: value})
    text = str(err.value)
    assert f"{param}={value!r}" in text and allowed in text, text


def test_labels_show_the_parameters():
    assert registry.create("nystrom.torch").label == "nystrom.torch(L=256)"
    pool = registry.create("nystrom.torch", landmarks=64, landmark_mode="pool2d", pinv_iters=12)
    assert pool.label == "nystrom.torch(L=64,pool2d,iters=12)"
    spec = AttentionSpec.square(32, 8, kv_side=16)
    assert pool.label_for(spec) == "nystrom.torch(L=64,pool2d=8x8,iters=12)"
    spec = AttentionSpec(1, 1, 32 * 64, 4 * 4, 8, 8, q_hw=(32, 64), kv_hw=(4, 4))
    assert pool.label_for(spec) == "nystrom.torch(L=64,pool2d=6x10|4x4,iters=12)"
    assert registry.create("performer.torch").label == "performer.torch(m=256)"
    perf = registry.create(
        "performer.torch", features=64, orthogonal=False, redraw="every_call", seed=2
    )
    assert perf.label == "performer.torch(m=64,iid,redraw=every_call,seed=2)"


def test_nystrom_flops_match_hand_counts():
    impl = registry.create("nystrom.torch", landmarks=10)
    spec = AttentionSpec(1, 2, 100, 100, 8, 4)
    # Per head: kernels 2*8*(100*10 + 10*10 + 10*100) = 33600; pinv 6*(4*100*10 + 4*1000)
    # = 48000; products 2*4*(10*100 + 10*10 + 100*10) = 16800; sum 98400, two heads.
    assert impl.flops(spec) == 196_800
    assert impl.flops(spec, backward=True) == 3 * 196_800
    cross = registry.create("nystrom.torch", landmarks=50)
    spec = AttentionSpec(1, 1, 100, 30, 8, 4)
    # Lq = 50, Lk = 30: kernels 16*(100*30 + 50*30 + 50*30) = 96000; pinv 6*(4*50*50*30 +
    # 4*50^3) = 4_800_000; products 8*(50*30 + 30*50 + 100*30) = 48000.
    assert cross.landmark_counts(spec) == (50, 30)
    assert cross.flops(spec) == 4_944_000
    covered = AttentionSpec(1, 2, 100, 100, 8, 4)
    assert registry.create("nystrom.torch", landmarks=100).flops(covered) == 2 * 2 * 100 * 100 * 12


def test_performer_flops_match_hand_counts():
    impl = registry.create("performer.torch", features=8)
    spec = AttentionSpec(1, 1, 10, 6, 4, 3)
    # projections 2*8*4*(10+6) = 1024; rest 2*8*3*6 + 8*6 + 2*8*3*10 + 2*8*10 = 976.
    assert impl.flops(spec) == 2000
    assert impl.flops(spec, backward=True) == 2 * 1024 + 3 * 976
    big = AttentionSpec(2, 4, 4096, 4096, 64, 64)
    # About n / (2 m) = 8x fewer than exact attention at n = 4096, m = 256.
    assert 7.5 < big.exact_flops() / registry.create("performer.torch").flops(big) < 8


@pytest.mark.parametrize("name", ["nystrom.torch", "performer.torch"])
def test_memory_estimate_grows_linearly_with_tokens(name):
    impl = registry.create(name)
    for backward in (False, True):
        small = impl.memory_bytes(AttentionSpec.square(64, 32), backward)
        large = impl.memory_bytes(AttentionSpec.square(128, 32), backward)  # 4x the tokens
        naive = registry.create("full.naive").memory_bytes(AttentionSpec.square(128, 32), backward)
        assert 0 < small < large <= 4.4 * small, f"backward={backward}: {small} -> {large}"
        assert large * 10 < naive, f"backward={backward}: {large} not far below naive {naive}"


@pytest.mark.skipif(not cpu_peak_supported(), reason="no /proc/self/clear_refs")
@pytest.mark.parametrize("name", ["nystrom.torch", "performer.torch"])
def test_memory_estimate_is_close_to_the_measured_peak(name):
    q, k, v = inputs(1, 2, 128 * 128, 128 * 128, 64, 64, dtype=torch.float32, spread=1.0)
    impl = registry.create(name)
    with torch.no_grad():
        impl(q, k, v)  # warm-up
        measured = peak_memory(lambda: impl(q, k, v))
    estimate = impl.memory_bytes(AttentionSpec.from_inputs(q, k, v))
    assert 0.5 * measured < estimate < 2 * measured, f"estimate {estimate}, measured {measured}"


def test_exact_params():
    spec = AttentionSpec(1, 1, 64, 16, 8, 8)
    assert registry.create("nystrom.torch").exact_params(spec) == {
        "landmarks": 64,
        "landmark_mode": "segments",
    }
    assert registry.create("performer.torch").exact_params(spec) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["nystrom.torch", "performer.torch"])
def test_runs_on_each_device_with_non_divisible_token_counts(name, device):
    q, k, v = inputs(1, 2, 37, 23, 8, 5, dtype=torch.float32)
    impl = registry.create(name, **({"landmarks": 5} if name == "nystrom.torch" else {}))
    out = impl(*(t.to(device) for t in (q, k, v)))
    assert out.device.type == device and out.shape == (1, 2, 37, 5)
    assert torch.isfinite(out).all(), f"{impl.label} on {device}: non-finite output"
    on_cpu = impl(q, k, v)
    torch.testing.assert_close(out.cpu(), on_cpu, rtol=1e-4, atol=1e-4, msg=lambda m: m)


# --------------------------------------------------------------- Cross-checks with PyPI packages


def test_cross_check_nystrom_attention_package():
    # nystrom-attention's NystromAttention with identity projections, no residual conv, n
    # divisible by L (it pads with zeros otherwise) and one (batch, head) so that its global
    # pinv scale equals our per-matrix one: the same math, float64. Its pinv on a batch takes
    # the scale over the whole batch; applied one matrix at a time it equals ours.
    pkg = quiet_importorskip("nystrom_attention")
    n, c, landmarks = 48, 8, 8
    q, k, v = inputs(1, 1, n, n, c, c, spread=1.0, seed=6)
    theirs = pkg.NystromAttention(
        dim=3 * c, dim_head=c, heads=1, num_landmarks=landmarks, residual=False
    ).double()
    with torch.no_grad():
        theirs.to_qkv.weight.copy_(torch.eye(3 * c, dtype=torch.float64))
        theirs.to_out[0].weight.copy_(torch.eye(3 * c, c, dtype=torch.float64))
        theirs.to_out[0].bias.zero_()
        x = torch.cat([q[:, 0], k[:, 0], v[:, 0]], dim=-1)  # (1, n, 3C)
        their_out = theirs(x)[..., :c]  # (1, n, C)
    ours = registry.create("nystrom.torch", landmarks=landmarks)(q, k, v)[:, 0]
    torch.testing.assert_close(ours, their_out, rtol=1e-9, atol=1e-10, msg=lambda m: m)

    g = torch.Generator().manual_seed(7)
    temps = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)[:, None, None]
    a = torch.softmax(temps * torch.randn(3, 16, 16, generator=g, dtype=torch.float64), dim=-1)
    one_at_a_time = torch.cat(
        [pkg.nystrom_attention.moore_penrose_iter_pinv(m[None], 6) for m in a]
    )
    torch.testing.assert_close(iterative_pinv(a, 6), one_at_a_time, rtol=1e-10, atol=1e-12)
    ref = torch.linalg.pinv(a)
    ours_err = (iterative_pinv(a, 6) - ref).norm().item()
    their_err = (pkg.nystrom_attention.moore_penrose_iter_pinv(a, 6) - ref).norm().item()
    assert ours_err < their_err, f"per-matrix scale {ours_err:.3g} vs global {their_err:.3g}"


def test_cross_check_performer_pytorch_package():
    # performer-pytorch's softmax_kernel and FastAttention with our projection matrix: the same
    # features (scaling, stabilisers, eps, 1/sqrt(m)), the same linear attention and the same
    # detached stabilisers, so outputs and gradients agree in float64. (Differences not tested:
    # it draws QR blocks without the sign correction, and redraws only inside its Performer
    # wrapper, every 1000 training calls.)
    pkg = quiet_importorskip("performer_pytorch")
    q, k, v = inputs(2, 2, 40, 25, 8, 6, spread=1.0, seed=8, grad=True)
    impl = registry.create("performer.torch", features=20)
    ours = impl(q, k, v)
    w = impl.last_projection  # (20, 8) float64
    for x, is_query in ((q, True), (k, False)):
        mine = positive_features(x, w, 8**-0.25, is_query)
        theirs = pkg.performer_pytorch.softmax_kernel(x, projection_matrix=w, is_query=is_query)
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
    fast = pkg.FastAttention(dim_heads=8, nb_features=20).double()
    with torch.no_grad():
        fast.projection_matrix.copy_(w)
    theirs = fast(q, k, v)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=lambda m: m)
    grads_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
    grads_theirs = torch.autograd.grad(theirs.square().sum(), (q, k, v))
    for name, a, b in zip("qkv", grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, x=name: f"d{x}: {m}")
