"""asv benchmarks: time and peak memory of the key implementations, and GPA's fidelity.

Run ``asv continuous --factor 1.2 HEAD~1 HEAD`` (see the README) to compare two commits.
A case an implementation cannot run raises NotImplementedError in ``setup``: asv skips it.
"""

import torch

from attnbench import registry
from attnbench.inputs import make_inputs
from attnbench.spec import AttentionSpec

IMPLS = {
    "full.sdpa": {},
    "gpa.torch": {"phase1_res": 16},
    "gpa.cpp": {"phase1_res": 16},
    "nystrom.torch": {"landmarks": 64},
    "performer.torch": {"features": 64},
}
SIDES = [32, 64]
CHANNELS = 64


def _prepare(name: str, side: int, grad: bool):
    try:
        impl = registry.create(name, **IMPLS[name])
    except ValueError as err:  # not in this commit's registry
        raise NotImplementedError(str(err)) from err
    spec = AttentionSpec.square(side, CHANNELS, requires_grad=grad)
    reasons = impl.unsupported_reasons(spec)
    if reasons:
        raise NotImplementedError("; ".join(reasons))
    inputs = make_inputs("gaussian", spec, seed=0)
    q, k, v = (t.float().requires_grad_(grad) for t in (inputs.q, inputs.k, inputs.v))
    return impl, spec, q, k, v


class Forward:
    params = (list(IMPLS), SIDES)
    param_names = ["impl", "side"]

    def setup(self, name, side):
        torch.set_grad_enabled(False)
        self.impl, self.spec, self.q, self.k, self.v = _prepare(name, side, grad=False)
        self.impl.forward(self.q, self.k, self.v, self.spec)

    def teardown(self, name, side):
        torch.set_grad_enabled(True)

    def time_forward(self, name, side):
        self.impl.forward(self.q, self.k, self.v, self.spec)

    def peakmem_forward(self, name, side):
        self.impl.forward(self.q, self.k, self.v, self.spec)


class ForwardBackward:
    params = (list(IMPLS), SIDES)
    param_names = ["impl", "side"]

    def setup(self, name, side):
        self.impl, self.spec, self.q, self.k, self.v = _prepare(name, side, grad=True)

    def time_forward_backward(self, name, side):
        self.impl.forward(self.q, self.k, self.v, self.spec).sum().backward()


class GPAFidelity:
    """Relative error of gpa.torch against exact attention on a 64x64 map (phase 1 at 16x16)."""

    params = ([4, 12, 24], ["smooth", "warp-copy"])
    param_names = ["topk", "inputs"]

    def setup(self, topk, family):
        spec = AttentionSpec.square(64, CHANNELS, v_channels=3 if family == "warp-copy" else None)
        self.inputs = make_inputs(family, spec, seed=0)
        self.gpa = registry.create("gpa.torch", phase1_res=16, topk=topk)

    def track_rel_err_out(self, topk, family):
        q, k, v = self.inputs.q, self.inputs.k, self.inputs.v
        exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = self.gpa(q, k, v, q_hw=(64, 64), kv_hw=(64, 64))
        return ((out - exact).norm() / exact.norm()).item()

    track_rel_err_out.unit = "relative L2 error"
