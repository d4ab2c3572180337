"""LoRA adapters on the torch backend's kernel Linears (a packed checkpoint + a PEFT adapter beside it).

The decode engine fuses q/k/v and gate/up into one Linear each, so the adapters of the fused
modules are fused the same way: A's stacked [sum r, in] and B's block-diagonal
[sum out, sum r] (scaling folded into B), giving ``y = kernel(x) + (x @ A^T) @ B^T``, which
equals PEFT's per-module ``base(x) + scaling * B(A(x))`` on every slice of the output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.errors import InputError
from stages.recovery.adapter import LoraAdapter

# engine Linear -> the Hugging Face modules it fuses, relative to a decoder layer
FUSED_MODULES = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
                 "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


class LoraKernelLinear(nn.Module):
    """A kernel Linear plus a low-rank term (see module doc)."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("lora_a", a, persistent=False)
        self.register_buffer("lora_b", b, persistent=False)

    @property
    def formats(self) -> dict[str, Any]:
        return self.base.formats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t()

    def weight_nbytes(self) -> int:
        extra = self.lora_a.numel() * self.lora_a.element_size() + self.lora_b.numel() * self.lora_b.element_size()
        return self.base.weight_nbytes() + extra


def fused_lora(adapter: LoraAdapter, names: list[str], outs: list[int], in_features: int, dtype: torch.dtype,
               device: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A [R, in], B [sum outs, R]) for the modules `names` fused in that order; None when none has an adapter."""
    present = [n for n in names if n in adapter.weights]
    if not present:
        return None
    ranks = [adapter.weights[n][0].shape[0] if n in adapter.weights else 0 for n in names]
    a = torch.zeros(sum(ranks), in_features, dtype=torch.float32)
    b = torch.zeros(sum(outs), sum(ranks), dtype=torch.float32)
    r0 = o0 = 0
    for name, r, out in zip(names, ranks, outs):
        if r:
            la, lb = adapter.weights[name]
            a[r0:r0 + r] = la.float()
            b[o0:o0 + out, r0:r0 + r] = lb.float() * adapter.scaling
        r0, o0 = r0 + r, o0 + out
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def fused_out_sizes(model: nn.Module) -> dict[str, list[int]]:
    """Engine name -> output sizes of the Hugging Face modules it fuses (read before the engine takes the model)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for kind, rels in FUSED_MODULES.items():
            out[f"layers.{i}.{kind}"] = [layer.get_submodule(r).out_features for r in rels]
    return out


def add_lora(linears: dict[str, nn.Module], adapter: LoraAdapter, out_sizes: dict[str, list[int]], prefix: str,
             dtype: torch.dtype, device: Any) -> int:
    """Wrap the engine's Linears that have adapters, in place; returns how many were wrapped.

    Args:
        linears: engine name ("layers.{i}.qkv", ...) -> kernel Linear.
        out_sizes: engine name -> output sizes of the fused modules, in FUSED_MODULES order.
        prefix: the Hugging Face name of the decoder layer list, e.g. "model.layers".
    """
    wrapped, covered = 0, set()
    for key, module in list(linears.items()):
        if not key.startswith("layers."):
            continue
        _, index, kind = key.split(".")
        names = [f"{prefix}.{index}.{rel}" for rel in FUSED_MODULES[kind]]
        covered.update(names)
        lora = fused_lora(adapter, names, out_sizes[key], module.in_features, dtype, device)
        if lora is not None:
            linears[key] = LoraKernelLinear(module, *lora)
            wrapped += 1
    missing = sorted(set(adapter.weights) - covered)
    if missing:
        raise InputError(f"the LoRA adapter has modules the torch benchmark backend cannot place ({missing[:3]}); "
                         "it applies adapters to the attention and MLP projections of the decoder layers only")
    return wrapped
