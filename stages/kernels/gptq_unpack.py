"""Read GPTQ-format tensors back into integer codes (the inverse of the GPTQ packer).

GPTQ layout (see docs/architecture.md): `qweight` int32 [in*b/32, out] packs the input
dimension as one little-endian bit stream per output column (value i occupies bits
[b*i, b*i + b) of the column's words; 3-bit values cross word boundaries), `qzeros` int32
[groups, out*b/32] packs the output dimension the same way and stores zero - 1 (the v1
convention), `scales` float16 [groups, out], `g_idx` int32 [in].
"""

from __future__ import annotations

from typing import Optional

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def unpack_bitstream(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack `count` values of `bits` bits along dim 0 of an int32 tensor.

    Args:
        packed: int32 [words, C]; each column is an LSB-first bit stream.
        bits: 2, 3, 4 or 8.
        count: number of values to read per column (count * bits <= 32 * words).
    Returns:
        int32 [count, C] with values in [0, 2^bits - 1].
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported (choose from {SUPPORTED_BITS})")
    if count * bits > 32 * packed.shape[0]:
        raise ValueError(f"{count} values of {bits} bits do not fit in {packed.shape[0]} words")
    words = packed.to(torch.int64) & 0xFFFFFFFF  # unsigned view, so right shifts bring in zeros
    bit = torch.arange(count, device=packed.device, dtype=torch.int64) * bits
    idx, shift = bit // 32, (bit % 32).unsqueeze(1)
    lo = words.index_select(0, idx) >> shift
    if 32 % bits:  # only widths that do not divide 32 straddle words (decided on the host: graph-safe)
        crossing = (bit % 32) + bits > 32
        nxt = words.index_select(0, (idx + 1).clamp(max=packed.shape[0] - 1))
        hi = torch.where(crossing.unsqueeze(1), nxt << (32 - shift), torch.zeros_like(nxt))
        lo = lo | hi
    return (lo & ((1 << bits) - 1)).to(torch.int32)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """GPTQ qweight int32 [in*b/32, out] -> codes int32 [in, out] (input-major, as stored)."""
    return unpack_bitstream(qweight, bits, in_features)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, zero_offset: int = 1) -> torch.Tensor:
    """GPTQ qzeros int32 [groups, out*b/32] -> real zero points int32 [groups, out].

    zero_offset: 1 for GPTQ v1 files (they store zero - 1), 0 for formats that store zeros as they are.
    """
    stored = unpack_bitstream(qzeros.t().contiguous(), bits, out_features).t()
    # No wrap-around: a stored 2^b - 1 reads as zero 2^b, exactly as vLLM / exllama read v1 files.
    return stored + zero_offset


def is_trivial_g_idx(g_idx: Optional[torch.Tensor], group_size: int, in_features: int) -> bool:
    """True when g_idx is absent or equals the natural order i // group_size."""
    if g_idx is None:
        return True
    gs = in_features if group_size == -1 else group_size
    natural = torch.arange(in_features, device=g_idx.device, dtype=torch.int64) // gs
    return bool(torch.equal(g_idx.to(torch.int64), natural))


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: Optional[torch.Tensor], bits: int, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference dequantization of a GPTQ Linear: W_hat [out, in] via `qdq.dequantize`.

    Same arithmetic as the quantize stage (float32 product, then cast), so every consumer of
    these tensors agrees bit for bit.
    """
    from stages.quant.qdq import dequantize

    in_features, out_features = qweight.shape[0] * 32 // bits, scales.shape[1]
    codes = unpack_qweight(qweight, bits, in_features).t()
    zeros = unpack_qzeros(qzeros, bits, out_features).t()
    gidx = None if is_trivial_g_idx(g_idx, group_size, in_features) else g_idx
    return dequantize(codes, scales.t().float(), zeros.float(), group_size, gidx, dtype)
