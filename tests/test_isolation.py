"""attnbench must import and run its exact baseline when optional libraries are absent."""

BLOCKED = """
import sys
for name in ("xformers", "triton"):
    sys.modules[name] = None  # makes `import name` fail as if it were not installed
import torch
from attnbench import registry
names = registry.list_impls()
q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 4)
out = registry.create("full.sdpa")(q, k, v, q_hw=(4, 4), kv_hw=(3, 3))
ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
assert torch.allclose(out, ref, atol=1e-6), (out - ref).abs().max()
print("names:", ",".join(names))
print("xformers:", registry.get("xformers.mea").availability("cuda"))
"""


def test_runs_with_xformers_and_triton_blocked(fresh_python):
    proc = fresh_python(BLOCKED)
    assert proc.returncode == 0, proc.stderr
    assert "full.sdpa" in proc.stdout and "xformers.mea" in proc.stdout
    assert "not installed" in proc.stdout.split("xformers:")[1]
