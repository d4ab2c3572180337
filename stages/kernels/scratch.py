"""The large-M route: dequantize the kept weight format into one shared scratch buffer, then cuBLAS.

At prefill sizes (M in the thousands) a bf16 GEMM runs near the tensor cores' peak and every
low-bit kernel we measured is 2-3x slower. This route keeps the one low-bit copy of the weights
and, per call, writes W^T (or column slices of it) into a dense buffer with a fast kernel, then
calls ``torch.mm``: the cost over bf16 is one read of the packed weight and one write of the
dense slice. The buffer is shared by every Linear of a model (`ScratchPool`, one per device),
so memory stays one weight copy plus one layer (or one slice).

A `ScratchConfig` names the kept format and the slice width: ``chunk_cols=None`` dequantizes the
whole layer, a width dequantizes and multiplies slice by slice (a slice small enough to stay in
L2 is read back from L2 by the GEMM); the planner times both and keeps the faster per group.

Dequantizers per format (`DEQUANTIZERS`): gptq (the checkpoint's own tensors) and gemlite (its
packed weight is the GPTQ layout) -> `triton_dequant.dequant_gptq_into`; tinygemm ->
`triton_dequant.dequant_int4pack_into`; int8pack -> one fused torch multiply. Exact: gptq and
gemlite give `qdq.dequantize(..., dtype)` bit for bit (gemlite's own scales, which are the
checkpoint's rounded to the activation dtype); tinygemm and int8pack give their kernels' weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from stages.kernels.tiles import TritonWeight

SCRATCH_MIN_ROWS = 128  # the planner times this route only from this many rows up (decode sizes never win)
CHUNK_BYTES = (12 * 2**20, 24 * 2**20)  # slice sizes timed besides the whole layer (H100/H200 L2: 50-60 MB)


class ScratchPool:
    """One dense buffer per device in the activation dtype, grown to the largest slice any Linear asked for.

    Linears reserve their size when they are built (before any CUDA graph is captured) and look
    the buffer up at call time, so every captured graph sees the final buffer.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        self._bufs: dict[str, torch.Tensor] = {}

    def reserve(self, numel: int, device: torch.device) -> None:
        key = str(device)
        if key not in self._bufs or self._bufs[key].numel() < numel:
            self._bufs.pop(key, None)
            self._bufs[key] = torch.empty(numel, device=device, dtype=self.dtype)

    def view(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        return self._bufs[str(device)][: rows * cols].view(rows, cols)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


@dataclass(frozen=True)
class ScratchConfig:
    """Which kept format the scratch route dequantizes, and the slice width (None: the whole layer)."""

    fmt: str
    chunk_cols: Optional[int] = None
    pool: ScratchPool = field(default_factory=ScratchPool, compare=False, hash=False, repr=False)

    def label(self) -> str:
        return f"{self.fmt}_{'all' if self.chunk_cols is None else self.chunk_cols}"


def gemlite_as_gptq(w: Any) -> TritonWeight:
    """A gemlite weight's own packed tensors viewed as the GPTQ layout (no copy)."""
    layer = w.layer
    if layer.W_q.dtype != torch.int32 or layer.W_q.shape[0] * 32 != w.in_features * int(layer.W_nbits):
        raise ValueError(f"gemlite packed this layer as {layer.W_q.dtype} {tuple(layer.W_q.shape)}, not the 32-bit "
                         "GPTQ word layout the dequantizer reads")
    scalar_zero = layer.zeros.dim() == 0
    groups = layer.scales.shape[0]
    return TritonWeight(layer.W_q, layer.scales, None if scalar_zero else layer.zeros, None, int(layer.W_nbits),
                        w.in_features // groups, w.in_features, w.out_features,
                        float(layer.zeros) if scalar_zero else 0.0)


def _gptq(w: TritonWeight, out: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
    from stages.kernels import triton_dequant

    return triton_dequant.dequant_gptq_into(w, out, n0, n1)


def _gemlite(w: Any, out: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
    return _gptq(gemlite_as_gptq(w), out, n0, n1)


def _tinygemm(w: Any, out: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
    from stages.kernels import triton_dequant

    return triton_dequant.dequant_int4pack_into(w.packed, w.scales_and_zeros, w.group_size, w.in_features,
                                                w.out_features, out, n0, n1)


def _int8(w: Any, out: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
    """int8pack is [N, K]: the slice is written as rows n0..n1 and returned transposed."""
    rows = out.view(-1)[: (n1 - n0) * w.in_features].view(n1 - n0, w.in_features)
    torch.mul(w.weight[n0:n1], w.scales[n0:n1, None], out=rows)
    return rows.t()


# kept format -> (weight, out [K, n1 - n0] view, n0, n1) -> the dense W^T slice [K, n1 - n0]
DEQUANTIZERS: dict[str, Callable[[Any, torch.Tensor, int, int], torch.Tensor]] = {
    "gptq": _gptq, "gemlite": _gemlite, "tinygemm": _tinygemm, "int8pack": _int8,
}


def slice_cols(cfg: ScratchConfig, out_features: int) -> int:
    return out_features if cfg.chunk_cols is None else min(cfg.chunk_cols, out_features)


def device_of(w: Any) -> torch.device:
    """Where a weight in any kept format lives."""
    for t in (getattr(w, "qweight", None), getattr(getattr(w, "layer", None), "W_q", None), getattr(w, "packed", None),
              getattr(w, "weight", None)):
        if isinstance(t, torch.Tensor):
            return t.device
    raise ValueError(f"cannot tell the device of a {type(w).__name__}")


def reserve(w: Any, cfg: ScratchConfig) -> None:
    """Grow the pool for this layer's slice (call when the Linear is built, before any graph capture)."""
    cfg.pool.reserve(w.in_features * slice_cols(cfg, w.out_features), device_of(w))


def matmul(x: torch.Tensor, w: Any, cfg: ScratchConfig) -> torch.Tensor:
    """x [..., in] @ W^T -> [..., out]: dequantize into the pool (slice by slice), then torch.mm."""
    k, n = w.in_features, w.out_features
    x2 = x.reshape(-1, k)
    cols = slice_cols(cfg, n)
    dequant = DEQUANTIZERS[cfg.fmt]
    buf = cfg.pool.view(k, cols, x.device)
    if cols >= n:
        y = torch.mm(x2, dequant(w, buf, 0, n))
    else:
        y = torch.empty(x2.shape[0], n, device=x.device, dtype=x.dtype)
        for n0 in range(0, n, cols):
            n1 = min(n, n0 + cols)
            part = buf.view(-1)[: k * (n1 - n0)].view(k, n1 - n0)
            torch.mm(x2, dequant(w, part, n0, n1), out=y[:, n0:n1])
    return y.reshape(*x.shape[:-1], n)


def chunk_candidates(in_features: int, out_features: int, elem_bytes: int = 2) -> list[Optional[int]]:
    """Slice widths worth timing: the whole layer, and slices of about CHUNK_BYTES (multiples of 256 columns)."""
    out: list[Optional[int]] = [None]
    for b in CHUNK_BYTES:
        cols = max(256, (b // (in_features * elem_bytes)) // 256 * 256)
        if cols < out_features and cols not in out:
            out.append(cols)
    return out
