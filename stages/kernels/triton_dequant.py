"""Triton kernels that dequantize a kept weight format into a dense [K, n1 - n0] slice (the large-M route).

* `dequant_gptq_into`: the GPTQ qweight layout (int32 [K*b/32, N], 2/3/4/8 bits; also gemlite's
  packed weights, which are that layout bit for bit). ``W = (q - zero) * scale`` in float32,
  rounded once to the output dtype: the same bits as `qdq.dequantize(..., dtype)`.
* `dequant_int4pack_into`: PyTorch's CUDA int4 layout ("tinygemm", int32 [N/8, K/(16*ikt), 32,
  ikt/2]). Word ``[n // 8, k // (16 ikt), 4 (n % 8) + (k % 8) // 2, (k % (16 ikt)) // 32]`` holds
  value (n, k) in nibble ``4 (k % 2) + (k % 32) // 8`` (the inverse of aten's
  `_convert_weight_to_int4pack`, whose byte for k pair 2j, 2j+1 puts 2j in the high nibble);
  ``W = (q - 8) * s + z`` with tinygemm's [G, N, 2] scales and zeros.

Both write row k of the slice at ``out + k * stride_o`` (coalesced along N). Imports triton at
import time: import this module only where triton is installed (`stages.kernels.scratch` does so
lazily); with TRITON_INTERPRET=1 the kernels run on the CPU for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stages.kernels.tiles import TritonWeight, values_per_block
from stages.kernels.triton_gemm import _extract, _load_words, _scale_zero_of_group, _scale_zero_of_rows

BLOCK_N = 128


@triton.jit
def _dequant_gptq_kernel(qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, K, N, stride_qw, stride_s, stride_z, stride_o,
                         group_size, zero_const, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                         HAS_GIDX: tl.constexpr, GROUP_TILE: tl.constexpr, BLOCKS: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    VPB: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    WPB: tl.constexpr = 3 if BITS == 3 else 1
    blk = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # the pointers start at column n0
    mask_b = blk < K // VPB
    mask_n = offs_n < N
    mask = mask_b[:, None] & mask_n[None, :]
    P0, P1, P2 = _load_words(qw_ptr, blk, offs_n, stride_qw, mask, WPB)
    if GROUP_TILE:  # the whole tile lies in one group: one scale (and zero) row
        s_tile, z_tile = _scale_zero_of_group((tl.program_id(1) * BLOCKS * VPB) // group_size, s_ptr, z_ptr,
                                              stride_s, stride_z, offs_n, mask_n, zero_const, HAS_ZEROS)
    for v in tl.static_range(VPB):
        k = blk * VPB + v
        if GROUP_TILE:
            s, z = s_tile, z_tile
        else:
            s, z = _scale_zero_of_rows(k, s_ptr, z_ptr, g_ptr, stride_s, stride_z, offs_n, mask, mask_b,
                                       group_size, zero_const, HAS_ZEROS, HAS_GIDX)
        q = _extract(P0, P1, P2, v, BITS).to(tl.float32)
        w = ((q - z) * s).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + k[:, None] * stride_o + offs_n[None, :], w, mask=mask)


@triton.jit
def _dequant_int4pack_kernel(p_ptr, sz_ptr, out_ptr, K, N, stride_g, stride_o, group_size,
                             IKT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # the pointers start at column n0 (a multiple of 8)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    k = offs_k[:, None]
    n = offs_n[None, :]
    k_outer = k // (16 * IKT)
    lane = 4 * (n % 8) + (k % 8) // 2
    word = (((n // 8) * (K // (16 * IKT)) + k_outer) * 32 + lane) * (IKT // 2) + (k % (16 * IKT)) // 32
    nibble = 4 * (k % 2) + (k % 32) // 8
    packed = tl.load(p_ptr + word, mask=mask, other=0).to(tl.uint32, bitcast=True)
    q = ((packed >> (4 * nibble).to(tl.uint32)) & 15).to(tl.float32)
    g = k // group_size
    s = tl.load(sz_ptr + g * stride_g + n * 2, mask=mask, other=0).to(tl.float32)
    z = tl.load(sz_ptr + g * stride_g + n * 2 + 1, mask=mask, other=0).to(tl.float32)
    w = ((q - 8.0) * s + z).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + k * stride_o + n, w, mask=mask)


def dequant_gptq_into(w: TritonWeight, out: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
    """Columns [n0, n1) of W^T (w's layout) into `out` [K, n1 - n0] (row stride out.stride(0)); returns `out`."""
    vpb = values_per_block(w.bits)
    blocks = max(1, 64 // vpb)  # 64 input values per program
    block_n = BLOCK_N * max(1, 8 // blocks)  # >= 8 outputs per thread per value: 16-byte stores for 2/3-bit too
    z = w.zeros if w.zeros is not None else w.scales
    g = w.g_idx if w.g_idx is not None else w.qweight
    grid = (triton.cdiv(n1 - n0, block_n), triton.cdiv(w.in_features // vpb, blocks))
    # Column views (not copies): the kernel sees columns from 0, so aligned slices keep 16-byte vector access.
    _dequant_gptq_kernel[grid](w.qweight[:, n0:n1], w.scales[:, n0:n1], z[:, n0:n1], g, out, w.in_features, n1 - n0,
                               w.qweight.stride(0), w.scales.stride(0), z.stride(0), out.stride(0), w.group_size,
                               float(w.zero_const), BITS=w.bits, HAS_ZEROS=w.zeros is not None,
                               HAS_GIDX=w.g_idx is not None,
                               GROUP_TILE=w.g_idx is None and w.group_size % (blocks * vpb) == 0, BLOCKS=blocks,
                               BLOCK_N=block_n, num_warps=4)
    return out


def dequant_int4pack_into(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, in_features: int,
                          out_features: int, out: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
    """Columns [n0, n1) of a tinygemm weight's W^T into `out` [K, n1 - n0]; returns `out`."""
    if n0 % 8:
        raise ValueError(f"a slice of the int4 layout starts at a multiple of 8 columns, not {n0}")
    ikt = packed.shape[-1] * 2
    block_k = 32
    grid = (triton.cdiv(n1 - n0, BLOCK_N), triton.cdiv(in_features, block_k))
    _dequant_int4pack_kernel[grid](packed[n0 // 8:], scales_and_zeros[:, n0:n1], out, in_features, n1 - n0,
                                   scales_and_zeros.stride(0), out.stride(0), group_size, IKT=ikt, BLOCK_K=block_k,
                                   BLOCK_N=BLOCK_N, num_warps=4)
    return out
