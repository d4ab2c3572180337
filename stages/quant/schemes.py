"""Which Linear layers get quantized, and with which scheme (per-layer overrides).

Every Linear inside a decoder block is quantized with (quant.bits, quant.group_size,
quant.sym) unless a `quant.overrides` entry says otherwise. An override's pattern is an
exact layer name or a regex that must match the whole name (e.g. `.*mlp\\.down_proj`);
overrides apply in order (later wins) and one that matches nothing is an error. lm_head
stays in full precision unless quant.quantize_lm_head. All checks run before any tuning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from core.errors import ConfigError
from core.schema import QuantScheme
from stages.quant.base import LayerScheme
from stages.quant.blocks import block_linears, find_blocks

COMMON_GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class QuantPlan:
    """The per-layer schemes of one model (full module names)."""

    blocks_name: str
    num_blocks: int
    schemes: dict[str, LayerScheme]
    skipped: list[str] = field(default_factory=list)
    head: str | None = None  # the lm_head's name when it is quantized

    def block_schemes(self, index: int) -> dict[str, LayerScheme]:
        """Schemes of block `index` keyed by names relative to the block."""
        prefix = f"{self.blocks_name}.{index}."
        return {n[len(prefix):]: s for n, s in self.schemes.items() if n.startswith(prefix)}


def _output_head(model: nn.Module) -> tuple[str | None, bool]:
    """(name of the output Linear, whether it shares its weight with the input embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return None, False
    name = next(n for n, m in model.named_modules() if m is head)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return name, emb is not None and emb.weight is head.weight


def _candidates(model: nn.Module, cfg: QuantScheme) -> tuple[str, int, dict[str, nn.Linear], str | None, list[str]]:
    blocks_name, blocks = find_blocks(model)
    layers = {f"{blocks_name}.{i}.{rel}": lin for i, b in enumerate(blocks) for rel, lin in block_linears(b).items()}
    head, tied = _output_head(model)
    if cfg.quantize_lm_head and head is not None:
        if tied:
            raise ConfigError("quant.quantize_lm_head", True, "false for this model",
                              "set quant.quantize_lm_head=false", problem="cannot be used: lm_head shares its weight "
                              "with the input embeddings, which must stay in full precision")
        layers[head] = model.get_submodule(head)
    outside = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    return blocks_name, len(blocks), layers, (head if cfg.quantize_lm_head else None), outside


def _matches(pattern: str, name: str) -> bool:
    return name == pattern or re.fullmatch(pattern, name) is not None


def _apply_overrides(cfg: QuantScheme, layers: dict[str, nn.Linear], outside: list[str]
                     ) -> tuple[dict[str, LayerScheme], list[str], dict[str, str]]:
    base = LayerScheme(cfg.bits, cfg.group_size, cfg.sym)
    schemes = {n: base for n in layers}
    gs_key = {n: "quant.group_size" for n in layers}
    skipped: set[str] = set()
    for i, ov in enumerate(cfg.overrides):
        key = f"quant.overrides[{i}]"
        hit = [n for n in layers if _matches(ov.pattern, n)]
        if not hit:
            elsewhere = [n for n in outside if _matches(ov.pattern, n)]
            fix = ("lm_head is only quantized with quant.quantize_lm_head=true" if elsewhere else
                   f"quantized layers are named like {next(iter(layers), '?')}; e.g. pattern '.*mlp\\.down_proj'")
            raise ConfigError(f"{key}.pattern", ov.pattern, "an exact layer name or a regex matching whole names",
                              fix, problem="matches no quantized layer")
        for n in hit:
            if ov.skip:
                skipped.add(n)
                continue
            s = schemes[n]
            schemes[n] = LayerScheme(ov.bits if ov.bits is not None else s.bits,
                                     ov.group_size if ov.group_size is not None else s.group_size,
                                     ov.sym if ov.sym is not None else s.sym)
            if ov.group_size is not None:
                gs_key[n] = f"{key}.group_size"
    return {n: s for n, s in schemes.items() if n not in skipped}, sorted(skipped), gs_key


def _check_group_sizes(schemes: dict[str, LayerScheme], layers: dict[str, nn.Linear], gs_key: dict[str, str]) -> None:
    for name, s in schemes.items():
        in_f = layers[name].in_features
        if s.group_size == -1 or in_f % s.group_size == 0:
            continue
        key = gs_key[name]
        same_key = [layers[n].in_features for n in schemes if gs_key[n] == key]
        valid = [str(g) for g in COMMON_GROUP_SIZES if all(d % g == 0 for d in same_key)] + ["-1"]
        raise ConfigError(key, s.group_size,
                          f"group sizes that divide every layer it applies to in this model: {', '.join(valid)}",
                          f"e.g. {key}={valid[-2] if len(valid) > 1 else '-1'}",
                          problem=f"does not divide the input dimension {in_f} of layer {name}")


def plan_quantization(model: nn.Module, cfg: QuantScheme) -> QuantPlan:
    """Resolve every quantized Linear's scheme; raises ConfigError for a bad override or group size.

    Args:
        model: a Hugging Face causal LM (weights may be on the meta device).
        cfg: the quant config (bits, group_size, sym, overrides, quantize_lm_head).
    Returns:
        QuantPlan with full layer names.
    """
    blocks_name, num_blocks, layers, head, outside = _candidates(model, cfg)
    schemes, skipped, gs_key = _apply_overrides(cfg, layers, outside)
    _check_group_sizes(schemes, layers, gs_key)
    return QuantPlan(blocks_name, num_blocks, schemes, sorted(skipped + outside), head)
