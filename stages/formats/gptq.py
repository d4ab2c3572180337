"""The GPTQ checkpoint format: bit packing, per-layer tensors, quantization_config, `pack_gptq`.

Per quantized Linear (W [out, in], groups along the input dimension):
  qweight  int32   [in*bits/32, out]   codes packed down the input dim, LSB first
  qzeros   int32   [groups, out*bits/32]  zero points packed along the output dim, storing zero-1 (v1)
  scales   float16 [groups, out]
  g_idx    int32   [in]               group of each input column (natural order unless act-order)
  bias     (model dtype) [out]        unchanged, when the Linear has one

Packing is one rule for every width: the values of a column form a little-endian bit stream,
value k at bits [k*bits, (k+1)*bits), cut into 32-bit words. For 2/4/8 bits that is 32/bits
whole values per word; for 3 bits it is the standard cross-word layout (32 values in 3
words; values 10 and 21 straddle a word boundary), exactly what AutoGPTQ, GPTQModel,
vLLM and Intel's auto-round read and write.

GPTQ v1 stores zero-1, so an asym zero point of 0 cannot be stored: the v1 layout is written
for sym layers only (their zero 2^(b-1) is always storable). `checkpoint_format: gptq_v2`
(GPTQModel's convention) stores zeros as they are and takes asym layers exactly, g_idx included.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from core.errors import InputError
from stages.formats.source import QStateReader, SourceModel, check_layer_values, check_qstate_matches_model
from core.schema import GPTQConfig, QuantScheme
from stages.formats.writer import LayerRecord, PackOptions, PackResult, tensor_nbytes, write_checkpoint
from stages.quant.base import LayerScheme, QuantizedLayer
from stages.quant.qdq import group_index

GPTQ_BITS = (2, 3, 4, 8)
V1_ZERO_OFFSET = 1  # GPTQ v1 stores zero - 1
V2_ZERO_OFFSET = 0  # GPTQ v2 (checkpoint_format gptq_v2) stores zeros as they are
# vLLM fuses these sibling Linears into one layer, so a per-layer rule must hold for all of them.
FUSED_FAMILIES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_MASK32 = 0xFFFFFFFF


def _word_positions(bits: int) -> list[tuple[int, int]]:
    """(word, shift) of value k (0..31) in a 32-value block of `bits`-bit values."""
    return [divmod(k * bits, 32) for k in range(32)]


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers [K, N] in [0, 2^bits) -> int32 [K*bits/32, N], packed down each column (see module doc).

    Args:
        values: any integer dtype; K must be a multiple of 32.
    """
    k_dim, n_dim = values.shape
    if k_dim % 32:
        raise ValueError(f"packed dimension {k_dim} is not a multiple of 32")
    if 32 % bits == 0:  # whole values per word: one vectorised shift-and-sum
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device).view(1, per_word, 1)
        words = (values.to(torch.int64).reshape(k_dim // per_word, per_word, n_dim) << shifts).sum(dim=1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    v = values.to(torch.int64).reshape(k_dim // 32, 32, n_dim)
    words = torch.zeros(k_dim // 32, bits, n_dim, dtype=torch.int64, device=values.device)
    for k, (w, s) in enumerate(_word_positions(bits)):
        words[:, w] |= v[:, k] << s
        if s + bits > 32:  # the value straddles into the next word
            words[:, w + 1] |= v[:, k] >> (32 - s)
    words &= _MASK32
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).reshape(k_dim // 32 * bits, n_dim)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K*bits/32, N] -> uint8 [K, N]; inverse of `pack_rows`."""
    rows, n_dim = packed.shape
    if rows % bits:
        raise ValueError(f"{rows} packed rows do not hold whole 32-value blocks of {bits}-bit values")
    mask = 2**bits - 1
    if 32 % bits == 0:  # arithmetic shifts are fine: the mask drops the sign-extended bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device).view(1, 32 // bits, 1)
        return ((packed.unsqueeze(1) >> shifts) & mask).to(torch.uint8).reshape(rows * 32 // bits, n_dim)
    words = packed.to(torch.int64).reshape(rows // bits, bits, n_dim) & _MASK32
    out = torch.empty(rows // bits, 32, n_dim, dtype=torch.uint8, device=packed.device)
    for k, (w, s) in enumerate(_word_positions(bits)):
        v = words[:, w] >> s
        if s + bits > 32:
            v = v | (words[:, w + 1] << (32 - s))
        out[:, k] = (v & mask).to(torch.uint8)
    return out.reshape(rows // bits * 32, n_dim)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [out, in] -> qweight int32 [in*bits/32, out]."""
    return pack_rows(codes.t(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight int32 [in*bits/32, out] -> codes uint8 [out, in]."""
    return unpack_rows(qweight, bits).t().contiguous()


def pack_qzeros(zero: torch.Tensor, bits: int, offset: int = V1_ZERO_OFFSET) -> torch.Tensor:
    """Zero points [out, groups] -> qzeros int32 [groups, out*bits/32] storing zero-offset.

    With offset 1 (v1) a zero of 0 is stored as 0 (it cannot be stored; see module doc).
    """
    stored = (zero.to(torch.int64) - offset).clamp(0, 2**bits - 1)
    return pack_rows(stored, bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, offset: int = V1_ZERO_OFFSET) -> torch.Tensor:
    """qzeros int32 [groups, out*bits/32] -> zero points int32 [out, groups] (stored + offset)."""
    return unpack_rows(qzeros.t(), bits).to(torch.int32) + offset


def check_zero_storable(qstate: QStateReader, offset: int, what: str) -> None:
    """A layout that stores zero-`offset` (GPTQ v1: offset 1) cannot hold asym layers exactly.

    Raises:
        InputError naming the asym layers and the formats that store them as they are.
    """
    asym = [n for n in qstate.names if not qstate.scheme(n).sym]
    if offset and asym:
        raise InputError(f"{what} stores zero-1 (GPTQ v1), so an asym zero point of 0 cannot be stored; the qstate "
                         f"has {len(asym)} asym layers (e.g. {asym[0]}). Use pack.format=auto (exact for every "
                         "scheme), pack.format=gptq_v2, or quantize with quant.sym=true")


def pack_layer_tensors(name: str, layer: QuantizedLayer, zero_offset: int = V1_ZERO_OFFSET,
                       with_g_idx: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one Linear in the GPTQ layout (keys prefixed with `name.`; a bias is copied
    by the writer like any unquantized tensor, under its own key `name.bias`)."""
    bits = layer.scheme.bits
    out = {
        f"{name}.qweight": pack_qweight(layer.codes, bits),
        f"{name}.qzeros": pack_qzeros(layer.zero, bits, zero_offset),
        f"{name}.scales": layer.scale.t().contiguous().to(torch.float16),
    }
    if with_g_idx:
        in_f = layer.codes.shape[1]
        g = layer.g_idx if layer.g_idx is not None else group_index(in_f, layer.scheme.group_size)
        out[f"{name}.g_idx"] = g.to(torch.int32).contiguous()
    return out


def unpack_layer_tensors(tensors: dict[str, torch.Tensor], scheme: LayerScheme,
                         zero_offset: int = V1_ZERO_OFFSET) -> QuantizedLayer:
    """GPTQ-layout tensors (keys qweight, qzeros, scales, optional g_idx) -> QuantizedLayer.

    g_idx is kept only when it differs from the natural order.
    """
    codes = unpack_qweight(tensors["qweight"], scheme.bits)
    zero = unpack_qzeros(tensors["qzeros"], scheme.bits, zero_offset)
    scale = tensors["scales"].t().float()
    g_idx = tensors.get("g_idx")
    natural = group_index(codes.shape[1], scheme.group_size, device=codes.device)
    if g_idx is not None and torch.equal(g_idx.to(torch.int32), natural):
        g_idx = None
    return QuantizedLayer(codes, scale, zero.float(), scheme, None if g_idx is None else g_idx.to(torch.int32))


def gptq_layer_bytes(out_features: int, in_features: int, bits: int, group_size: int, g_idx: bool = True) -> int:
    """Exact bytes of one packed Linear's tensors (qweight + qzeros + scales [+ g_idx]), from its shape alone."""
    groups = 1 if group_size == -1 else in_features // group_size
    qweight = in_features * bits // 32 * out_features * 4
    qzeros = groups * out_features * bits // 32 * 4
    scales = groups * out_features * 2
    return qweight + qzeros + scales + (in_features * 4 if g_idx else 0)


def check_packable(qstate: QStateReader, allowed_bits: tuple[int, ...], fmt: str) -> None:
    """Bits the format stores, and dims the int32 packing needs (multiples of 32)."""
    bad_bits = sorted({qstate.scheme(n).bits for n in qstate.names} - set(allowed_bits))
    if bad_bits:
        raise InputError(f"pack.format={fmt} stores {', '.join(map(str, allowed_bits))}-bit weights; the qstate has "
                         f"{', '.join(map(str, bad_bits))}-bit layers")
    odd = [f"{n} {list(qstate.shape(n))}" for n in qstate.names if any(d % 32 for d in qstate.shape(n))]
    if odd:
        raise InputError(f"pack.format={fmt} packs 32 values per word group, so in/out features must be multiples "
                         f"of 32; these layers are not: {'; '.join(odd[:5])}. Leave them unquantized with "
                         "quant.overrides=[{pattern: '<regex>', skip: true}]")


def check_lm_head(qstate: QStateReader, source: SourceModel, fmt: str) -> None:
    """A quantized lm_head cannot share its weight with the input embeddings."""
    if any(is_lm_head(n) for n in qstate.names) and source.config.get("tie_word_embeddings"):
        raise InputError(f"the qstate quantizes lm_head, but the model ties it to the input embeddings "
                         f"(tie_word_embeddings=true); pack.format={fmt} cannot express a quantized tied head. "
                         "Set quant.quantize_lm_head=false")


def is_lm_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


def base_scheme(qstate: QStateReader, recipe: Optional[QuantScheme]) -> LayerScheme:
    """The checkpoint's default scheme: the run's when some layer uses it, else the most common one."""
    counts = Counter(qstate.scheme(n) for n in qstate.names)
    chosen = LayerScheme(recipe.bits, recipe.group_size, recipe.sym) if recipe is not None else None
    if chosen in counts:
        return chosen
    return counts.most_common(1)[0][0]


def _block_parts(name: str, blocks: Optional[str]) -> Optional[tuple[int, str]]:
    if blocks and name.startswith(blocks + "."):
        idx, _, rel = name[len(blocks) + 1:].partition(".")
        if idx.isdigit() and rel:
            return int(idx), rel
    return None


def _with_fused_names(rels: set[str]) -> set[str]:
    """Add vLLM's fused module name when every sibling of a family is in the set."""
    out = set(rels)
    parents = defaultdict(set)
    for rel in rels:
        parent, _, leaf = rel.rpartition(".")
        parents[parent].add(leaf)
    for parent, leaves in parents.items():
        for fused, members in FUSED_FAMILIES.items():
            if set(members) <= leaves:
                out.add(f"{parent}.{fused}" if parent else fused)
    return out


def layer_patterns(names: list[str], blocks: Optional[str]) -> list[str]:
    """Compact anchored regexes matching exactly `names` (plus vLLM's fused names of complete families).

    Layers of decoder blocks are grouped by block index: ^model\\.layers\\.(?:0|3)\\.(?:mlp\\.down_proj)$
    """
    by_index: dict[int, set[str]] = defaultdict(set)
    loose = []
    for n in names:
        parts = _block_parts(n, blocks)
        if parts is None:
            loose.append(n)
        else:
            by_index[parts[0]].add(parts[1])
    by_rels: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for idx, rels in by_index.items():
        by_rels[tuple(sorted(_with_fused_names(rels)))].append(idx)
    patterns = []
    for rels, idxs in sorted(by_rels.items(), key=lambda kv: sorted(kv[1])):
        idx_alt = "|".join(str(i) for i in sorted(idxs))
        rel_alt = "|".join(re.escape(r) for r in rels)
        patterns.append(f"^{re.escape(blocks)}\\.(?:{idx_alt})\\.(?:{rel_alt})$")
    patterns += [f"^{re.escape(n)}$" for n in sorted(loose)]
    return patterns


def dynamic_rules(qstate: QStateReader, base: LayerScheme, desc_act: bool) -> dict[str, dict[str, Any]]:
    """GPTQModel/vLLM `dynamic`: "-:regex" skips a module, "+:regex" overrides its bits/group_size/sym/desc_act.

    Readers take the first rule whose regex `re.match`es the module name, so negative rules
    come first. Only block Linears left unquantized need a negative rule (others never are).
    """
    rules: dict[str, dict[str, Any]] = {}
    skipped_in_blocks = [n for n in qstate.skipped if _block_parts(n, qstate.blocks) is not None]
    for pat in layer_patterns(skipped_in_blocks, qstate.blocks):
        rules[f"-:{pat}"] = {}
    groups: dict[tuple[LayerScheme, bool], list[str]] = defaultdict(list)
    for n in qstate.names:
        key = (qstate.scheme(n), qstate.act_order(n))
        if key != (base, desc_act):
            groups[key].append(n)
    for (s, act), names in sorted(groups.items(), key=lambda kv: kv[1][0]):
        for pat in layer_patterns(names, qstate.blocks):
            rules[f"+:{pat}"] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, "desc_act": act}
    return rules


def gptq_quantization_config(qstate: QStateReader, recipe: Optional[QuantScheme]) -> dict[str, Any]:
    """quantization_config / quantize_config.json for a GPTQ v1 checkpoint, written from the run's recipe."""
    base = base_scheme(qstate, recipe)
    desc_act = any(qstate.act_order(n) for n in qstate.names)
    cfg: dict[str, Any] = {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": base.bits, "group_size": base.group_size,
        "sym": base.sym, "desc_act": desc_act,
        "true_sequential": recipe.true_sequential if isinstance(recipe, GPTQConfig) else True,
        "lm_head": any(is_lm_head(n) for n in qstate.names),
    }
    if isinstance(recipe, GPTQConfig):
        cfg["damp_percent"] = recipe.damp_percent
        cfg["static_groups"] = recipe.static_groups
    dynamic = dynamic_rules(qstate, base, desc_act)
    if dynamic:
        cfg["dynamic"] = dynamic
    # No GPTQModel-style "meta" key: transformers' AutoRoundConfig reads its presence as "not GPTQ v1"
    # and refuses the checkpoint. Who made it is recorded in packing.json instead.
    return cfg


class GPTQLayout:
    """Layout for write_checkpoint: GPTQ tensors and config, v1 (zero-1, sym only) or v2 (zeros as they are)."""

    config_file = "quantize_config.json"  # what AutoGPTQ/GPTQModel and vLLM look for next to config.json

    def __init__(self, checkpoint_format: str = "gptq"):
        self.name = self.packing_format = checkpoint_format
        self.zero_offset = V2_ZERO_OFFSET if checkpoint_format == "gptq_v2" else V1_ZERO_OFFSET

    def check(self, qstate: QStateReader, source: SourceModel) -> None:
        check_qstate_matches_model(qstate, source)
        check_packable(qstate, GPTQ_BITS, self.name)
        check_lm_head(qstate, source, self.name)
        check_zero_storable(qstate, self.zero_offset, f"pack.format={self.name}")

    def pack_layer(self, name: str, layer: QuantizedLayer) -> tuple[dict[str, torch.Tensor], LayerRecord]:
        check_layer_values(name, layer)
        tensors = pack_layer_tensors(name, layer, self.zero_offset)
        record = LayerRecord(layer.scheme, layer.g_idx is not None, tuple(layer.codes.shape),
                             sum(tensor_nbytes(t) for t in tensors.values()))
        return tensors, record

    def unpack_layer(self, tensors: dict[str, torch.Tensor], scheme: LayerScheme) -> QuantizedLayer:
        return unpack_layer_tensors(tensors, scheme, self.zero_offset)

    def quantization_config(self, qstate: QStateReader, recipe: QuantScheme) -> dict[str, Any]:
        cfg = gptq_quantization_config(qstate, recipe)
        cfg["checkpoint_format"] = self.name
        return cfg


def pack_gptq_v2(qstate: QStateReader, source: SourceModel, out: Path, options: PackOptions,
                 recipe: Optional[QuantScheme], identity: str, progress: Optional[Callable[[str], None]] = None) -> PackResult:
    """Write a GPTQ checkpoint with `checkpoint_format: gptq_v2` (zeros as they are: asym is exact);
    otherwise the same contract as `pack_gptq`."""
    return write_checkpoint(GPTQLayout("gptq_v2"), qstate, source, out, options, recipe, identity, progress)


def pack_gptq(qstate: QStateReader, source: SourceModel, out: Path, options: PackOptions,
              recipe: Optional[QuantScheme], identity: str, progress: Optional[Callable[[str], None]] = None) -> PackResult:
    """Write a GPTQ v1 checkpoint folder (sharded safetensors, config.json with quantization_config,
    quantize_config.json, tokenizer and generation files) at `out`, atomically.

    Args:
        qstate: the quantize stage's output; source: the unquantized model's files.
        options: dtype of the unquantized tensors and the shard size.
        recipe: the run's quant settings (None: derived from the qstate).
        identity: what defines this output; an existing `out` with another identity is an InputError.
    Returns:
        PackResult (files, per-layer records, sizes).
    Raises:
        InputError for asym layers (v1 cannot store a zero point of 0; see `check_zero_storable`).
    """
    return write_checkpoint(GPTQLayout(), qstate, source, out, options, recipe, identity, progress)
