"""`pack.format=auto`: the layout that stores what was quantized exactly and that engines serve best.

  every layer sym                -> gptq      (GPTQ v1: vLLM Marlin/Machete for 4/8-bit, every GPTQ reader)
  asym, with act-order g_idx     -> gptq_v2   (zeros as they are, g_idx kept)
  asym otherwise                 -> auto_round (packing_format auto: AWQ layout when every layer is
                                                4-bit, which vLLM serves; else zeros as they are)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional

from stages.formats.source import QStateReader, SourceModel
from core.schema import QuantScheme
from stages.formats.writer import PackOptions, PackResult


def exact_format(sym_flags: Iterable[bool], act_order: bool) -> str:
    """The pack.format that `auto` resolves to, from each layer's sym flag and whether any layer has g_idx."""
    if all(sym_flags):
        return "gptq"
    return "gptq_v2" if act_order else "auto_round"


def qstate_format(qstate: QStateReader) -> str:
    """exact_format for the layers of a qstate."""
    return exact_format((qstate.scheme(n).sym for n in qstate.names), any(qstate.act_order(n) for n in qstate.names))


def pack_auto(qstate: QStateReader, source: SourceModel, out: Path, options: PackOptions, recipe: Optional[QuantScheme],
              identity: str, progress: Optional[Callable[[str], None]] = None) -> PackResult:
    """Pack with the format `qstate_format` picks (same contract as pack_gptq / pack_auto_round)."""
    from stages.registry import PACK_FORMATS, resolve

    fmt = qstate_format(qstate)
    if progress:
        progress(f"pack.format=auto -> {fmt}")
    return resolve(PACK_FORMATS, "pack.format", fmt)(qstate, source, out, options, recipe, identity, progress)
