"""A trainable stand-in for a quantized Linear: frozen integer codes, tunable scales/zeros, optional LoRA.

`RecoverLinear` holds one layer of the qstate (codes uint8 [out, in], float16-valued scales
and integer zeros [out, groups], optional g_idx) instead of the dense weight. Its weight
is dequantized inside the matmul at every call and never kept: the custom autograd
function saves only the input and recomputes the weight in backward, so a whole model's
training state is its codes (1 byte per weight) plus one layer's dequantized weight at a
time. This is what lets an 8B model's recovery fit one GPU.

Tunable parts (set by the recovery mode, see stages.recovery.modes):
* scales: ``scale = scale0 * (1 + scale_delta)`` (a relative step, so one learning rate fits
  layers of any magnitude; the sign of a sym scale is kept);
* zeros (asym): ``zero = round(zero0 + zero_delta)`` with a straight-through round, so the
  forward always uses the integer zero point the checkpoint will store;
* LoRA: ``y += scaling * (x @ A^T) @ B^T`` exactly as PEFT's LoRA Linear computes it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from stages.quant.base import LayerScheme, QuantizedLayer
from stages.quant.qdq import round_ste


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, groups, group_size] (a view)."""
    gs = t.shape[1] if group_size == -1 else group_size
    return t.view(t.shape[0], -1, gs)


def centered_codes(codes: torch.Tensor, zero: torch.Tensor, group_size: int,
                   g_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """codes - zero[:, g] as float32 [out, in]."""
    if g_idx is not None:
        return codes.float().sub_(zero.float()[:, g_idx.long()])
    return _grouped(codes.float(), group_size).sub_(zero.float().unsqueeze(-1)).view(codes.shape)


def scale_columns(t: torch.Tensor, scale: torch.Tensor, group_size: int, g_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """t [out, in] * scale[:, g] in place."""
    if g_idx is not None:
        return t.mul_(scale[:, g_idx.long()])
    _grouped(t, group_size).mul_(scale.unsqueeze(-1))
    return t


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                      g_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """W [out, in] float32 = scale[:, g] * (codes - zero[:, g]) (stages.quant.qdq.dequantize's values)."""
    return scale_columns(centered_codes(codes, zero, group_size, g_idx), scale, group_size, g_idx)


def _group_sum(t: torch.Tensor, group_size: int, g_idx: Optional[torch.Tensor], groups: int) -> torch.Tensor:
    """Sum [out, in] over each group's columns -> [out, groups]."""
    if g_idx is None:
        out_f, in_f = t.shape
        gs = in_f if group_size == -1 else group_size
        return t.view(out_f, in_f // gs, gs).sum(-1)
    out = torch.zeros(t.shape[0], groups, dtype=t.dtype, device=t.device)
    return out.index_add_(1, g_idx.long(), t)


class _DequantLinear(torch.autograd.Function):
    """y = x @ W^T (+ bias) with W = dequantize(codes, scale, zero); W is recomputed in backward."""

    @staticmethod
    def forward(ctx, x, scale, zero, codes, g_idx, group_size: int, bias):
        w = dequantize_weight(codes, scale.detach(), zero.detach(), group_size, g_idx).to(x.dtype)
        ctx.save_for_backward(x, scale, zero, codes, g_idx)
        ctx.group_size = group_size
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, zero, codes, g_idx = ctx.saved_tensors
        gs, groups = ctx.group_size, scale.shape[1]
        centered = centered_codes(codes, zero, gs, g_idx)
        w = scale_columns(centered.clone(), scale, gs, g_idx)
        grad_x = grad_out @ w.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        del w
        grad_s = grad_z = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).float()
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1]).float()  # [out, in]
            if ctx.needs_input_grad[2]:
                grad_z = -scale * _group_sum(grad_w, gs, g_idx, groups)
            if ctx.needs_input_grad[1]:
                grad_s = _group_sum(grad_w.mul_(centered), gs, g_idx, groups)
        return grad_x, grad_s, grad_z, None, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class RecoverLinear(nn.Module):
    """A quantized Linear for recovery training (see module doc). Buffers are frozen; parameters train."""

    def __init__(self, layer: QuantizedLayer, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.scheme: LayerScheme = layer.scheme
        self.out_features, self.in_features = layer.codes.shape
        self.register_buffer("codes", layer.codes.to(torch.uint8).contiguous())
        self.register_buffer("scale0", layer.scale.float().contiguous())
        self.register_buffer("zero0", layer.zero.float().contiguous())
        self.register_buffer("g_idx", None if layer.g_idx is None else layer.g_idx.to(torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.scale_delta: Optional[nn.Parameter] = None
        self.zero_delta: Optional[nn.Parameter] = None
        self.lora_A: Optional[nn.Parameter] = None
        self.lora_B: Optional[nn.Parameter] = None
        self.lora_scaling = 0.0

    # -- what trains ---------------------------------------------------------------------
    def enable_scales(self) -> None:
        self.scale_delta = nn.Parameter(torch.zeros_like(self.scale0))

    def enable_zeros(self) -> None:
        if self.scheme.sym:
            raise ValueError("sym layers have a fixed zero point; only asym zeros can be tuned")
        self.zero_delta = nn.Parameter(torch.zeros_like(self.zero0))

    def enable_lora(self, rank: int, alpha: float, init_a: Optional[torch.Tensor] = None,
                    init_b: Optional[torch.Tensor] = None) -> None:
        """A [rank, in] (PEFT's default: Kaiming-uniform) and B [out, rank] (zeros), unless given."""
        a = torch.empty(rank, self.in_features, device=self.codes.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a if init_a is None else init_a.float().clone())
        b = torch.zeros(self.out_features, rank, device=self.codes.device)
        self.lora_B = nn.Parameter(b if init_b is None else init_b.float().clone())
        self.lora_scaling = alpha / rank

    # -- values --------------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        return self.scale0 if self.scale_delta is None else self.scale0 * (1 + self.scale_delta)

    def zero(self) -> torch.Tensor:
        if self.zero_delta is None:
            return self.zero0
        return round_ste(self.zero0 + self.zero_delta).clamp(0, 2 ** self.scheme.bits - 1)

    def dequantize(self) -> torch.Tensor:
        """The current weight [out, in] in float32 (no LoRA term)."""
        return dequantize_weight(self.codes, self.scale(), self.zero(), self.scheme.group_size, self.g_idx)

    def exported(self) -> QuantizedLayer:
        """The layer as the qstate stores it: same codes, scales rounded to float16, integer zeros."""
        with torch.no_grad():
            scale = self.scale().to(torch.float16).float()
            scale = torch.where(scale == 0, self.scale0, scale)  # a scale may not become zero
            zero = self.zero().round()
        return QuantizedLayer(self.codes.clone(), scale.cpu(), zero.cpu(), self.scheme,
                              None if self.g_idx is None else self.g_idx.clone().cpu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = _DequantLinear.apply(xc, self.scale(), self.zero(), self.codes, self.g_idx, self.scheme.group_size,
                                     bias)
            if self.lora_A is not None:
                y = y + (xc @ self.lora_A.to(dtype).t()) @ self.lora_B.to(dtype).t() * self.lora_scaling
        return y

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={s.group_size}, sym={s.sym}, lora_rank={0 if self.lora_A is None else self.lora_A.shape[0]}")
