"""GPTQ 8-bit per-channel sym tensors -> PyTorch's int8 weight-only kernel.

`torch.ops.aten._weight_int8pack_mm(x, w_int8 [out, in], scales [out])` computes
``(x @ w_int8^T) * scales``: one scale per output channel, no zero point, no groups. A GPTQ
8-bit layer maps onto it exactly when it is sym (zero = 128, so ``q - 128`` fits int8) and
has one group per row (group_size = -1 or = in_features). Grouped 8-bit layers go to the
Triton kernel instead (see `stages.kernels.linear`).

Exactness: the kernel's weight is ``(q - 128) * bf16(scale)``; equal to the reference bfloat16
weight bit for bit when the float16 scales are bfloat16-representable (else the scale is
rounded to bfloat16 first, relative error <= 2^-9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from stages.kernels.gptq_unpack import is_trivial_g_idx, unpack_qweight, unpack_qzeros

ZERO = 128


@dataclass
class Int8Packed:
    weight: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # [out] in the activation dtype
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()


def unsupported_reason(bits: int, group_size: int, in_features: int, zeros: Optional[torch.Tensor],
                       trivial_g_idx: bool) -> Optional[str]:
    """Why `_weight_int8pack_mm` cannot run this layer, or None when it can."""
    if bits != 8:
        return f"bits={bits} (the int8 kernel is 8-bit only)"
    if group_size not in (-1, in_features):
        return f"group size {group_size} (the int8 kernel has one scale per output channel)"
    if not trivial_g_idx:
        return "act-order g_idx"
    if zeros is not None and not bool((zeros == ZERO).all()):
        return "asym zero points (the int8 kernel has no zero point)"
    return None


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: Optional[torch.Tensor],
              group_size: int, dtype: torch.dtype) -> Int8Packed:
    """Convert one GPTQ 8-bit per-channel sym Linear into the int8 kernel's format."""
    in_f, out_f = qweight.shape[0] * 4, scales.shape[1]
    zeros = unpack_qzeros(qzeros, 8, out_f)
    reason = unsupported_reason(8, group_size, in_f, zeros, is_trivial_g_idx(g_idx, group_size, in_f))
    if reason:
        raise ValueError(f"the int8 kernel cannot take this layer: {reason}")
    codes = unpack_qweight(qweight, 8, in_f).t()
    w = (codes - ZERO).to(torch.int8).contiguous()
    return Int8Packed(w, scales[0].to(dtype).contiguous(), in_f, out_f)


def matmul(x: torch.Tensor, w: Int8Packed) -> torch.Tensor:
    """x [..., in] @ W^T -> [..., out] with `_weight_int8pack_mm`."""
    x2 = x.reshape(-1, w.in_features).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(x2, w.weight, w.scales)
    return y.reshape(*x.shape[:-1], w.out_features)
