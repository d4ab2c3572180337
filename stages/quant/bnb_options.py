"""The bitsandbytes methods' fixed schemes and config rules (torch-free: config validation imports it).

bitsandbytes quantizes at load time (transformers' BitsAndBytesConfig), so of the quant config it
uses only the method, quant.bnb.* and a scheme it cannot change:

  bnb_nf4   4-bit NormalFloat, one absmax scale per block of 64 consecutive weights (symmetric)
  bnb_int8  LLM.int8(): int8 weights, one absmax scale per output row (symmetric)

A bits / group_size / sym that differs from that scheme, per-layer overrides, lm_head quantization
or a pack format other than `auto` (which writes bitsandbytes' own serialisation) are errors.
The tuning and GPTQ options are not used: a value other than the method's default is named in a
note that the quantize stage logs (so one sweep can set quant.iters for AutoRound rows and run a
bnb row beside them).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from core.errors import ConfigError


@dataclass(frozen=True)
class BnbScheme:
    """What one bitsandbytes method stores."""

    quant_type: str  # nf4 | int8
    bits: int
    group_size: int  # weights per absmax scale; -1 = one per output row
    title: str  # for tables: "bitsandbytes NF4"


BNB_SCHEMES: dict[str, BnbScheme] = {
    "bnb_nf4": BnbScheme("nf4", 4, 64, "bitsandbytes NF4"),
    "bnb_int8": BnbScheme("int8", 8, -1, "bitsandbytes LLM.int8"),
}
SCHEME_KEYS = ("bits", "group_size", "sym")
# Changes which layers are quantized, or how: bitsandbytes cannot honour them.
UNSUPPORTED_KEYS = ("overrides", "quantize_lm_head")
# quant.bnb options that only one of the two methods reads.
BNB_OPTION_OF = {"double_quant": "bnb_nf4", "int8_threshold": "bnb_int8"}


def _defaults(method: str) -> Any:
    from core.schema import BnbConfig, QuantConfig

    s = BNB_SCHEMES[method]
    return QuantConfig(method=method, bits=s.bits, group_size=s.group_size, sym=True, iters=0), BnbConfig()


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def ignored_keys(q: Any) -> list[str]:
    """`key=value` for every quant option a bitsandbytes method does not use that differs from its default."""
    ref, ref_bnb = _defaults(q.method)
    skip = {"method", "bnb", *SCHEME_KEYS, *UNSUPPORTED_KEYS}
    out = [f"quant.{f.name}={_show(getattr(q, f.name))}" for f in fields(ref)
           if f.name not in skip and getattr(q, f.name) != getattr(ref, f.name)]
    for name, method in BNB_OPTION_OF.items():
        if method != q.method and getattr(q.bnb, name) != getattr(ref_bnb, name):
            out.append(f"quant.bnb.{name}={_show(getattr(q.bnb, name))}")
    return out


def ignored_note(q: Any) -> str:
    """The logged note for `ignored_keys`, or '' when nothing is ignored."""
    keys = ignored_keys(q)
    if not keys:
        return ""
    return (f"{', '.join(keys)}: not used by quant.method={q.method} (bitsandbytes quantizes at load time: no "
            "calibration, no tuning, no GPTQ options)")


def check_bnb_config(cfg: Any) -> None:
    """ConfigError for a scheme, layer option or pack format a bitsandbytes method cannot honour."""
    q, p = cfg.quant, cfg.pack
    s = BNB_SCHEMES[q.method]
    expected = {"bits": s.bits, "group_size": s.group_size, "sym": True}
    for key in SCHEME_KEYS:
        if getattr(q, key) != expected[key]:
            raise ConfigError(f"quant.{key}", _show(getattr(q, key)),
                              f"{s.title} stores bits={s.bits}, group_size={s.group_size}, sym=true only",
                              f"use quant.{key}={_show(expected[key])} (the value in conf/quant/{q.method}.yaml), or "
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
        raise ConfigError(key, value, f"auto: a bitsandbytes model is saved in bitsandbytes' own serialisation "
                          "(transformers save_pretrained), never as GPTQ or auto-round tensors",
                          f"use {key}=auto", problem=f"cannot hold a quant.method={q.method} checkpoint")
