"""``gpa.cpp``: GPA with both phases as C++ loops fused per query cell (CPU).

Jetchev et al. 2021 (arXiv 2107.03742); see :mod:`attnbench.impls.gpa.common`. The kernel
(``gpa_cpu.cpp``) runs each phase as one parallel loop whose jobs work in the core's cache:

- phase 1, per band of query cells: their low-res scores against every low-res key (one BLAS
  call), then per cell softmax, relevance summed over its rows and top-κ in one pass over them;
- phase 2, per query cell: gather its queries and kept key and value blocks, Q K^T (BLAS),
  softmax, P V (BLAS), and write its output rows in place — no cell-major copies of queries,
  keys, values or outputs are made, which is where ``gpa.torch`` spends a third of phase 2.

- phase 2's backward pass, per query cell: the same gathers plus the output gradient, the
  probabilities recomputed from the forward's log-sum-exp, and dV, dP, dQ, dK by BLAS; each
  thread adds the key and value gradients of its own contiguous range of cells into tiles of
  its own, summed at the end in a fixed order (no races, the same sums on every run).

Pooling and the cell-major reorder of the low-res queries are ``gpa.torch``'s
(:func:`~attnbench.impls.gpa.pytorch.low_res_inputs`); autograd goes through
:class:`~attnbench.impls.gpa.pytorch.GridAttention` with the kernel's forward and backward.

The kernel is compiled on first use by :func:`torch.utils.cpp_extension.load` (a C++ compiler
and ninja; about 25 s once, then loaded from torch's extension cache) with ``-march=native``
under a name that carries a hash of the CPU's flags, and links the BLAS that PyTorch ships.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
from pathlib import Path

import torch

from attnbench.impls.gpa.common import Geometry, GPABase
from attnbench.impls.gpa.pytorch import grid_attention, low_res_inputs
from attnbench.registry import register
from attnbench.spec import AttentionSpec

SOURCE = Path(__file__).with_name("gpa_cpu.cpp")
PHASE1_BAND_SCORES = 1 << 21  # low-res scores per phase-1 matmul (8 MiB in float32)


def compiler() -> str | None:
    """The C++ compiler ``torch.utils.cpp_extension`` would use, if there is one."""
    return shutil.which(os.environ.get("CXX", "c++"))


def ninja_dir() -> str | None:
    """A directory holding the ``ninja`` executable: on PATH, else the ``ninja`` package's."""
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR


def cpu_tag() -> str:
    """A short hash of this CPU's instruction-set flags.

    It names the ``-march=native`` build, so that an extension cache shared between machines
    never hands one CPU's build to another.
    """
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), flags)
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


_build_error: Exception | None = None


def build_error() -> str | None:
    """Why the kernel failed to build in this process, if it did."""
    return None if _build_error is None else f"the C++ kernel failed to build: {_build_error}"


@functools.cache
def _load():
    from torch.utils.cpp_extension import load

    path = os.environ.get("PATH", "")
    bin_dir = ninja_dir()
    if bin_dir and not shutil.which("ninja"):
        os.environ["PATH"] = bin_dir + os.pathsep + path
    try:
        return load(
            name=f"attnbench_gpa_cpu_{cpu_tag()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    finally:
        os.environ["PATH"] = path


def kernel():
    """The compiled extension module (built on first use, then loaded from torch's cache).

    A failed build is not tried again in this process: the error is raised again, and
    :meth:`GPACpp.availability` reports it.
    """
    global _build_error
    if _build_error is not None:
        raise RuntimeError(build_error()) from _build_error
    try:
        return _load()
    except Exception as err:
        _build_error = err
        raise


@torch.no_grad()
def select_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    geom: Geometry,
    affinity: str = "dot",
    scale: float | None = None,
    with_relevance: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Phase 1 in the kernel; arguments and result as :func:`pytorch.select_keys`."""
    b, h, _, c = q.shape
    scale = c**-0.5 if scale is None else scale
    q_cells, k_low, bias = low_res_inputs(q, k, geom, affinity, scale)
    keys, kept = kernel().select_keys(
        q_cells.contiguous(),
        k_low.contiguous(),
        None if bias is None else bias.reshape(b * h, -1).contiguous(),
        geom.s * geom.s,
        geom.topk,
        with_relevance,
        PHASE1_BAND_SCORES,
    )
    keys = keys.reshape(b, h, geom.m, geom.topk)
    if not with_relevance:
        return keys
    return keys, kept.reshape(b, h, geom.m, geom.topk)


def fold_batch_heads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """[B, H, N, X] tensors as contiguous [B*H, N, X], the kernel's layout."""
    return [t.reshape(-1, *t.shape[2:]).contiguous() for t in tensors]


def kernel_geometry(geom: Geometry, affinity: str, scale: float) -> tuple:
    """The kernel's phase-2 geometry arguments: d, cell side, map widths, euclid, scale."""
    return geom.d, geom.cell_side, geom.q_hw[1], geom.kv_hw[1], affinity == "euclid", scale


def attend(q, k, v, keys, geom: Geometry, affinity: str, scale: float, with_lse: bool = False):
    """Phase 2 in the kernel: the output [B, H, Nq, Cv] and the log-sum-exp (or empty)."""
    out, lse = kernel().attend(
        *fold_batch_heads(q, k, v, keys), *kernel_geometry(geom, affinity, scale), with_lse
    )
    return out.reshape(*q.shape[:3], v.shape[3]), lse


def attend_backward(q, k, v, keys, out, lse, grad_out, geom: Geometry, affinity: str, scale):
    """Phase 2's gradients (dq, dk, dv) in the kernel, from :func:`attend`'s output and lse."""
    dq, dk, dv = kernel().attend_backward(
        *fold_batch_heads(q, k, v, keys, out),
        lse.contiguous(),
        *fold_batch_heads(grad_out),
        *kernel_geometry(geom, affinity, scale),
    )
    return dq.view_as(q), dk.view_as(k), dv.view_as(v)


@register("gpa.cpp")
class GPACpp(GPABase):
    """GPA with both phases in a C++ kernel fused per query cell (CPU)."""

    DEVICES = ("cpu",)
    DTYPES = (torch.float32, torch.float64)

    @classmethod
    def availability(cls, device: str) -> list[str]:
        """Why it cannot run; with a compiler and ninja present, this builds the kernel.

        The build happens once per machine (about 25 s; later processes load it from torch's
        cache), so that a build that cannot succeed (no Python headers, no OpenMP, ...) is a
        reason here instead of an error at the first call.
        """
        reasons = super().availability(device)
        if compiler() is None:
            reasons.append(
                f"no C++ compiler: {os.environ.get('CXX', 'c++')!r} is not on PATH (set CXX)"
            )
        if ninja_dir() is None:
            reasons.append("ninja is not installed (pip install ninja)")
        if not reasons and build_error() is None:
            try:
                kernel()
            except Exception:  # recorded by kernel(); reported just below
                pass
        if build_error() is not None:
            reasons.append(build_error())
        return reasons

    def forward(self, q, k, v, spec):
        geom = self.geometry(spec)
        scale = self.scale_for(spec.channels)
        affinity = self.params["affinity"]
        keys = self.select_keys(q, k, geom, scale)
        return grid_attention(
            q, k, v, keys, geom, affinity, scale, phase2=attend, phase2_grad=attend_backward
        )

    def select_keys(self, q, k, geom, scale):
        return select_keys(q, k, geom, self.params["affinity"], scale)

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int:
        # Forward: the output, the pooled queries (and their cell-major copy) and keys, one
        # band of phase-1 scores, and per thread a cell's queries, keys, values, scores and
        # outputs. Backward adds the saved log-sum-exp, the output and its gradient, the input
        # gradients, per thread a cell's buffers (queries, keys, values, output and its gradient,
        # probabilities and their gradient, query, key and value gradients), and every thread
        # but the first one tile of key and value gradients per block its cells keep.
        geom = self.geometry(spec)
        bh = spec.batch * spec.heads
        c, cv = spec.channels, spec.v_channels
        threads = torch.get_num_threads()
        low_q = bh * (spec.q_tokens // geom.d**2) * c
        low_k = bh * geom.nk_low * c
        per_cell = geom.s**2 * geom.nk_low
        band = min(geom.m, max(1, PHASE1_BAND_SCORES // per_cell)) * per_cell
        queries, n_keys = geom.cell_side**2, geom.keys_per_cell
        per_thread = queries * (c + cv + n_keys) + n_keys * (c + cv)
        scratch = 3 * low_q + low_k + band + threads * per_thread
        forward = spec.output_bytes + scratch * spec.element_size
        if not backward:
            return forward
        workers = min(threads, bh * geom.m)
        blocks = min(bh * geom.nk_low, -(-bh * geom.m // workers) * geom.topk)
        tiles = (workers - 1) * blocks * geom.d**2 * (c + cv)
        per_thread = queries * (2 * c + 3 * cv + 2 * n_keys) + n_keys * (2 * c + 2 * cv)
        lse = bh * spec.q_tokens
        extra = (lse + threads * per_thread + tiles) * spec.element_size
        return forward + 2 * spec.output_bytes + spec.input_bytes + extra
