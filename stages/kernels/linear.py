"""Kernel-backed Linear modules and the batch-aware choice of kernel.

A `KernelLinear` holds one Linear's weight in one or more kernel formats and a list of
routes ``(max_rows, kernel)``: a call with M rows takes the first route with M <= max_rows
(the last route takes everything larger). Under CUDA graphs M is fixed per graph, so the
choice costs nothing at replay.

Kernels (`KERNELS`; `bench.linear_kernel` picks a policy, see `stages.kernels.planner`):

* dense    F.linear on a plain weight (unquantized layers, the bf16 baseline)
* dequant  reference dequantization (`qdq.dequantize`) then F.linear, every call
* dequant_once  the same dequantization done once when the module is built, then F.linear on
           the dense result (the CPU path: correct outputs, no memory saving, no speed claim)
* tinygemm torch.ops.aten._weight_int4pack_mm (4-bit, CUDA bfloat16)
* int8pack torch.ops.aten._weight_int8pack_mm (8-bit per-channel sym)
* triton   the dequantize-in-tile GEMM/GEMV of `stages.kernels.triton_gemm` (CUDA)
* gemlite  gemlite's A16Wn Triton kernels (`stages.kernels.gemlite_linear`; 2/4/8-bit, 3-bit widened; CUDA)
* scratch  the large-M route (`stages.kernels.scratch`): the kept format (named by the route's
           config) dequantized into one buffer shared by all Linears, then torch.mm (cuBLAS)
* module   the layer's own module (a bitsandbytes Linear and its kernels, on any device)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from stages.kernels import int4, int8
from stages.kernels.gptq_unpack import unpack_qweight
from stages.kernels.tiles import TritonWeight, concat_out
from stages.quant.qdq import dequantize

KERNELS = ("dense", "dequant", "dequant_once", "tinygemm", "int8pack", "triton", "gemlite", "scratch", "module")
# Which weight format each kernel reads ("gptq" = TritonWeight: the checkpoint's own tensors).
# "scratch" reads whichever format its config names (`route_format`).
FORMAT_OF = {"dense": "dense", "dequant": "gptq", "dequant_once": "dense", "triton": "gptq", "tinygemm": "tinygemm",
             "int8pack": "int8pack", "gemlite": "gemlite", "module": "module"}


@dataclass
class DenseWeight:
    weight: torch.Tensor  # [out, in]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


@dataclass
class ModuleWeight:
    """Linears that compute themselves with a library's kernels (bitsandbytes), bias removed; several modules
    reading the same input (q/k/v, gate/up) have their outputs concatenated."""

    modules: list  # nn.Module with in_features / out_features

    @property
    def in_features(self) -> int:
        return self.modules[0].in_features

    @property
    def out_features(self) -> int:
        return sum(m.out_features for m in self.modules)

    def nbytes(self) -> int:
        """Bytes the modules store (packed weight and quantization state, as their state_dict holds them)."""
        return sum(t.numel() * t.element_size() for m in self.modules for t in m.state_dict().values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.modules) == 1:
            return self.modules[0](x)
        return torch.cat([m(x) for m in self.modules], dim=-1)


Source = Union[DenseWeight, TritonWeight, ModuleWeight]


def dequantize_weight(w: TritonWeight, dtype: torch.dtype) -> torch.Tensor:
    """W_hat [out, in] of a TritonWeight, bit-identical to `qdq.dequantize(..., dtype)`."""
    codes = unpack_qweight(w.qweight, w.bits, w.in_features).t()
    zero = w.zeros.t().float() if w.zeros is not None else torch.full_like(w.scales.t(), w.zero_const, dtype=torch.float32)
    return dequantize(codes, w.scales.t().float(), zero, w.group_size, w.g_idx, dtype).contiguous()


def zeros_of(w: TritonWeight) -> torch.Tensor:
    """Real zero points [groups, out] as int32."""
    if w.zeros is not None:
        return w.zeros.to(torch.int32)
    return torch.full(w.scales.shape, int(w.zero_const), dtype=torch.int32, device=w.scales.device)


def to_int4(w: TritonWeight, dtype: torch.dtype) -> int4.Int4Packed:
    """tinygemm format from the Triton format (same codes, scales and zeros)."""
    reason = int4.unsupported_reason(w.bits, w.group_size, w.in_features, w.out_features, w.g_idx is None, dtype,
                                     str(w.qweight.device))
    if reason:
        raise ValueError(f"tinygemm cannot take this layer: {reason}")
    shift = int4.MID - 2 ** (w.bits - 1)  # widened 2/3-bit codes centred on tinygemm's 8: W = s*(q - z) unchanged,
    codes = unpack_qweight(w.qweight, w.bits, w.in_features).t().contiguous() + shift  # small zero term s*(8 - z)
    return int4.from_codes(codes, w.scales, zeros_of(w) + shift, w.group_size, dtype)


def int8_reason(w: TritonWeight) -> Optional[str]:
    return int8.unsupported_reason(w.bits, w.group_size, w.in_features, zeros_of(w), w.g_idx is None)


def to_int8(w: TritonWeight, dtype: torch.dtype) -> int8.Int8Packed:
    reason = int8_reason(w)
    if reason:
        raise ValueError(f"the int8 kernel cannot take this layer: {reason}")
    codes = unpack_qweight(w.qweight, 8, w.in_features).t()
    return int8.Int8Packed((codes - int8.ZERO).to(torch.int8).contiguous(), w.scales[0].to(dtype).contiguous(),
                           w.in_features, w.out_features)


def fuse_sources(parts: list[Source]) -> Source:
    """One Linear from several that read the same input (q/k/v, gate/up), concatenated on out."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, DenseWeight) for p in parts):
        return DenseWeight(torch.cat([p.weight for p in parts], 0))
    if all(isinstance(p, TritonWeight) for p in parts):
        return concat_out(parts)
    if all(isinstance(p, ModuleWeight) for p in parts):
        return ModuleWeight([m for p in parts for m in p.modules])
    raise ValueError("cannot fuse a quantized Linear with an unquantized one")


def kernel_fn(kind: str, fmt: Any, config: Optional[Any] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The matmul x2d [M, in] -> [M, out] of one kernel on its weight format."""
    if kind in ("dense", "dequant_once"):
        return lambda x: F.linear(x, fmt.weight)
    if kind == "dequant":
        return lambda x: F.linear(x, dequantize_weight(fmt, x.dtype))
    if kind == "tinygemm":
        return lambda x: int4.matmul(x, fmt)
    if kind == "int8pack":
        return lambda x: int8.matmul(x, fmt)
    if kind == "module":
        return fmt
    if kind == "triton":
        from stages.kernels import triton_gemm

        return lambda x: triton_gemm.matmul(x, fmt, config)
    if kind == "gemlite":
        from stages.kernels import gemlite_linear

        return lambda x: gemlite_linear.matmul(x, fmt, config)
    if kind == "scratch":
        from stages.kernels import scratch

        return lambda x: scratch.matmul(x, fmt, config)
    raise ValueError(f"unknown kernel {kind!r} (choose from {', '.join(KERNELS)})")


@dataclass
class Route:
    max_rows: int  # this route serves calls with M <= max_rows (the last one serves every M)
    kind: str
    config: Optional[Any] = None  # TileConfig (triton), GemliteConfig (gemlite) or ScratchConfig (scratch)

    def label(self) -> str:
        return self.kind if self.config is None else f"{self.kind}:{self.config.label()}"

    def format(self) -> str:
        """The weight format this route reads."""
        return self.config.fmt if self.kind == "scratch" else FORMAT_OF[self.kind]


class KernelLinear(nn.Module):
    """A Linear computed by low-bit kernels chosen by the number of rows (see module doc).

    Args:
        formats: format name (`FORMAT_OF` values) -> the weight in that format.
        routes: sorted by max_rows.
        bias: optional [out] tensor.
    """

    def __init__(self, formats: dict[str, Any], routes: list[Route], bias: Optional[torch.Tensor] = None):
        super().__init__()
        if not routes:
            raise ValueError("a KernelLinear needs at least one route")
        first = next(iter(formats.values()))
        self.in_features, self.out_features = first.in_features, first.out_features
        self.formats = formats
        self.routes = sorted(routes, key=lambda r: r.max_rows)
        for r in self.routes:
            if r.kind == "scratch":  # the shared buffer is sized before any graph is captured
                from stages.kernels import scratch

                scratch.reserve(formats[r.format()], r.config)
        self._fns = [kernel_fn(r.kind, formats[r.format()], r.config) for r in self.routes]
        self.register_buffer("bias", bias, persistent=False)

    def route_for(self, rows: int) -> int:
        for i, r in enumerate(self.routes):
            if rows <= r.max_rows:
                return i
        return len(self.routes) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = self._fns[self.route_for(x2.shape[0])](x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def weight_nbytes(self) -> int:
        """Bytes of every weight format held (+ bias): what this layer costs in memory."""
        total = sum(f.nbytes() for f in self.formats.values())
        return total + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def describe(self) -> str:
        return ", ".join(f"M<={r.max_rows}:{r.label()}" if i < len(self.routes) - 1 else f"else:{r.label()}"
                         for i, r in enumerate(self.routes))
