"""Registration, discovery and the error messages users see."""

import dataclasses
import json
import textwrap

import pytest
import torch

from attnbench import registry
from attnbench.registry import Attention, Param, UnsupportedError, register
from attnbench.spec import AttentionSpec


@pytest.fixture
def scratch_name():
    name = "scratch.test"
    yield name
    registry.unregister(name)


def test_builtins_are_registered():
    assert {"full.naive", "full.sdpa", "xformers.mea", "none"} <= set(registry.list_impls())
    assert registry.list_impls("full.*") == ["full.naive", "full.sdpa"]


def test_decorator_registration_and_create(scratch_name):
    @register(scratch_name)
    class Doubled(Attention):
        PARAMS = {"factor": Param(2.0, float, low=0.0)}

        def forward(self, q, k, v, spec):
            return self.params["factor"] * torch.nn.functional.scaled_dot_product_attention(q, k, v)

    assert scratch_name in registry.list_impls("scratch.*")
    impl = registry.create(scratch_name, factor=3)
    assert impl.params == {"factor": 3.0}
    assert impl.label == "scratch.test(factor=3.0)"
    assert (impl.family, impl.backend) == ("scratch", "test")
    q = torch.randn(1, 1, 4, 8)
    torch.testing.assert_close(impl(q, q, q), 3 * registry.create("full.sdpa")(q, q, q))


def test_duplicate_name_is_an_error(scratch_name):
    @register(scratch_name)
    class First(Attention):
        pass

    with pytest.raises(ValueError, match="already registered by .*First.*override=True"):

        @register(scratch_name)
        class Second(Attention):
            pass

    with pytest.warns(UserWarning, match="is replaced by"):

        @register(scratch_name, override=True)
        class Third(Attention):
            pass

    assert registry.get(scratch_name) is Third


@pytest.mark.parametrize("bad", ["Full.Naive", "full naive", "", "full..x"])
def test_bad_registration_name(bad):
    with pytest.raises(ValueError, match="is not allowed"):
        register(bad)


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError) as err:
        registry.create("full.spda")
    msg = str(err.value)
    assert "unknown implementation 'full.spda'" in msg
    assert "did you mean 'full.sdpa'" in msg
    assert "full.naive, full.sdpa" in msg.split("available: ")[1], "every name, sorted"


def test_unknown_family_suggests_its_members():
    with pytest.raises(ValueError) as err:
        registry.create("fulll")
    suggested = str(err.value).split("did you mean ")[1].split("?")[0]
    assert sorted(suggested.split(", ")) == ["'full.naive'", "'full.sdpa'"]


@pytest.mark.parametrize(
    "params, expected",
    [
        (
            {"scale": "big"},
            "full.sdpa: parameter scale='big' is not allowed "
            "(allowed: a finite number >= 0.0 or None)",
        ),
        ({"scale": -1.0}, "full.sdpa: parameter scale=-1.0 is not allowed"),
        ({"scale": float("inf")}, "full.sdpa: parameter scale=inf is not allowed"),
        ({"scale": float("nan")}, "full.sdpa: parameter scale=nan is not allowed"),
        ({"scael": 1.0}, "full.sdpa: unknown parameter scael=1.0 (accepted parameters: scale)"),
    ],
)
def test_bad_parameter_messages(params, expected):
    with pytest.raises(ValueError) as err:
        registry.create("full.sdpa", **params)
    assert expected in str(err.value)


def test_param_validation_rules():
    p = Param(3, int, low=1, high=8)
    assert p.validate("x", "n", 8) == 8
    for bad in (0, 9, 2.5, True, "3", None):
        with pytest.raises(
            ValueError, match=r"x: parameter n=.* \(allowed: an integer in \[1, 8\]\)"
        ):
            p.validate("x", "n", bad)
    choice = Param("dot", str, choices=("dot", "euclid"))
    with pytest.raises(ValueError, match="allowed: one of 'dot', 'euclid'"):
        choice.validate("x", "affinity", "cosine")


@pytest.mark.parametrize(
    "shapes, hw, expected",
    [
        (
            ((1, 1, 64, 8), (1, 1, 64, 8), (1, 1, 64, 8)),
            ((8, 7), None),
            "q_hw=(8, 7) gives 56 tokens but the inputs have Nq=64",
        ),
        (
            ((1, 1, 64, 8), (1, 1, 30, 8), (1, 1, 30, 8)),
            ((8, 8), (5, 5)),
            "kv_hw=(5, 5) gives 25 tokens but the inputs have Nk=30",
        ),
        (((1, 1, 64, 8), (1, 1, 64, 4), (1, 1, 64, 8)), (None, None), "k has C=4 but q has C=8"),
        (
            ((1, 1, 64, 8), (1, 1, 64, 8), (1, 1, 60, 8)),
            (None, None),
            "v has Nk=60 but k has Nk=64",
        ),
        (
            ((1, 64, 8), (1, 1, 64, 8), (1, 1, 64, 8)),
            (None, None),
            "q has shape (1, 64, 8): expected 4 dims",
        ),
        (((2, 1, 64, 8), (1, 1, 64, 8), (1, 1, 64, 8)), (None, None), "batch and heads differ"),
    ],
)
def test_wrong_shapes_are_named(shapes, hw, expected):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError) as err:
        registry.create("full.sdpa")(q, k, v, q_hw=hw[0], kv_hw=hw[1])
    assert expected in str(err.value)


def test_explicit_request_that_cannot_run_lists_every_reason():
    impl = registry.create("xformers.mea")
    q = torch.zeros(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(UnsupportedError) as err:
        impl(q, q, q)
    msg = str(err.value)
    assert msg.startswith("xformers.mea(scale=None) cannot run these inputs:")
    assert "dtype=float64 (supported: float16, bfloat16, float32)" in msg
    if not torch.cuda.is_available():
        assert "device=cpu (supported: cuda)" in msg


def test_integer_dtype_is_unsupported_with_reason():
    q = torch.zeros(1, 1, 4, 8, dtype=torch.int32)
    with pytest.raises(
        UnsupportedError, match=r"dtype=int32 \(supported: float16, bfloat16, float32, float64\)"
    ):
        registry.create("full.naive")(q, q, q)


def test_backward_and_spatial_limits_are_reasons(scratch_name):
    @register(scratch_name)
    class ForwardOnlySpatial(Attention):
        SUPPORTS_BACKWARD = False
        NEEDS_SPATIAL = True

    spec = AttentionSpec(1, 1, 16, 16, 8, 8, requires_grad=True)
    assert ForwardOnlySpatial().unsupported_reasons(spec) == [
        "inputs require grad (backward is not supported)",
        "q_hw=None, kv_hw=None (needs both spatial map shapes)",
    ]


def test_backward_on_some_devices_only_is_a_reason_elsewhere(scratch_name):
    @register(scratch_name)
    class BackwardOnCuda(Attention):
        BACKWARD_DEVICES = ("cuda",)
        BACKWARD_LIMIT = "the CPU kernel is forward-only"

    spec = AttentionSpec(1, 1, 16, 16, 8, 8, requires_grad=True)
    assert BackwardOnCuda().unsupported_reasons(spec) == [
        "inputs require grad on device=cpu (the CPU kernel is forward-only; backward is "
        "supported on cuda)"
    ]
    assert (
        BackwardOnCuda().unsupported_reasons(dataclasses.replace(spec, requires_grad=False)) == []
    )


def test_xformers_not_installed_reason():
    cls = registry.get("xformers.mea")
    reasons = cls.availability("cpu")
    assert "device=cpu (supported: cuda)" in reasons
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        assert any(
            r.startswith('not installed: pip install "attnbench[xformers]"') for r in reasons
        )


def test_exact_flops_formula():
    spec = AttentionSpec.square(256, 160)
    # 2 n^2 (C + Cv) with n = 65536: the figure DESIGN.md quotes (2,749 GFLOP).
    assert registry.create("full.sdpa").flops(spec) == 2 * 65536**2 * 320
    assert round(registry.create("full.sdpa").flops(spec) / 1e9) == 2749
    assert registry.create("full.sdpa").flops(spec, backward=True) == 3 * 2 * 65536**2 * 320
    assert registry.create("none").flops(spec) == 0


def test_naive_memory_estimate_counts_scores():
    spec = AttentionSpec.square(64, 16)
    est = registry.create("full.naive").memory_bytes(spec)
    assert est >= 2 * 4096 * 4096 * 4
    assert registry.create("full.sdpa").memory_bytes(spec) < est / 100


ENTRY_POINT_PLUGIN = """
import torch
from attnbench.registry import Attention, register

@register("demo.decorated")
class Decorated(Attention):
    EXACT = True
    def forward(self, q, k, v, spec):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

class Plain(Attention):
    def forward(self, q, k, v, spec):
        return torch.zeros(q.shape[:-1] + v.shape[-1:])
"""


def install_plugin(folder, module: str, source: str, entries: str) -> None:
    """A plugin module in ``folder`` with a dist-info whose ``attnbench.impls`` entry points
    are ``entries`` (one ``name = target`` a line), as an installed package would have."""
    (folder / f"{module}.py").write_text(source)
    dist = folder / f"{module}-0.1.dist-info"
    dist.mkdir()
    name = module.replace("_", "-")
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[attnbench.impls]\n{entries}")


def test_entry_point_registration(tmp_path, fresh_python):
    install_plugin(
        tmp_path,
        "demo_attn_plugin",
        ENTRY_POINT_PLUGIN,
        "demo = demo_attn_plugin\n"
        "demo.plain = demo_attn_plugin:Plain\n"
        "demo.broken = demo_attn_plugin_missing\n",
    )
    code = textwrap.dedent(
        """
        import json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from attnbench import registry
            names = registry.list_impls("demo.*")
        print(json.dumps({"names": names, "warnings": [str(w.message) for w in caught],
                          "label": registry.create("demo.plain").label}))
        """
    )
    import os

    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = fresh_python(code, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["names"] == ["demo.decorated", "demo.plain"]
    assert result["label"] == "demo.plain"
    assert any(
        "plugin 'demo.broken'" in w and "demo_attn_plugin_missing" in w for w in result["warnings"]
    )


def test_replacing_an_implementation_warns_and_rows_name_the_replacement(scratch_name):
    from attnbench.results import impl_class

    @register(scratch_name)
    class Original(Attention):
        pass

    assert impl_class(scratch_name).endswith("Original")
    with pytest.warns(UserWarning, match="is replaced by .*Replacement \\(override=True\\)"):

        @register(scratch_name, override=True)
        class Replacement(Attention):
            pass

    assert impl_class(scratch_name).endswith("Replacement")
    assert impl_class("no.such") is None


SUBCLASS_PLUGIN = """
from attnbench.impls.full import SDPAttention

class Faster(SDPAttention):
    pass
"""


def test_an_entry_point_subclass_of_a_builtin_registers_under_its_own_name(tmp_path, fresh_python):
    install_plugin(
        tmp_path, "faster_plugin", SUBCLASS_PLUGIN, "demo.faster = faster_plugin:Faster\n"
    )
    code = (
        "from attnbench import registry\n"
        "print(registry.get('demo.faster').__name__, registry.get('full.sdpa').__name__)\n"
    )
    import os

    proc = fresh_python(code, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Faster", "SDPAttention"]
