"""The Triton kernel's weight format and tile configurations (no triton import here).

`TritonWeight` keeps a GPTQ Linear's own `qweight` and `scales`; zero points are unpacked
(real zeros, v1 + 1 applied) or dropped when they are all 2^(b-1) (sym); `g_idx` is kept
only when it is not the natural order (act-order checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from stages.kernels.gptq_unpack import is_trivial_g_idx, unpack_qzeros


@dataclass
class TritonWeight:
    """One Linear in the Triton kernel's format (GPTQ qweight + scales, unpacked zeros)."""

    qweight: torch.Tensor  # int32 [K*b/32, N]
    scales: torch.Tensor  # float16 [G, N]
    zeros: Optional[torch.Tensor]  # uint8 / int16 [G, N] real zero points; None: all equal zero_const
    g_idx: Optional[torch.Tensor]  # int32 [K]; None: natural order
    bits: int
    group_size: int  # > 0 (K for per-channel)
    in_features: int
    out_features: int
    zero_const: float = 0.0

    def nbytes(self) -> int:
        ts = [self.qweight, self.scales, self.zeros, self.g_idx]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters of `_wq_matmul_kernel` (see the module docstring)."""

    block_m: int
    block_n: int
    rows: int
    split_k: int = 1
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 3

    def label(self) -> str:
        kind = "dot" if self.use_dot else "gemv"
        return f"{kind}_m{self.block_m}_n{self.block_n}_r{self.rows}_s{self.split_k}_w{self.num_warps}"


def values_per_block(bits: int) -> int:
    return 32 if bits == 3 else 32 // bits


def words_per_block(bits: int) -> int:
    return 3 if bits == 3 else 1


def group_tile_ok(w: TritonWeight, cfg: TileConfig) -> bool:
    """Scales are constant over a K tile (one load per tile instead of one per row)."""
    return w.g_idx is None and w.group_size % (cfg.rows * values_per_block(w.bits)) == 0


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: Optional[torch.Tensor],
              bits: int, group_size: int, zero_offset: int = 1) -> TritonWeight:
    """Wrap one GPTQ Linear's tensors (on their device) for the Triton kernel.

    Args:
        qweight, qzeros, scales, g_idx: the GPTQ tensors; bits: 2, 3, 4 or 8; group_size: -1 or > 0.
        zero_offset: what qzeros store below the real zero (1: GPTQ v1; 0: stored as is).
    Returns:
        TritonWeight sharing qweight and scales with the inputs.
    """
    in_f, out_f = qweight.shape[0] * 32 // bits, scales.shape[1]
    zeros = unpack_qzeros(qzeros, bits, out_f, zero_offset)
    mid = 2 ** (bits - 1)
    if bool((zeros == mid).all()):
        zeros_t, zero_const = None, float(mid)
    else:
        zeros_t, zero_const = zeros.to(torch.uint8 if int(zeros.max()) <= 255 else torch.int16).contiguous(), 0.0
    gidx = None if is_trivial_g_idx(g_idx, group_size, in_f) else g_idx.to(torch.int32).contiguous()
    gs = in_f if group_size == -1 else group_size
    return TritonWeight(qweight.contiguous(), scales.contiguous(), zeros_t, gidx, bits, gs, in_f, out_f, zero_const)


def concat_out(parts: list[TritonWeight]) -> TritonWeight:
    """Fuse Linears that share their input (q/k/v, gate/up) along the output dimension."""
    first = parts[0]
    for p in parts[1:]:
        same = (p.bits, p.group_size, p.in_features) == (first.bits, first.group_size, first.in_features)
        if not same or (p.g_idx is None) != (first.g_idx is None):
            raise ValueError("only Linears with the same bits, group size, input size and g_idx can be fused")
        if p.g_idx is not None and not torch.equal(p.g_idx, first.g_idx):
            raise ValueError("fused Linears must share g_idx")
    if any(p.zeros is not None for p in parts) or len({p.zero_const for p in parts}) > 1:
        zs = [p.zeros if p.zeros is not None else torch.full_like(p.scales, p.zero_const, dtype=torch.int16)
              for p in parts]
        zmax = max(int(z.max()) for z in zs)
        zeros, zero_const = torch.cat([z.to(torch.int16) for z in zs], 1), 0.0
        zeros = zeros.to(torch.uint8 if zmax <= 255 else torch.int16).contiguous()
    else:
        zeros, zero_const = None, first.zero_const
    return TritonWeight(torch.cat([p.qweight for p in parts], 1).contiguous(),
                        torch.cat([p.scales for p in parts], 1).contiguous(), zeros, first.g_idx, first.bits,
                        first.group_size, first.in_features, sum(p.out_features for p in parts), zero_const)
