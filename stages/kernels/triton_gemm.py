"""Triton dequantize-in-tile matmul for GPTQ-layout weights (2, 3, 4 and 8 bits).

``y = x @ W^T`` with ``W[n, k] = scale[g(k), n] * (q[k, n] - zero[g(k), n])`` read straight
from the checkpoint's `qweight` (int32 [K*b/32, N]); nothing is unpacked in memory.

How a tile is read: the input dimension is cut into *blocks* of VPB values stored in WPB
words (b = 2, 4, 8: one word of 32/b values; b = 3: three words of 32 values, the standard
cross-word layout). A tile is ROWS consecutive blocks x BLOCK_N columns; its WPB word planes
are loaded once (coalesced along N) and value v of every block is extracted with
compile-time shifts, giving a [ROWS, BLOCK_N] slice whose input indices are
``block * VPB + v``. The matching strided [BLOCK_M, ROWS] slice of x multiplies it, either
on tensor cores (`tl.dot`, USE_DOT, BLOCK_M >= 16) or as a broadcast multiply-and-sum (the
GEMV form for 1-4 rows). Dequantization is float32 ``(q - zero) * scale`` rounded once to
the activation dtype: the same bits as `qdq.dequantize(..., dtype)`.

Split-K: SPLIT_K programs share a column tile, each over a contiguous range of K tiles,
writing float32 partials that `_splitk_reduce` sums (small M needs it to fill the GPU).

This module imports triton at import time; import it only where triton is installed
(`stages.kernels.linear` does so lazily). With TRITON_INTERPRET=1 the kernels run on the
CPU for tests (the interpreter's bfloat16 `tl.dot` multiplies raw bit patterns, so CPU
tests use float16 / float32 activations; bfloat16 is checked by the gpu-marked tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from stages.kernels.tiles import TileConfig, TritonWeight, group_tile_ok, values_per_block


@triton.jit
def _extract(P0, P1, P2, V: tl.constexpr, BITS: tl.constexpr):
    """Value V of every block: bits [BITS*V, BITS*V + BITS) of the block's words (uint32)."""
    BIT: tl.constexpr = BITS * V
    W: tl.constexpr = BIT // 32
    SH: tl.constexpr = BIT % 32
    MASK: tl.constexpr = (1 << BITS) - 1
    if W == 0:
        lo = P0
    elif W == 1:
        lo = P1
    else:
        lo = P2
    val = lo >> SH
    if SH + BITS > 32:
        if W == 0:
            val = val | (P1 << (32 - SH))
        else:
            val = val | (P2 << (32 - SH))
    return (val & MASK).to(tl.int32)


@triton.jit
def _scale_zero_of_rows(k, s_ptr, z_ptr, g_ptr, stride_s, stride_z, offs_n, mask, mask_k, group_size, zero_const,
                        HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr):
    """Scale and zero of input rows `k` (act-order through g_idx, else k // group_size) for columns `offs_n`."""
    if HAS_GIDX:
        g = tl.load(g_ptr + k, mask=mask_k, other=0)
    else:
        g = k // group_size
    s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + g[:, None] * stride_z + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    else:
        z = zero_const
    return s, z


@triton.jit
def _load_words(qw_ptr, blk, offs_n, stride_qw, mask, WPB: tl.constexpr):
    """The packed int32 words of code blocks `blk` for columns `offs_n`: one word row per block (three for
    3-bit, whose 32 codes span 3 words; the unused ones repeat the first)."""
    wp = qw_ptr + (blk * WPB)[:, None] * stride_qw + offs_n[None, :]
    p0 = tl.load(wp, mask=mask, other=0).to(tl.uint32, bitcast=True)
    if WPB == 3:
        p1 = tl.load(wp + stride_qw, mask=mask, other=0).to(tl.uint32, bitcast=True)
        p2 = tl.load(wp + 2 * stride_qw, mask=mask, other=0).to(tl.uint32, bitcast=True)
    else:
        p1 = p0
        p2 = p0
    return p0, p1, p2


@triton.jit
def _scale_zero_of_group(gt, s_ptr, z_ptr, stride_s, stride_z, offs_n, mask, zero_const, HAS_ZEROS: tl.constexpr):
    """Scale and zero [1, BLOCK_N] of group `gt`, for a tile that lies in one group."""
    s = tl.load(s_ptr + gt * stride_s + offs_n, mask=mask, other=0).to(tl.float32)[None, :]
    if HAS_ZEROS:
        z = tl.load(z_ptr + gt * stride_z + offs_n, mask=mask, other=0).to(tl.float32)[None, :]
    else:
        z = zero_const
    return s, z


@triton.jit
def _wq_matmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
                      M, N, K, stride_xm, stride_qw, stride_s, stride_z, stride_om, stride_os,
                      group_size, zero_const, tiles_per_split,
                      BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_GIDX: tl.constexpr,
                      GROUP_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      ROWS: tl.constexpr, USE_DOT: tl.constexpr):
    VPB: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    WPB: tl.constexpr = 3 if BITS == 3 else 1
    BK: tl.constexpr = ROWS * VPB
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_r = tl.arange(0, ROWS)
    n_blocks = K // VPB
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif BLOCK_M == 1:  # one row: a 2-D accumulator, reduced over ROWS once at the end
        acc2 = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    else:  # a few rows: the same with a leading row axis
        acc3 = tl.zeros((BLOCK_M, ROWS, BLOCK_N), dtype=tl.float32)
    # A fixed trip count (tiles past the end are fully masked): same loop for every program.
    for i in range(tiles_per_split):
        t = pid_s * tiles_per_split + i
        blk = t * ROWS + offs_r
        mask_b = blk < n_blocks
        wmask = mask_b[:, None] & mask_n[None, :]
        P0, P1, P2 = _load_words(qw_ptr, blk, offs_n, stride_qw, wmask, WPB)
        if GROUP_TILE:
            mask_g = mask_n & (t * ROWS < n_blocks)  # the last split may run past the end
            s_tile, z_tile = _scale_zero_of_group((t * BK) // group_size, s_ptr, z_ptr, stride_s, stride_z, offs_n,
                                                  mask_g, zero_const, HAS_ZEROS)
        for v in tl.static_range(VPB):
            k = blk * VPB + v
            q = _extract(P0, P1, P2, v, BITS).to(tl.float32)
            if GROUP_TILE:
                s, z = s_tile, z_tile
            else:
                s, z = _scale_zero_of_rows(k, s_ptr, z_ptr, g_ptr, stride_s, stride_z, offs_n, wmask, mask_b,
                                           group_size, zero_const, HAS_ZEROS, HAS_GIDX)
            w = ((q - z) * s).to(x_ptr.dtype.element_ty)
            if USE_DOT:
                xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                             mask=mask_m[:, None] & mask_b[None, :], other=0)
                acc = tl.dot(xa, w, acc)
            elif BLOCK_M == 1:
                xv = tl.load(x_ptr + pid_m * stride_xm + k, mask=mask_b & (pid_m < M), other=0)
                acc2 += xv.to(tl.float32)[:, None] * w.to(tl.float32)
            else:
                xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                             mask=mask_m[:, None] & mask_b[None, :], other=0)
                acc3 += xa.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        if BLOCK_M == 1:
            acc = tl.sum(acc2, axis=0)[None, :]
        else:
            acc = tl.sum(acc3, axis=1)
    out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_reduce(p_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def check_config(w: TritonWeight, cfg: TileConfig) -> Optional[str]:
    """Why `cfg` cannot run `w`, or None."""
    if cfg.use_dot and (cfg.rows < 16 or cfg.block_m < 16 or cfg.block_n < 16):
        return "tl.dot needs ROWS, BLOCK_M and BLOCK_N >= 16"
    if w.in_features % values_per_block(w.bits):
        return f"in_features={w.in_features} is not a multiple of {values_per_block(w.bits)}"
    return None


def matmul(x: torch.Tensor, w: TritonWeight, cfg: TileConfig) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype with the tile configuration `cfg`."""
    x2 = x.reshape(-1, w.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], w.out_features
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    n_tiles = triton.cdiv(w.in_features // values_per_block(w.bits), cfg.rows)
    split = max(1, min(cfg.split_k, n_tiles))
    per_split = triton.cdiv(n_tiles, split)
    split = triton.cdiv(n_tiles, per_split)  # no program without work
    target = out if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    z = w.zeros if w.zeros is not None else w.scales
    g = w.g_idx if w.g_idx is not None else w.qweight
    _wq_matmul_kernel[grid](
        x2, w.qweight, w.scales, z, g, target,
        m, n, w.in_features, x2.stride(0), w.qweight.stride(0), w.scales.stride(0), z.stride(0),
        n, m * n, w.group_size, float(w.zero_const), per_split,
        BITS=w.bits, HAS_ZEROS=w.zeros is not None, HAS_GIDX=w.g_idx is not None,
        GROUP_TILE=group_tile_ok(w, cfg), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ROWS=cfg.rows,
        USE_DOT=cfg.use_dot, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        block = 1024
        _splitk_reduce[(triton.cdiv(m * n, block),)](target, out, m * n, SPLIT_K=split, BLOCK=block)
    return out.reshape(*x.shape[:-1], n)
