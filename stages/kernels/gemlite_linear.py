"""GPTQ-layout tensors -> gemlite's A16Wn Triton kernels (the `gemlite` package, GPU only).

gemlite (0.6, `GemLiteLinearTriton`) computes ``y = x @ W^T`` with, per group g and output n,
``W[n, k] = (q[n, k] - zero[g, n]) * scale[g, n]`` evaluated in the activation dtype
(its ``W_group_mode`` 3; a sym layer passes one integer zero, 2^(b-1)). Its layout with the
default 32-bit packing: ``W_q`` int32 [K*b/32, N], value k of column n in bits
``b*(k % (32/b))`` of word ``k // (32/b)``: the GPTQ `qweight` layout for b = 2, 4, 8, bit
for bit (tests/test_gemlite.py checks it against gemlite's own packer); scales and zeros
[K/g, N] in the activation dtype. It has 1/2/4/8-bit kernels and no 3-bit one: a 3-bit
layer is widened to 4 bits (the same codes, exact, 4/3 of the bytes).

Exactness (what the tests assert): with float16 activations the kernel's weights equal
`qdq.dequantize(..., float16)` bit for bit (``q - zero`` is a small exact integer, the
scale is the checkpoint's own float16 value, and the product is rounded once). With
bfloat16 the float16 scale is rounded to bfloat16 first (relative error <= 2^-9 per
weight), as in the tinygemm conversion. gemlite's split-K kernels add partial sums
atomically in the output dtype, so outputs carry a few more roundings than `F.linear`.

Kernels (`MATMUL_TYPES`, gemlite's names): GEMV, GEMV_REVSPLITK, GEMV_SPLITK (one row per
program), GEMM_SPLITK and GEMM (tensor cores). ``None`` lets gemlite choose by M.
Importing gemlite touches the GPU (it reads the device name for its tuned-config cache), so
it is imported only when a layer is converted.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Optional

import torch

from stages.kernels.gptq_unpack import unpack_qweight
from stages.kernels.tiles import TritonWeight

MATMUL_TYPES = ("GEMV", "GEMV_REVSPLITK", "GEMV_SPLITK", "GEMM_SPLITK", "GEMM")
STORED_BITS = {2: 2, 3: 4, 4: 4, 8: 8}  # checkpoint bits -> gemlite bits (3-bit widened)
DTYPES = (torch.float16, torch.bfloat16)
INSTALL_HINT = "pip install gemlite==0.6.0.post2 (an sdist: pip builds it; needs triton >= 3.6)"


@dataclass(frozen=True)
class GemliteConfig:
    """Which gemlite kernel a route calls (None: gemlite's own choice by M)."""

    matmul_type: Optional[str] = None

    def label(self) -> str:
        return (self.matmul_type or "auto").lower()


@dataclass
class GemliteWeight:
    """One Linear as a packed `gemlite.GemLiteLinear` (no bias: KernelLinear adds it)."""

    layer: Any
    bits: int  # the checkpoint's bits (layer.W_nbits differs for widened 3-bit)
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        ts = [self.layer.W_q, self.layer.scales, self.layer.zeros]
        return sum(t.numel() * t.element_size() for t in ts)


def available() -> Optional[str]:
    """None when gemlite can be used here, else why not (with the install hint)."""
    if importlib.util.find_spec("gemlite") is None:
        return f"the gemlite package is not installed ({INSTALL_HINT})"
    if not torch.cuda.is_available():
        return "gemlite's kernels need a CUDA device"
    return None


def unsupported_reason(w: TritonWeight, dtype: torch.dtype) -> Optional[str]:
    """Why gemlite cannot take this layer, or None when it can."""
    if w.bits not in STORED_BITS:
        return f"bits={w.bits} (gemlite takes {', '.join(map(str, STORED_BITS))}; 3-bit is widened to 4)"
    if w.g_idx is not None:
        return "act-order g_idx (gemlite groups are contiguous input ranges)"
    if w.in_features % 32 or w.in_features % w.group_size or w.group_size < 16:
        return (f"in_features={w.in_features}, group size {w.group_size} (gemlite needs in_features % 32 == 0, "
                "whole groups, group size >= 16)")
    if dtype not in DTYPES:
        return f"activation dtype {dtype} (gemlite takes float16 and bfloat16)"
    return None


def gemlite_inputs(w: TritonWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(codes uint8 [out, in], scales [out, groups] in `dtype`, zeros [out, groups] in `dtype` or one int)."""
    codes = unpack_qweight(w.qweight, w.bits, w.in_features).t().to(torch.uint8).contiguous()
    scales = w.scales.t().to(dtype).contiguous()
    zeros = int(w.zero_const) if w.zeros is None else w.zeros.t().to(dtype).contiguous()
    return codes, scales, zeros


def from_triton_weight(w: TritonWeight, dtype: torch.dtype) -> GemliteWeight:
    """Convert one layer (on its device) into gemlite's format with gemlite's own packer.

    Args:
        w: the checkpoint's tensors (`stages.kernels.tiles.TritonWeight`).
        dtype: activation dtype (float16 or bfloat16).
    Returns:
        GemliteWeight; the checkpoint tensors are not kept (one weight copy).
    """
    reason = unsupported_reason(w, dtype)
    if reason:
        raise ValueError(f"gemlite cannot take this layer: {reason}")
    from gemlite import DType, GemLiteLinear

    gdt = DType.FP16 if dtype == torch.float16 else DType.BF16
    codes, scales, zeros = gemlite_inputs(w, dtype)
    layer = GemLiteLinear(STORED_BITS[w.bits], group_size=w.group_size, in_features=w.in_features,
                          out_features=w.out_features, input_dtype=gdt, output_dtype=gdt)
    layer.pack(codes, scales, zeros, None, fma_mode=False)  # fma_mode=False: (q - zero) * scale, no rounded -zero*scale
    return GemliteWeight(layer, w.bits, w.in_features, w.out_features)


def matmul(x: torch.Tensor, w: GemliteWeight, config: Optional[GemliteConfig] = None) -> torch.Tensor:
    """x [..., in] @ W^T -> [..., out] with gemlite's kernel `config.matmul_type` (None: gemlite's choice)."""
    x2 = x.reshape(-1, w.in_features)
    if config is None or config.matmul_type is None:
        y = w.layer.forward_auto_no_warmup(x2)
    else:
        y = w.layer.forward_manual(x2, config.matmul_type)
    return y.reshape(*x.shape[:-1], w.out_features)


def candidate_configs(m: int) -> list[GemliteConfig]:
    """gemlite kernels worth timing for M rows: its own choice, the GEMVs up to 4 rows, the GEMMs from 2."""
    out = [GemliteConfig(None)]
    if m <= 4:
        out += [GemliteConfig(t) for t in ("GEMV", "GEMV_REVSPLITK", "GEMV_SPLITK")]
    if m >= 2:
        out += [GemliteConfig(t) for t in ("GEMM_SPLITK", "GEMM")]
    return out
