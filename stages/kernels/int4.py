"""GPTQ 4-bit tensors -> PyTorch's int4 weight-only kernel ("tinygemm").

`torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)` computes
``x @ W^T`` with, per (group g, output n), ``W[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n]``;
``scales_and_zeros`` is [groups, out, 2] in the activation dtype (bfloat16 on CUDA). A GPTQ
weight is ``W = scale * (q - zero)``, so ``s = scale`` and ``z = scale * (8 - zero)``.

What is exact (tests/test_kernels.py checks both cases):

* sym (zero = 8 everywhere) with bfloat16-representable scales: the kernel's weights equal
  the reference `qdq.dequantize(..., dtype=bfloat16)` value for value, with identical bits
  except that the reference's -0.0 (negative scale, q = 8) comes out as +0.0 (z = 0; (q-8)*s
  is exact in float32 and rounded once to bfloat16, on CPU and in CUDA's bf16 fma alike).
* otherwise the float16 scale is rounded to bfloat16 (relative error <= 2^-9) and, for asym,
  the zero term s*(8 - zero) too; per weight |W_kernel - W_ref| <= 2^-9 * (|W_kernel| + 16*|scale|)
  plus one bfloat16 rounding of W_ref (the test asserts this bound).

2- and 3-bit layers are widened: codes and zero points are both shifted by 8 - 2^(b-1) into
the same 4-bit fields, so ``s*(q - zero)`` is unchanged and the rounded zero term
``s*(8 - zero)`` stays as small as in the 4-bit case (unshifted 2-bit codes would sit far
from 8 and lose about 2^-5 of a scale to cancellation); memory is that of 4-bit.

Layout of the packed weight: CUDA `_convert_weight_to_int4pack` takes uint8 [out, in/2]
(even input index in the high nibble) and returns int32 [out/8, in/(16*inner_k_tiles), 32,
inner_k_tiles/2]; the CPU variant `_convert_weight_to_int4pack_for_cpu` takes int32 [out, in].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from stages.kernels.gptq_unpack import is_trivial_g_idx, unpack_qweight, unpack_qzeros

GROUP_SIZES = (32, 64, 128, 256)
WIDENED_BITS = (2, 3, 4)  # codes of these widths fit tinygemm's 4-bit fields as they are (exact, 4-bit memory)
MID = 8  # tinygemm reads codes as signed int4: q - 8


@dataclass
class Int4Packed:
    """One Linear in tinygemm format."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # [groups, out, 2]
    group_size: int
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + \
            self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()


def unsupported_reason(bits: int, group_size: int, in_features: int, out_features: int,
                       trivial_g_idx: bool, dtype: torch.dtype, device: str, inner_k_tiles: int = 8) -> Optional[str]:
    """Why tinygemm cannot run this layer, or None when it can."""
    if bits not in WIDENED_BITS:
        return f"bits={bits} (tinygemm is a 4-bit kernel; 2- and 3-bit codes are widened to 4 bits)"
    gs = in_features if group_size == -1 else group_size
    if gs not in GROUP_SIZES:
        return f"group size {gs} (tinygemm takes {', '.join(map(str, GROUP_SIZES))})"
    if not trivial_g_idx:
        return "act-order g_idx (tinygemm groups are contiguous input ranges)"
    if in_features % (16 * inner_k_tiles) or in_features % gs:
        return f"in_features={in_features} is not a multiple of {16 * inner_k_tiles} and of the group size"
    if out_features % 8:
        return f"out_features={out_features} is not a multiple of 8"
    if str(device).startswith("cuda") and dtype != torch.bfloat16:
        return f"activation dtype {dtype} (the CUDA kernel takes bfloat16)"
    return None


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tinygemm's [groups, out, 2] from GPTQ scale [groups, out] and real zeros [groups, out].

    The zero term s*(8 - zero) is formed in float32 (exact) and rounded once to `dtype`.
    """
    s = scale.float()
    z = s * (MID - zero.float())
    return torch.stack([s, z], dim=-1).to(dtype).contiguous()


def pack_codes(codes_nk: torch.Tensor, inner_k_tiles: int = 8) -> torch.Tensor:
    """Codes int [out, in] in [0, 15] -> the kernel's packed weight on the codes' device."""
    if codes_nk.is_cuda:
        c = codes_nk.to(torch.uint8)
        as_bytes = ((c[:, ::2] << 4) | c[:, 1::2]).contiguous()
        return torch.ops.aten._convert_weight_to_int4pack(as_bytes, inner_k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_nk.to(torch.int32).contiguous(), inner_k_tiles)


def from_codes(codes_nk: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               dtype: torch.dtype, inner_k_tiles: int = 8) -> Int4Packed:
    """Build the tinygemm weight from codes [out, in], scale and real zeros [groups, out]."""
    out_f, in_f = codes_nk.shape
    gs = in_f if group_size == -1 else group_size
    return Int4Packed(pack_codes(codes_nk, inner_k_tiles), scales_and_zeros(scale, zero, dtype), gs, in_f, out_f)


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: Optional[torch.Tensor],
              group_size: int, dtype: torch.dtype, inner_k_tiles: int = 8) -> Int4Packed:
    """Convert one GPTQ 4-bit Linear (on its current device) into tinygemm format.

    Args:
        qweight, qzeros, scales, g_idx: the GPTQ tensors (g_idx must be the natural order).
        group_size: -1 or the group size; dtype: activation dtype (bfloat16 on CUDA).
    Returns:
        Int4Packed on the tensors' device.
    """
    in_f, out_f = qweight.shape[0] * 8, scales.shape[1]
    reason = unsupported_reason(4, group_size, in_f, out_f, is_trivial_g_idx(g_idx, group_size, in_f), dtype,
                                str(qweight.device), inner_k_tiles)
    if reason:
        raise ValueError(f"tinygemm cannot take this layer: {reason}")
    codes = unpack_qweight(qweight, 4, in_f).t().contiguous()
    zeros = unpack_qzeros(qzeros, 4, out_f)
    return from_codes(codes, scales, zeros, group_size, dtype, inner_k_tiles)


def matmul(x: torch.Tensor, w: Int4Packed) -> torch.Tensor:
    """x [..., in] @ W^T -> [..., out] with the int4 kernel (CUDA or the CPU variant)."""
    x2 = x.reshape(-1, w.in_features).contiguous()
    if x2.is_cuda:
        y = torch.ops.aten._weight_int4pack_mm(x2, w.packed, w.group_size, w.scales_and_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.packed, w.group_size, w.scales_and_zeros)
    return y.reshape(*x.shape[:-1], w.out_features)


def exactness(scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> dict:
    """Whether tinygemm reproduces the reference bfloat16 weights bit for bit (see module doc)."""
    sym = bool((zero == 2 ** (bits - 1)).all())
    representable = bool(torch.equal(scale.float().to(torch.bfloat16).float(), scale.float()))
    return {"sym": sym, "scales_bf16_representable": representable, "exact": sym and representable}
