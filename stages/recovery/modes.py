"""Recovery modes (stages.registry.RECOVER_MODES): what trains, and what the stage writes.

* `ScalesMode` (recover.mode=scales): every quantized layer's scales (relative step), optionally
  the asym zero points and the normalisation weights. Output: a qstate with the same codes and
  the tuned scales/zeros, plus the tuned norm weights as replacement tensors, so pack writes an
  ordinary GPTQ / auto-round checkpoint.
* `LoraMode` (recover.mode=lora): rank-r adapters on the quantized layers that
  recover.target_modules selects; the quantized weights stay frozen. Output: a PEFT adapter.
* `ScalesLoraMode` (recover.mode=scales_lora): both parameter sets train together, each with its
  own learning rate (recover.scales_lr for scales/zeros/norms, recover.lr for the adapters).
  Output: the tuned qstate (pack writes the ordinary checkpoint) and the adapter beside it; the
  adapter was trained on top of the tuned scales, so the two belong together.

Each mode checks its config against the model's layers before anything is loaded (`check`),
switches on its parameters (`attach`), gives each trainable parameter its learning rate
(`learning_rates`) and exports them (`export`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from core.errors import ConfigError
from core.schema import RecoverConfig
from stages.quant.base import QuantizedLayer
from stages.recovery.adapter import LoraAdapter
from stages.recovery.student import Student, enable_norms, layer_names_matching

DEFAULT_LR = {"scales": 2e-3, "lora": 1e-3, "scales_lora": 1e-3}
LORA_PARAMS = ("lora_A", "lora_B")  # RecoverLinear's adapter parameters (the rest are scales, zeros, norms)


@dataclass
class ModelLayers:
    """What the checks need to know about the model: every Linear's shape and which are quantized."""

    linears: dict[str, tuple[int, int]]  # full name -> (out, in)
    quantized: set[str]
    asym: set[str] = field(default_factory=set)


@dataclass
class Export:
    """What a mode hands the stage to write."""

    layers: Optional[dict[str, QuantizedLayer]] = None  # a new qstate (scales mode)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor name -> tuned unquantized tensor
    adapter: Optional[LoraAdapter] = None


class ScalesMode:
    name = "scales"

    def __init__(self, cfg: RecoverConfig):
        self.cfg = cfg

    def check(self, layers: ModelLayers) -> None:
        if self.cfg.tune_zeros and not layers.asym:
            raise ConfigError("recover.tune_zeros", True, "false when every quantized layer is sym (fixed zero point)",
                              "set recover.tune_zeros=false or quantize asym (quant.sym=false)")

    def attach(self, student: Student, fp_weight: Callable[[str], torch.Tensor]) -> None:
        for layer in student.layers.values():
            layer.enable_scales()
            if self.cfg.tune_zeros and not layer.scheme.sym:
                layer.enable_zeros()
        if self.cfg.tune_norms:
            enable_norms(student)

    def export(self, student: Student) -> Export:
        layers = {name: layer.exported() for name, layer in student.layers.items()}
        norms = {name: p.detach().float().cpu().clone() for name, p in student.norms.items()}
        return Export(layers=layers, replacements=norms)

    def learning_rates(self, names: list[str]) -> dict[str, float]:
        return dict.fromkeys(names, learning_rate(self.cfg))


class LoraMode:
    name = "lora"

    def __init__(self, cfg: RecoverConfig):
        self.cfg = cfg

    def targets(self, layers: ModelLayers) -> list[str]:
        """Quantized layers the adapters go on (checked: every target matches, all matches are quantized)."""
        key = "recover.target_modules"
        matches = layer_names_matching(layers.linears, self.cfg.target_modules)
        empty = [t for t, names in matches.items() if not names]
        if empty:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers.quantized})
            raise ConfigError(key, self.cfg.target_modules, f"module names of this model's quantized Linears "
                              f"({', '.join(suffixes)})", f"{empty} match no module; e.g. {key}=[{','.join(suffixes)}]",
                              problem="selects nothing for")
        chosen = sorted({n for names in matches.values() for n in names})
        plain = [n for n in chosen if n not in layers.quantized]
        if plain:
            raise ConfigError(key, self.cfg.target_modules, "names of quantized Linears only (adapters recover the "
                              f"quantization error; {plain[:3]} are not quantized)", "drop those names from the list")
        return chosen

    def check(self, layers: ModelLayers) -> None:
        name = min(self.targets(layers), key=lambda n: min(layers.linears[n]))
        out_f, in_f = layers.linears[name]
        if self.cfg.rank > min(out_f, in_f):
            raise ConfigError("recover.rank", self.cfg.rank, f"at most {min(out_f, in_f)}, the smaller dimension "
                              f"of {name} [{out_f} x {in_f}]", f"e.g. recover.rank={min(16, out_f, in_f)}")

    def attach(self, student: Student, fp_weight: Callable[[str], torch.Tensor]) -> None:
        layers = ModelLayers({n: (l.out_features, l.in_features) for n, l in student.layers.items()},
                             set(student.layers))
        init = _svd_init if self.cfg.lora_init == "svd" else None
        for name in self.targets(layers):
            layer = student.layers[name]
            a = b = None
            if init is not None:
                a, b = init(fp_weight(name).to(layer.codes.device).float() - layer.dequantize(), self.cfg.rank,
                            self.cfg.alpha / self.cfg.rank)
            layer.enable_lora(self.cfg.rank, self.cfg.alpha, a, b)

    def export(self, student: Student) -> Export:
        weights = {n: (l.lora_A.detach().cpu(), l.lora_B.detach().cpu())
                   for n, l in student.layers.items() if l.lora_A is not None}
        return Export(adapter=LoraAdapter(self.cfg.rank, self.cfg.alpha, list(self.cfg.target_modules), weights))

    def learning_rates(self, names: list[str]) -> dict[str, float]:
        return dict.fromkeys(names, learning_rate(self.cfg))


class ScalesLoraMode:
    """Scales (+ norms, zeros) and LoRA adapters trained jointly; exports the tuned qstate and the adapter."""

    name = "scales_lora"

    def __init__(self, cfg: RecoverConfig):
        self.cfg = cfg
        self.scales, self.lora = ScalesMode(cfg), LoraMode(cfg)

    def check(self, layers: ModelLayers) -> None:
        self.scales.check(layers)
        self.lora.check(layers)

    def attach(self, student: Student, fp_weight: Callable[[str], torch.Tensor]) -> None:
        self.lora.attach(student, fp_weight)  # svd init: the residual of the untuned quantized weight
        self.scales.attach(student, fp_weight)

    def export(self, student: Student) -> Export:
        tuned = self.scales.export(student)
        return Export(layers=tuned.layers, replacements=tuned.replacements, adapter=self.lora.export(student).adapter)

    def learning_rates(self, names: list[str]) -> dict[str, float]:
        scales_lr = self.cfg.scales_lr if self.cfg.scales_lr is not None else DEFAULT_LR["scales"]
        return {n: learning_rate(self.cfg) if n.rsplit(".", 1)[-1] in LORA_PARAMS else scales_lr for n in names}


def _svd_init(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in], B [out, r] with scaling * B @ A = the best rank-r approximation of `residual` [out, in]."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    return root.unsqueeze(1) * vh[:rank], u[:, :rank] * root.unsqueeze(0)


def learning_rate(cfg: RecoverConfig) -> float:
    return cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.mode]
