"""Quantize / dequantize math for weight-only integer quantization.

Conventions (shared by every quantizer, the packers and the loaders):

* A weight ``W`` is ``[out_features, in_features]``; groups run along the input dimension,
  ``group_size`` consecutive input columns per group (``-1``: one group = whole row).
* Integer codes ``q`` are in ``[0, 2^bits - 1]``; per (row, group) a ``scale`` (float16
  values) and an integer ``zero`` in ``[0, 2^bits - 1]``; ``W_hat = scale * (q - zero)``.
* asym (as the reference AutoRound): ``wmin = min(min(W_g), 0) * min_factor``,
  ``wmax = max(max(W_g), 0) * max_factor``, ``scale = (wmax - wmin) / (2^b - 1)`` rounded to
  float16 and clamped to >= float16(1e-5), ``zero = round(-wmin / scale)``.
* sym ("full range", as the reference AutoRound's ``int_sym``): ``zero = 2^(b-1)`` always;
  the side of larger magnitude maps to code 0, so ``scale = -max|W_g| / 2^(b-1)`` when the
  positive side dominates and ``+max|W_g| / 2^(b-1)`` otherwise (the scale may be negative).
  All 2^b levels are used. In the GPTQ format this is a plain symmetric checkpoint
  (qzeros store ``2^(b-1) - 1`` under the v1 convention) with signed fp16 scales.
* Dequantization multiplies in float32 (an fp16 scale times a small integer is exact there)
  and then casts to the model dtype, so every consumer of the same codes gets the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SCALE_EPS = 1e-5
# The clamp happens on the float16 scale (as in the reference), so the bound itself is the
# float16 value nearest 1e-5; clamping in float32 to 1e-5 would store a different number.
SCALE_EPS_F16 = 1.0013580322265625e-05


@dataclass
class QParams:
    """Per-(row, group) quantization parameters: scale [out, groups] float32 holding fp16 values, zero [out, groups]."""

    scale: torch.Tensor
    zero: torch.Tensor


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, groups, group_size] (a view)."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_f}")
    return w.reshape(out_f, in_f // gs, gs)


def _round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round to float16 (what the checkpoint stores) and keep it away from zero, sign kept."""
    scale = scale.to(torch.float16).to(torch.float32)
    return torch.where(scale < 0, scale.clamp(max=-SCALE_EPS_F16), scale.clamp(min=SCALE_EPS_F16))


def compute_qparams(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                    min_factor: Optional[torch.Tensor] = None, max_factor: Optional[torch.Tensor] = None,
                    round_zero=torch.round) -> QParams:
    """Scale and zero per (row, group) from the group's min/max, optionally clipped by factors.

    Args:
        w: [out, in] weight (any float dtype; computed in float32).
        min_factor, max_factor: [out, groups] clipping factors in [0, 1] (AutoRound tunes them).
        round_zero: rounding for the asym zero point (a straight-through round while tuning).
    Returns:
        QParams with float32 tensors of shape [out, groups] (scale holds float16 values).
    """
    g = _grouped(w.float(), group_size)
    wmin = g.amin(dim=-1).clamp(max=0)
    wmax = g.amax(dim=-1).clamp(min=0)
    if min_factor is not None:
        wmin = wmin * min_factor
    if max_factor is not None:
        wmax = wmax * max_factor
    if sym:
        half = 2 ** (bits - 1)
        neg_dominant = (-wmin) > wmax
        scale = _round_scale(torch.where(neg_dominant, -wmin, -wmax) / half)
        return QParams(scale, torch.full_like(scale, float(half)))
    maxq = 2 ** bits - 1
    scale = _round_scale((wmax - wmin) / maxq)
    # Clamped so it always fits in `bits` (only degenerate groups would leave the range).
    return QParams(scale, round_zero(-wmin / scale).clamp(0, maxq))


def quantize(w: torch.Tensor, qp: QParams, bits: int, group_size: int,
             v: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1] as uint8 [out, in]; `v` is AutoRound's rounding offset."""
    g = _grouped(w.float(), group_size)
    x = g / qp.scale.unsqueeze(-1)
    if v is not None:
        x = x + _grouped(v.float(), group_size)
    q = torch.round(x) + qp.zero.unsqueeze(-1)
    return q.clamp(0, 2 ** bits - 1).reshape(w.shape).to(torch.uint8)


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """g_idx for the natural order: input column i belongs to group i // group_size."""
    gs = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device, dtype=torch.int32) // gs


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               g_idx: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat [out, in] = scale[:, g(i)] * (codes - zero[:, g(i)]), in float32, then cast to dtype.

    `g_idx` (int [in]) maps each input column to its group (act-order checkpoints); without
    it group g covers columns [g*group_size, (g+1)*group_size).
    """
    if g_idx is None:
        g = _grouped(codes.float(), group_size)
        w = scale.float().unsqueeze(-1) * (g - zero.float().unsqueeze(-1))
        return w.reshape(codes.shape).to(dtype)
    idx = g_idx.long()
    return (scale.float()[:, idx] * (codes.float() - zero.float()[:, idx])).to(dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def qdq_ste(w: torch.Tensor, bits: int, group_size: int, sym: bool, v: Optional[torch.Tensor] = None,
            min_factor: Optional[torch.Tensor] = None, max_factor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable fake quantization used while tuning: returns W_hat in float32.

    Gradients reach `v` and the clipping factors through straight-through rounding; the
    forward value equals `dequantize(quantize(...))` with the same parameters.
    """
    qp = compute_qparams(w, bits, group_size, sym, min_factor, max_factor, round_zero=round_ste)
    g = _grouped(w.float(), group_size)
    x = g / qp.scale.unsqueeze(-1)
    if v is not None:
        x = x + _grouped(v, group_size)
    q = (round_ste(x) + qp.zero.unsqueeze(-1)).clamp(0, 2 ** bits - 1)
    return (qp.scale.unsqueeze(-1) * (q - qp.zero.unsqueeze(-1))).reshape(w.shape)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int, sym: bool, v: Optional[torch.Tensor] = None,
                    min_factor: Optional[torch.Tensor] = None,
                    max_factor: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, QParams]:
    """Codes and parameters for a weight (RTN when v and the factors are None)."""
    qp = compute_qparams(w, bits, group_size, sym, min_factor, max_factor)
    return quantize(w, qp, bits, group_size, v), qp
