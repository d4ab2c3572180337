"""The student: the unquantized model with every quantized Linear replaced by a `RecoverLinear`.

`build_student` swaps the Linears named in the qstate for RecoverLinear modules holding the
qstate's codes/scales/zeros (the dense weight is dropped as each layer is swapped, so peak
memory stays near one model) and freezes every parameter. A recovery mode then switches on
what trains (stages.recovery.modes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from core.errors import InputError
from stages.quant.base import QuantizedLayer
from stages.recovery.qlinear import RecoverLinear


@dataclass
class Student:
    model: nn.Module
    layers: dict[str, RecoverLinear]  # full module name -> layer
    norms: dict[str, nn.Parameter] = field(default_factory=dict)  # tensor name -> tuned norm weight

    def trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                yield name, p


def _swap(model: nn.Module, name: str, layer: QuantizedLayer, device: torch.device) -> RecoverLinear:
    try:
        linear = model.get_submodule(name)
    except AttributeError as exc:
        raise InputError(f"qstate layer {name} is not a module of this model: the qstate was made from a "
                         "different model") from exc
    if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != tuple(layer.codes.shape):
        raise InputError(f"qstate layer {name} {list(layer.codes.shape)} does not match the model's "
                         f"{type(linear).__name__} there; the qstate was made from a different model")
    module = RecoverLinear(layer.to(device), None if linear.bias is None else linear.bias.to(device))
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return module


def build_student(model: nn.Module, layers: Iterable[tuple[str, QuantizedLayer]], device: torch.device) -> Student:
    """Turn `model` (unquantized, any device) into the student on `device`, in place; everything frozen.

    Args:
        model: the causal LM the qstate was made from.
        layers: (full module name, QuantizedLayer) for every quantized Linear (read lazily).
        device: where the student trains.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = {name: _swap(model, name, layer, device) for name, layer in layers}
    model.to(device)
    return Student(model, swapped)


def norm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Normalisation weights (RMSNorm / LayerNorm scale vectors) by tensor name, e.g. model.norm.weight."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, nn.Parameter) and weight.dim() == 1:
            out[f"{name}.weight"] = weight
    return out


def enable_norms(student: Student) -> None:
    """Norm weights train, held in float32 (Adam on bfloat16 weights loses small updates)."""
    for name, weight in norm_weights(student.model).items():
        module = student.model.get_submodule(name.rpartition(".")[0])
        module.weight = nn.Parameter(weight.detach().float(), requires_grad=True)
        student.norms[name] = module.weight


def layer_names_matching(names: Iterable[str], targets: Iterable[str]) -> dict[str, list[str]]:
    """target -> the names it selects, by PEFT's rule (the name equals it or ends with '.' + it)."""
    names = list(names)
    return {t: [n for n in names if n == t or n.endswith("." + t)] for t in targets}
