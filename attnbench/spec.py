"""What an attention call is asked to do, independent of any implementation.

Every implementation is called as ``impl(q, k, v, q_hw=(hq, wq), kv_hw=(hk, wk))`` with

    q: [B, H, Nq, C]   k: [B, H, Nk, C]   v: [B, H, Nk, Cv]   ->   out: [B, H, Nq, Cv]

Tokens are the pixels of a feature map in row-major order (token = row * width + col), so
``Nq == hq * wq`` whenever ``q_hw`` is given. :class:`AttentionSpec` captures the sizes, dtype,
device and whether gradients are needed, so that support checks, FLOP counts and memory
estimates can be made before (or without) any tensor existing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HW = tuple[int, int]


@dataclass(frozen=True)
class AttentionSpec:
    """Sizes and placement of one attention call.

    Attributes:
        batch: B.
        heads: H.
        q_tokens: Nq.
        kv_tokens: Nk.
        channels: C, the query/key channels.
        v_channels: Cv, the value (and output) channels.
        q_hw: (hq, wq) of the query map, or None for a plain sequence.
        kv_hw: (hk, wk) of the key/value map, or None for a plain sequence.
        dtype: dtype of q, k and v.
        device: device type ("cpu", "cuda", ...).
        requires_grad: whether any input needs a gradient.
    """

    batch: int
    heads: int
    q_tokens: int
    kv_tokens: int
    channels: int
    v_channels: int
    q_hw: HW | None = None
    kv_hw: HW | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    requires_grad: bool = False

    def __post_init__(self) -> None:
        for field in ("batch", "heads", "q_tokens", "kv_tokens", "channels", "v_channels"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} is not allowed (allowed: an integer >= 1)")
        for field, tokens in (("q_hw", self.q_tokens), ("kv_hw", self.kv_tokens)):
            hw = getattr(self, field)
            if hw is None:
                continue
            if len(hw) != 2 or any(not isinstance(x, int) or x < 1 for x in hw):
                raise ValueError(
                    f"{field}={hw!r} is not allowed (allowed: (height, width), ints >= 1)"
                )
            if hw[0] * hw[1] != tokens:
                which = "Nq" if field == "q_hw" else "Nk"
                raise ValueError(
                    f"{field}={tuple(hw)} gives {hw[0] * hw[1]} tokens but the inputs have "
                    f"{which}={tokens} (tokens are the pixels of the map: {which} = height * width)"
                )

    @classmethod
    def square(
        cls,
        side: int,
        channels: int,
        *,
        kv_side: int | None = None,
        v_channels: int | None = None,
        batch: int = 1,
        heads: int = 1,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        requires_grad: bool = False,
    ) -> AttentionSpec:
        """A spec for square query and key maps of the given sides."""
        kv_side = side if kv_side is None else kv_side
        return cls(
            batch=batch,
            heads=heads,
            q_tokens=side * side,
            kv_tokens=kv_side * kv_side,
            channels=channels,
            v_channels=channels if v_channels is None else v_channels,
            q_hw=(side, side),
            kv_hw=(kv_side, kv_side),
            dtype=dtype,
            device=device,
            requires_grad=requires_grad,
        )

    @classmethod
    def from_inputs(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_hw: HW | None = None,
        kv_hw: HW | None = None,
    ) -> AttentionSpec:
        """Validate q, k, v (and map shapes) and describe the call.

        Raises:
            ValueError: naming the tensor, its shape and what was expected.
        """
        layout = "q [B,H,Nq,C], k [B,H,Nk,C], v [B,H,Nk,Cv]"
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} has shape {tuple(t.shape)}: expected 4 dims ({layout})")
        b, h, nq, c = q.shape
        if k.shape[:2] != (b, h) or v.shape[:2] != (b, h):
            raise ValueError(
                f"batch and heads differ: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                f"v {tuple(v.shape)} ({layout})"
            )
        if k.shape[3] != c:
            raise ValueError(f"k has C={k.shape[3]} but q has C={c} ({layout})")
        if v.shape[2] != k.shape[2]:
            raise ValueError(f"v has Nk={v.shape[2]} but k has Nk={k.shape[2]} ({layout})")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
        if not (q.device == k.device == v.device):
            raise ValueError(f"devices differ: q {q.device}, k {k.device}, v {v.device}")
        return cls(
            batch=b,
            heads=h,
            q_tokens=nq,
            kv_tokens=k.shape[2],
            channels=c,
            v_channels=v.shape[3],
            q_hw=map_shape("q_hw", q_hw),
            kv_hw=map_shape("kv_hw", kv_hw),
            dtype=q.dtype,
            device=q.device.type,
            requires_grad=torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad),
        )

    @property
    def element_size(self) -> int:
        """Bytes per element of the inputs' dtype."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def output_bytes(self) -> int:
        """Bytes of the output [B, H, Nq, Cv]."""
        return self.batch * self.heads * self.q_tokens * self.v_channels * self.element_size

    @property
    def input_bytes(self) -> int:
        """Bytes of q, k and v together."""
        bh = self.batch * self.heads
        elems = bh * (
            self.q_tokens * self.channels + self.kv_tokens * (self.channels + self.v_channels)
        )
        return elems * self.element_size

    def exact_flops(self) -> int:
        """Useful forward FLOPs of exact attention for this spec.

        q k^T costs 2 Nq Nk C (a multiply-add counts as 2) and P v costs 2 Nq Nk Cv, per
        (batch, head); softmax and scaling are not counted.
        """
        per_head = 2 * self.q_tokens * self.kv_tokens * (self.channels + self.v_channels)
        return self.batch * self.heads * per_head


def map_shape(field: str, hw) -> HW | None:
    """``hw`` as a (height, width) tuple; ValueError naming ``field`` for what is not a pair."""
    if hw is None:
        return None
    try:
        return tuple(hw)
    except TypeError:
        raise ValueError(
            f"{field}={hw!r} is not allowed (allowed: (height, width), ints >= 1)"
        ) from None
