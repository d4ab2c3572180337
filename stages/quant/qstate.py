"""The quantize stage's output format: `qstate.safetensors` + `layers.json`.

qstate.safetensors, per quantized Linear (full module name, e.g. model.layers.0.mlp.up_proj):
  <name>.codes  uint8   [out, in]      integer codes in [0, 2^bits - 1]
  <name>.scale  float16 [out, groups]  (may be negative for sym, see stages.quant.qdq)
  <name>.zero   uint8   [out, groups]  integer zero points in [0, 2^bits - 1]
  <name>.g_idx  int32   [in]           only for act-order (GPTQ desc_act) layers
layers.json:
  {"layers": {name: {"bits", "group_size", "sym", "shape": [out, in], "act_order"}},
   "skipped": [names of Linears left in full precision], "blocks": "<prefix of decoder blocks>",
   "num_blocks": N, "method": "autoround" | "gptq" | "rtn"}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load_file, save_file

from stages.quant.base import LayerScheme, QuantizedLayer

QSTATE_FILE = "qstate.safetensors"
LAYERS_FILE = "layers.json"


def layer_tensors(name: str, layer: QuantizedLayer) -> dict[str, torch.Tensor]:
    out = {
        f"{name}.codes": layer.codes.to(torch.uint8).contiguous().cpu(),
        f"{name}.scale": layer.scale.to(torch.float16).contiguous().cpu(),
        f"{name}.zero": layer.zero.to(torch.uint8).contiguous().cpu(),
    }
    if layer.g_idx is not None:
        out[f"{name}.g_idx"] = layer.g_idx.to(torch.int32).contiguous().cpu()
    return out


def layer_record(layer: QuantizedLayer) -> dict[str, Any]:
    s = layer.scheme
    return {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, "shape": list(layer.codes.shape),
            "act_order": layer.g_idx is not None}


def save_qstate(folder: Path, layers: dict[str, QuantizedLayer], meta: dict[str, Any]) -> None:
    """Write qstate.safetensors and layers.json (meta: skipped, blocks, num_blocks, method)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors.update(layer_tensors(name, layer))
    save_file(tensors, str(Path(folder) / QSTATE_FILE))
    record = {"layers": {n: layer_record(l) for n, l in layers.items()}, **meta}
    (Path(folder) / LAYERS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))


def load_qstate(folder: Path) -> tuple[dict[str, QuantizedLayer], dict[str, Any]]:
    """Read a qstate back: (name -> QuantizedLayer with float32 scale/zero, layers.json dict)."""
    folder = Path(folder)
    meta = json.loads((folder / LAYERS_FILE).read_text())
    tensors = load_file(str(folder / QSTATE_FILE))
    layers = {}
    for name, rec in meta["layers"].items():
        scheme = LayerScheme(rec["bits"], rec["group_size"], rec["sym"])
        layers[name] = QuantizedLayer(
            codes=tensors[f"{name}.codes"], scale=tensors[f"{name}.scale"].float(),
            zero=tensors[f"{name}.zero"].float(), scheme=scheme, g_idx=tensors.get(f"{name}.g_idx"),
        )
    return layers, meta


COPY_CHUNK = 1 << 24  # bytes per read when concatenating files


def read_safetensors_header(fh: BinaryIO) -> tuple[int, dict[str, Any]]:
    """(offset of the data buffer, the JSON header) of an open safetensors file (format: an 8-byte
    little-endian header length, the JSON header, then the tensors' bytes)."""
    size = int.from_bytes(fh.read(8), "little")
    return 8 + size, json.loads(fh.read(size))


def concat_safetensors(parts: list[tuple[Path, str]], out: Path) -> None:
    """One safetensors file with every tensor of `parts` (names prefixed), written by copying bytes in chunks.

    Args:
        parts: (file, prefix for its tensor names), in the order the tensors are written.
        out: the file to write (via a temporary name, renamed when complete).
    Memory stays at one chunk whatever the sizes; the result reads back like any safetensors file.
    """
    entries, header, offset = [], {}, 0
    for path, prefix in parts:
        with open(path, "rb") as fh:
            start, head = read_safetensors_header(fh)
        for name, info in head.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            header[prefix + name] = {"dtype": info["dtype"], "shape": info["shape"],
                                     "data_offsets": [offset, offset + end - begin]}
            entries.append((path, start + begin, end - begin))
            offset += end - begin
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data buffer starts 8-byte aligned, as safetensors writes it
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as dst:
        dst.write(len(blob).to_bytes(8, "little") + blob)
        for path, begin, length in entries:
            with open(path, "rb") as src:
                src.seek(begin)
                while length:
                    chunk = src.read(min(COPY_CHUNK, length))
                    if not chunk:
                        raise OSError(f"{path} ended early: it is truncated")
                    dst.write(chunk)
                    length -= len(chunk)
    os.replace(tmp, out)
