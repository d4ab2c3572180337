"""The bitsandbytes methods' fixed schemes and config rules (torch-free: config validation imports it).

bitsandbytes quantizes at load time (transformers' BitsAndBytesConfig), so of the quant config it
uses only the method, its own option (quant.double_quant | quant.int8_threshold) and a fixed scheme:

  bnb_nf4   4-bit NormalFloat, one absmax scale per block of 64 consecutive weights (symmetric)
  bnb_int8  LLM.int8(): int8 weights, one absmax scale per output row (symmetric)

A bits / group_size / sym that differs from that scheme, per-layer overrides, lm_head quantization
or a pack format other than `auto` (which writes bitsandbytes' own serialisation) are errors; the
tuning and GPTQ options are not keys of these methods' configs (core/schema.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError
from core.schema import QUANT_CONFIGS


@dataclass(frozen=True)
class BnbScheme:
    """What one bitsandbytes method stores (bits and group size: its config class's fixed defaults)."""

    method: str
    quant_type: str  # nf4 | int8
    title: str  # for tables: "bitsandbytes NF4"

    @property
    def bits(self) -> int:
        return QUANT_CONFIGS[self.method]().bits

    @property
    def group_size(self) -> int:
        """Weights per absmax scale; -1 = one per output row."""
        return QUANT_CONFIGS[self.method]().group_size


BNB_SCHEMES: dict[str, BnbScheme] = {
    "bnb_nf4": BnbScheme("bnb_nf4", "nf4", "bitsandbytes NF4"),
    "bnb_int8": BnbScheme("bnb_int8", "int8", "bitsandbytes LLM.int8"),
}
SCHEME_KEYS = ("bits", "group_size", "sym")


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_bnb_config(cfg: Any) -> None:
    """ConfigError for a scheme, layer option or pack format a bitsandbytes method cannot honour."""
    q, p = cfg.quant, cfg.pack
    s = BNB_SCHEMES[q.method]
    fixed = QUANT_CONFIGS[q.method]()
    expected = {key: getattr(fixed, key) for key in SCHEME_KEYS}
    for key in SCHEME_KEYS:
        if getattr(q, key) != expected[key]:
            raise ConfigError(f"quant.{key}", _show(getattr(q, key)),
                              f"{s.title} stores bits={fixed.bits}, group_size={fixed.group_size}, sym=true only",
                              f"use quant.{key}={_show(expected[key])} (the value core/schema.py fixes for it), or "
                              "quant=rtn|gptq|autoround for other schemes", problem=f"is not possible with quant.method={q.method}")
    if q.overrides:
        raise ConfigError("quant.overrides", f"[{len(q.overrides)} entries]", "no per-layer overrides: bitsandbytes "
                          "quantizes every Linear of the decoder blocks with one scheme",
                          "remove quant.overrides", problem=f"is not possible with quant.method={q.method}")
    if q.quantize_lm_head:
        raise ConfigError("quant.quantize_lm_head", "true", "false: transformers keeps the output head of a "
                          "bitsandbytes model unquantized", "set quant.quantize_lm_head=false",
                          problem=f"is not possible with quant.method={q.method}")
    if p.format != "auto" or p.packing_format != "auto":
        key, value = ("pack.format", p.format) if p.format != "auto" else ("pack.packing_format", p.packing_format)
        raise ConfigError(key, value, "auto: a bitsandbytes model is saved in bitsandbytes' own serialisation "
                          "(transformers save_pretrained), never as GPTQ or auto-round tensors",
                          f"use {key}=auto", problem=f"cannot hold a quant.method={q.method} checkpoint")
