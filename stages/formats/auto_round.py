"""Intel auto-round's native checkpoint format (`quant_method: auto-round`), as auto-round 0.16 writes it.

config.json's quantization_config: quant_method "auto-round", bits, group_size, sym,
data_type "int", block_name_to_quantize, packing_format, and `extra_config` {layer name:
{bits, group_size, sym}} for layers that differ from the default (bits 16 = left in full
precision). The tensors depend on `packing_format`, which auto-round picks from the scheme:

  auto_round:auto_gptq  (sym)           GPTQ layout, qzeros store zero-1 (v1), no g_idx
  auto_round:auto_awq   (asym, 4-bit)   AWQ layout: qweight int32 [in, out/8] packed along the
                                        output dim in the interleaved order 0,2,4,6,1,3,5,7;
                                        qzeros int32 [groups, out/8] the same way, zeros as they are;
                                        scales float16 [groups, out]
  auto_round            (asym, other)   GPTQ layout with zeros stored as they are (no -1)

`pack.packing_format=auto` makes the same choice, decided by every layer (one asym layer
rules out auto_gptq, whose v1 zeros cannot hold a zero point of 0); naming one explicitly
is checked against what it can store (AWQ: 4-bit only; auto_gptq: sym only). No layout here
has g_idx, so act-order layers need pack.format=gptq or gptq_v2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from core.errors import ConfigError, InputError, choices
from stages.formats.gptq import (
    GPTQ_BITS, base_scheme, check_lm_head, check_packable, check_zero_storable, is_lm_head, pack_layer_tensors,
    unpack_layer_tensors,
)
from stages.formats.source import QStateReader, SourceModel, check_layer_values, check_qstate_matches_model
from core.schema import AutoRoundConfig, QuantScheme
from stages.formats.writer import LayerRecord, PackOptions, PackResult, tensor_nbytes, write_checkpoint
from stages.quant.base import LayerScheme, QuantizedLayer
from stages.registry import PACKING_FORMATS

AUTO_GPTQ = "auto_round:auto_gptq"
AUTO_AWQ = "auto_round:auto_awq"
AUTO_ROUND = "auto_round"
ZERO_OFFSET = {AUTO_GPTQ: 1, AUTO_AWQ: 0, AUTO_ROUND: 0}
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p of a word holds column AWQ_PACK_ORDER[p] of its 8
AWQ_BITS = 4


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """4-bit integers [K, N] -> int32 [K, N/8], 8 columns per word in AWQ's interleaved order."""
    k_dim, n_dim = values.shape
    if n_dim % 8:
        raise ValueError(f"AWQ packs 8 columns per word; {n_dim} columns is not a multiple of 8")
    v = values.to(torch.int64).reshape(k_dim, n_dim // 8, 8)
    words = torch.zeros(k_dim, n_dim // 8, dtype=torch.int64, device=values.device)
    for p, col in enumerate(AWQ_PACK_ORDER):
        words |= v[:, :, col] << (4 * p)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [K, N/8] -> uint8 [K, N]; inverse of `pack_awq`."""
    k_dim, words = packed.shape
    w = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(k_dim, words, 8, dtype=torch.uint8, device=packed.device)
    for p, col in enumerate(AWQ_PACK_ORDER):
        out[:, :, col] = ((w >> (4 * p)) & 0xF).to(torch.uint8)
    return out.reshape(k_dim, words * 8)


def pack_awq_layer(name: str, layer: QuantizedLayer) -> dict[str, torch.Tensor]:
    """qweight [in, out/8], qzeros [groups, out/8] (zeros as they are), scales [groups, out] float16."""
    return {
        f"{name}.qweight": pack_awq(layer.codes.t()),
        f"{name}.qzeros": pack_awq(layer.zero.t()),
        f"{name}.scales": layer.scale.t().contiguous().to(torch.float16),
    }


def unpack_awq_layer(tensors: dict[str, torch.Tensor], scheme: LayerScheme) -> QuantizedLayer:
    """AWQ-layout tensors (qweight, qzeros, scales) -> QuantizedLayer."""
    codes = unpack_awq(tensors["qweight"]).t().contiguous()
    zero = unpack_awq(tensors["qzeros"]).t().float()
    return QuantizedLayer(codes, tensors["scales"].t().float(), zero, scheme)


def unpack_auto_round_layer(tensors: dict[str, torch.Tensor], scheme: LayerScheme, packing_format: str) -> QuantizedLayer:
    """Tensors of one layer in any auto-round packing_format -> QuantizedLayer."""
    if packing_format == AUTO_AWQ:
        return unpack_awq_layer(tensors, scheme)
    return unpack_layer_tensors(tensors, scheme, ZERO_OFFSET[packing_format])


def choose_packing_format(qstate: QStateReader, requested: str) -> str:
    """auto: what auto-round 0.16 picks, decided over every layer (all sym -> auto_gptq; any asym
    with every layer 4-bit -> auto_awq; else auto_round). An explicit choice must store every layer exactly.
    """
    if requested not in PACKING_FORMATS:
        raise ConfigError("pack.packing_format", requested, choices(PACKING_FORMATS), "e.g. pack.packing_format=auto")
    all_4bit = all(qstate.scheme(n).bits == AWQ_BITS for n in qstate.names)
    if requested == "auto":
        if all(qstate.scheme(n).sym for n in qstate.names):
            return AUTO_GPTQ
        return AUTO_AWQ if all_4bit else AUTO_ROUND
    check_zero_storable(qstate, ZERO_OFFSET[requested], f"pack.packing_format={requested}")
    if requested == AUTO_AWQ and not all_4bit:
        bits = sorted({qstate.scheme(n).bits for n in qstate.names})
        raise InputError(f"pack.packing_format={AUTO_AWQ} stores 4-bit weights only; the qstate has "
                         f"{', '.join(map(str, bits))}-bit layers. Use pack.packing_format={AUTO_ROUND} "
                         "(any width, zeros stored as they are) or pack.format=gptq")
    return requested


def extra_config(qstate: QStateReader, base: LayerScheme) -> dict[str, dict[str, Any]]:
    """Per-layer entries (exact module names) for layers that differ from the default scheme."""
    out: dict[str, dict[str, Any]] = {}
    for n in qstate.names:
        s = qstate.scheme(n)
        if s != base or is_lm_head(n):
            out[n] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, "data_type": "int"}
    blocks = qstate.blocks
    for n in qstate.skipped:
        if blocks and n.startswith(blocks + "."):
            out[n] = {"bits": 16, "data_type": "float"}
    return out


def auto_round_quantization_config(qstate: QStateReader, recipe: Optional[QuantScheme], packing_format: str) -> dict[str, Any]:
    """quantization_config in the keys auto-round writes, from the run's recipe."""
    base = base_scheme(qstate, recipe)
    cfg: dict[str, Any] = {
        "quant_method": "auto-round", "packing_format": packing_format, "bits": base.bits,
        "group_size": base.group_size, "sym": base.sym, "data_type": "int",
    }
    if qstate.blocks:
        cfg["block_name_to_quantize"] = qstate.blocks
    if isinstance(recipe, AutoRoundConfig):
        cfg["iters"] = recipe.iters
    extra = extra_config(qstate, base)
    if extra:
        cfg["extra_config"] = extra
    return cfg


class AutoRoundLayout:
    """Layout for write_checkpoint: auto-round native tensors and config."""

    name = "auto_round"
    config_file = "quantization_config.json"  # what auto-round writes and vLLM's INC config reads

    def __init__(self, requested: str = "auto"):
        self.requested = requested
        self.packing_format = requested

    def check(self, qstate: QStateReader, source: SourceModel) -> None:
        check_qstate_matches_model(qstate, source)
        check_packable(qstate, GPTQ_BITS, self.name)
        check_lm_head(qstate, source, self.name)
        act = [n for n in qstate.names if qstate.act_order(n)]
        if act:
            raise InputError(f"pack.format=auto_round has no g_idx, so act-order layers cannot be stored "
                             f"({len(act)} layers, e.g. {act[0]}); use pack.format=gptq or quant.act_order=false")

    def _resolve(self, qstate: QStateReader) -> str:
        self.packing_format = choose_packing_format(qstate, self.requested)
        return self.packing_format

    def pack_layer(self, name: str, layer: QuantizedLayer) -> tuple[dict[str, torch.Tensor], LayerRecord]:
        check_layer_values(name, layer)
        fmt = self.packing_format
        if fmt == AUTO_AWQ:
            tensors = pack_awq_layer(name, layer)
        else:
            tensors = pack_layer_tensors(name, layer, ZERO_OFFSET[fmt], with_g_idx=False)
        record = LayerRecord(layer.scheme, False, tuple(layer.codes.shape), sum(tensor_nbytes(t) for t in tensors.values()))
        return tensors, record

    def unpack_layer(self, tensors: dict[str, torch.Tensor], scheme: LayerScheme) -> QuantizedLayer:
        return unpack_auto_round_layer(tensors, scheme, self.packing_format)

    def quantization_config(self, qstate: QStateReader, recipe: Optional[QuantScheme]) -> dict[str, Any]:
        return auto_round_quantization_config(qstate, recipe, self._resolve(qstate))


def pack_auto_round(qstate: QStateReader, source: SourceModel, out: Path, options: PackOptions,
                    recipe: Optional[QuantScheme], identity: str,
                    progress: Optional[Callable[[str], None]] = None) -> PackResult:
    """Write an auto-round native checkpoint folder at `out`, atomically (same contract as pack_gptq).

    Args:
        options.packing_format: auto | auto_round:auto_gptq | auto_round:auto_awq | auto_round.
    Returns:
        PackResult; `packing_format` says which layout was written.
    """
    return write_checkpoint(AutoRoundLayout(options.packing_format), qstate, source, out, options, recipe,
                            identity, progress)
