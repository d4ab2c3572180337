"""Fused, differentiable fake quantization for tuning a whole block at once.

All Linears of a block that share (bits, sym, group length) are flattened into one
"bucket": a [groups, group_len] weight matrix with one row per (output row, group). The
tuning parameters (rounding offset V, min/max clipping factors) live in the same layout,
so one fake-quant call and one optimizer update cover every layer of the bucket (no
per-layer Python overhead), and `torch.split` hands each layer a view of the result.

The values and gradients are those of the reference AutoRound `int_asym` / `int_sym`
functions with straight-through rounding (see stages.quant.qdq for the conventions);
tests/test_qdq.py checks both against the installed reference package. The elementwise
part is a custom autograd function that saves nothing but its inputs and recomputes the
rounding in backward, so tuning memory is a few weight-sized buffers, not a dozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from stages.quant.base import LayerScheme, QuantizedLayer
from stages.quant.qdq import SCALE_EPS_F16, compute_qparams, quantize


@dataclass
class LayerSlot:
    """Where one Linear lives inside a bucket: rows [start, start + rows) of the [G, L] matrix."""

    name: str
    out_features: int
    in_features: int
    start: int
    rows: int


@dataclass
class Bucket:
    """Layers with one (bits, sym, group length), flattened to [groups, group_len]."""

    bits: int
    sym: bool
    group_len: int
    weight: torch.Tensor  # [G, L], model dtype (a copy of the block's weights)
    wmin: torch.Tensor  # [G] float32, min(row, 0)
    wmax: torch.Tensor  # [G] float32, max(row, 0)
    slots: list[LayerSlot] = field(default_factory=list)
    schemes: dict[str, LayerScheme] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.weight.shape[0]


def group_len(scheme: LayerScheme, in_features: int) -> int:
    return in_features if scheme.group_size == -1 else scheme.group_size


def build_buckets(weights: dict[str, torch.Tensor], schemes: dict[str, LayerScheme]) -> list[Bucket]:
    """Group the named [out, in] weights by (bits, sym, group length) into flat buckets.

    Args:
        weights: Linear name -> weight [out, in] (any float dtype, on the tuning device).
        schemes: Linear name -> scheme; only these names are bucketed, in this order.
    Returns:
        Buckets in first-appearance order; each holds a copy of its layers' weights.
    """
    keyed: dict[tuple[int, bool, int], list[str]] = {}
    for name, scheme in schemes.items():
        key = (scheme.bits, scheme.sym, group_len(scheme, weights[name].shape[1]))
        if weights[name].shape[1] % key[2]:
            raise ValueError(f"group_size {scheme.group_size} does not divide in_features "
                             f"{weights[name].shape[1]} of {name}")
        keyed.setdefault(key, []).append(name)
    buckets = []
    for (bits, sym, glen), names in keyed.items():
        parts, slots, start = [], [], 0
        for name in names:
            w = weights[name]
            rows = w.numel() // glen
            parts.append(w.detach().reshape(rows, glen))
            slots.append(LayerSlot(name, w.shape[0], w.shape[1], start, rows))
            start += rows
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        wf = flat.float()
        buckets.append(Bucket(bits, sym, glen, flat, wf.amin(dim=1).clamp(max=0), wf.amax(dim=1).clamp(min=0),
                              slots, {n: schemes[n] for n in names}))
    return buckets


def group_scale_zero(bucket: Bucket, min_factor: Optional[torch.Tensor],
                     max_factor: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Differentiable per-group scale and (unrounded) zero, ops as in the reference.

    Returns:
        (scale [G] float32 holding float16 values, zero_float [G] or None for sym).
    """
    wmin = bucket.wmin if min_factor is None else bucket.wmin * min_factor
    wmax = bucket.wmax if max_factor is None else bucket.wmax * max_factor
    if bucket.sym:
        half = 2 ** (bucket.bits - 1)
        wmin_abs, wmax_abs = -wmin, wmax
        sign = 2 * (wmax_abs < wmin_abs).to(torch.float32) - 1
        scale = (sign * torch.maximum(wmax_abs, wmin_abs) / half).to(torch.float16).to(torch.float32)
        scale = torch.where(scale < 0, scale.clamp(max=-SCALE_EPS_F16), scale.clamp(min=SCALE_EPS_F16))
        return scale, None
    maxq = 2 ** bucket.bits - 1
    scale = ((wmax - wmin) / maxq).to(torch.float16).to(torch.float32).clamp(min=SCALE_EPS_F16)
    return scale, -wmin / scale


# Eager mode works on row chunks of about this many elements, so a bucket holding a whole
# 8B-class block never materialises several weight-sized float32 temporaries at once.
CHUNK_ELEMENTS = 1 << 24


def _row_chunks(rows: int, group_len: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // group_len)
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def _zero_point(zero_f: Optional[torch.Tensor], zero_const: float, sl: slice):
    return zero_f[sl].round().unsqueeze(1) if zero_f is not None else zero_const


class _RoundClampSTE(torch.autograd.Function):
    """W_hat = s * (clamp(round(w / s + v) + zp, 0, maxq) - zp) with straight-through rounding.

    zp = round(zf) for asym (gradient to zf straight through), 2^(b-1) for sym. Saves only
    its inputs; backward recomputes the codes (memory-bound elementwise work).
    """

    @staticmethod
    def forward(ctx, w, v, scale, zero_f, maxq: int, zero_const: float, out_dtype: torch.dtype):
        out = torch.empty(w.shape, dtype=out_dtype, device=w.device)
        for sl in _row_chunks(w.shape[0], w.shape[1]):
            s = scale[sl].unsqueeze(1)
            zp = _zero_point(zero_f, zero_const, sl)
            x = w[sl].float() / s  # a new buffer even when w is float32
            if v is not None:
                x.add_(v[sl])
            out[sl] = x.round_().add_(zp).clamp_(0, maxq).sub_(zp).mul_(s)
        ctx.save_for_backward(w, v, scale, zero_f)
        ctx.maxq, ctx.zero_const = maxq, zero_const
        return out

    @staticmethod
    def backward(ctx, grad_out):
        w, v, scale, zero_f = ctx.saved_tensors
        want_v = v is not None and ctx.needs_input_grad[1]
        want_s = ctx.needs_input_grad[2]
        want_z = zero_f is not None and ctx.needs_input_grad[3]
        grad_v = torch.empty(w.shape, dtype=torch.float32, device=w.device) if want_v else None
        grad_s = torch.empty_like(scale) if want_s else None
        grad_zf = torch.empty_like(zero_f) if want_z else None
        for sl in _row_chunks(w.shape[0], w.shape[1]):
            s = scale[sl].unsqueeze(1)
            zp = _zero_point(zero_f, ctx.zero_const, sl)
            w_over_s = w[sl].float() / s
            y = w_over_s + v[sl] if v is not None else w_over_s.clone()
            y.round_().add_(zp)
            q = y.clamp(0, ctx.maxq)
            inside = q == y  # the clamp was not active
            g = grad_out[sl].float()
            g_in = g * inside
            if want_v:
                grad_v[sl] = g_in * s
            if want_s:
                # d/ds of s*(q - zp) with w/s inside the round: (q - zp) - inside * w / s
                grad_s[sl] = (g * q.sub_(zp)).sum(dim=1) - (g_in * w_over_s).sum(dim=1)
            if want_z:
                grad_zf[sl] = (g_in.sum(dim=1) - g.sum(dim=1)) * scale[sl]  # s * (inside - 1)
        return None, grad_v, grad_s, grad_zf, None, None, None


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _fake_quant_graph(w, v, scale, zero_f, maxq: int, zero_const: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The same values and gradients as _RoundClampSTE, written as a plain autograd graph.

    Used under torch.compile: AOTAutograd then derives the backward itself and inductor fuses
    forward and backward into a few kernels (a custom Function's Python backward would run
    eagerly at every step).
    """
    s = scale.unsqueeze(1)
    x = w.float() / s
    if v is not None:
        x = x + v
    zp = _round_ste(zero_f).unsqueeze(1) if zero_f is not None else zero_const
    q = torch.clamp(_round_ste(x) + zp, 0, maxq)
    return (s * (q - zp)).to(out_dtype)


def fake_quant(bucket: Bucket, v: Optional[torch.Tensor], min_factor: Optional[torch.Tensor],
               max_factor: Optional[torch.Tensor], out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Fake-quantized bucket weights [G, L] in `out_dtype` (default: the weights' dtype)."""
    scale, zero_f = group_scale_zero(bucket, min_factor, max_factor)
    maxq = 2 ** bucket.bits - 1
    zero_const = float(2 ** (bucket.bits - 1))
    args = (bucket.weight, v, scale, zero_f, maxq, zero_const, out_dtype or bucket.weight.dtype)
    if torch.compiler.is_compiling():
        return _fake_quant_graph(*args)
    return _RoundClampSTE.apply(*args)


def split_layers(bucket: Bucket, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer [out, in] views of a bucket-shaped tensor (torch.split: one cat in backward)."""
    pieces = torch.split(flat, [s.rows for s in bucket.slots])
    return {s.name: p.reshape(s.out_features, s.in_features) for s, p in zip(bucket.slots, pieces)}


def _layer_groups(slot: LayerSlot, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[out, groups] view of a per-group bucket tensor for one layer."""
    if t is None:
        return None
    return t[slot.start:slot.start + slot.rows].reshape(slot.out_features, -1)


def export_layers(bucket: Bucket, v: Optional[torch.Tensor], min_factor: Optional[torch.Tensor],
                  max_factor: Optional[torch.Tensor]) -> dict[str, QuantizedLayer]:
    """Integer codes, scales and zeros per layer for the given tuning parameters (qdq.quantize).

    The dequantized result equals `fake_quant` with the same parameters (tests assert it).
    """
    out = {}
    weights = split_layers(bucket, bucket.weight)
    vs = split_layers(bucket, v) if v is not None else {}
    for slot in bucket.slots:
        scheme = bucket.schemes[slot.name]
        mn = None if min_factor is None else _layer_groups(slot, min_factor).detach()
        mx = None if max_factor is None else _layer_groups(slot, max_factor).detach()
        w = weights[slot.name]
        qp = compute_qparams(w, scheme.bits, scheme.group_size, scheme.sym, mn, mx)
        vv = vs[slot.name].detach() if slot.name in vs else None
        codes = quantize(w, qp, scheme.bits, scheme.group_size, vv)
        out[slot.name] = QuantizedLayer(codes, qp.scale, qp.zero, scheme)
    return out
