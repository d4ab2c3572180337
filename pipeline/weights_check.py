"""Check a local model folder's safetensors files before any work: headers, sizes, the config.

Reads only the headers (the first bytes of each file), so it costs milliseconds even for a
large model. A truncated or corrupted file, a shard named in the index but missing, or
weights that do not fit `config.json` give one problem string for the caller's error.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Optional

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
INDEX_FILE = "model.safetensors.index.json"
EMBED_SUFFIX = "embed_tokens.weight"
Header = dict[str, tuple[str, list[int]]]  # tensor name -> (dtype, shape)


class WeightsProblem(ValueError):
    """What is wrong with one weights file, in words."""


def read_header(path: Path) -> Header:
    """The tensors a safetensors file declares, after checking that its bytes match the header.

    Raises:
        WeightsProblem: truncated header or data, bad JSON, offsets out of range, or a tensor
            whose byte range does not fit its dtype and shape.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsProblem(f"{path.name} is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise WeightsProblem(f"{path.name} is truncated inside its header ({size} bytes; the header alone "
                                 f"claims {8 + n})")
        try:
            meta = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsProblem(f"{path.name} has an unreadable header ({exc})") from None
    return _check_entries(path.name, meta, size - 8 - n)


def _check_entries(name: str, meta: Any, data_bytes: int) -> Header:
    if not isinstance(meta, dict):
        raise WeightsProblem(f"{name} has an unreadable header (not a JSON object)")
    out: Header = {}
    end_max = 0
    for tensor, info in meta.items():
        if tensor == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsProblem(f"{name} has an unreadable header entry for {tensor}") from None
        want = math.prod(shape) * DTYPE_BYTES[dtype] if dtype in DTYPE_BYTES else end - begin
        if not 0 <= begin <= end or end - begin != want:
            raise WeightsProblem(f"{name}: tensor {tensor} ({dtype} {shape}) has data offsets [{begin}, {end}], "
                                 f"which do not hold {want} bytes")
        end_max = max(end_max, end)
        out[tensor] = (dtype, shape)
    if end_max > data_bytes:
        raise WeightsProblem(f"{name} is truncated: its header describes {end_max} bytes of tensor data, "
                             f"the file holds {data_bytes}")
    if end_max < data_bytes:
        raise WeightsProblem(f"{name} has {data_bytes - end_max} bytes after its last tensor (a corrupted file)")
    return out


def _read_index(folder: Path) -> Optional[dict[str, str]]:
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise WeightsProblem(f"{INDEX_FILE} is unreadable ({type(exc).__name__}: {exc})") from None
    return {str(k): str(v) for k, v in weight_map.items()}


def _check_index(folder: Path, weight_map: dict[str, str], headers: dict[str, Header]) -> None:
    for tensor, shard in sorted(weight_map.items()):
        if shard not in headers:
            raise WeightsProblem(f"{INDEX_FILE} names {shard} (for {tensor}), which is not in the folder")
        if tensor not in headers[shard]:
            raise WeightsProblem(f"{INDEX_FILE} puts {tensor} in {shard}, which does not hold it")


def _text_config(config: dict) -> dict:
    """Multimodal configs keep the language model's sizes under text_config."""
    return config.get("text_config") if isinstance(config.get("text_config"), dict) else config


def _check_against_config(config: dict, tensors: Header) -> None:
    """The embedding's shape, and the decoder layers beside it, must match config.json."""
    cfg = _text_config(config)
    vocab, hidden, layers = cfg.get("vocab_size"), cfg.get("hidden_size"), cfg.get("num_hidden_layers")
    for name, (_, shape) in sorted(tensors.items()):
        if not name.endswith(EMBED_SUFFIX):
            continue
        if vocab and hidden and shape != [vocab, hidden]:
            raise WeightsProblem(f"{name} has shape {shape}, config.json says vocab_size={vocab}, "
                                 f"hidden_size={hidden} (weights of another model?)")
        prefix = name[:-len(EMBED_SUFFIX)] + "layers."  # e.g. model.layers.<i>. beside model.embed_tokens
        found = {int(t[len(prefix):].split(".", 1)[0]) for t in tensors
                 if t.startswith(prefix) and t[len(prefix):].split(".", 1)[0].isdigit()}
        if layers and found != set(range(layers)):
            raise WeightsProblem(f"the weights hold decoder layers {_span(found)} under {prefix}, config.json says "
                                 f"num_hidden_layers={layers} (a missing shard or weights of another model?)")


def _span(found: set[int]) -> str:
    if not found:
        return "(none)"
    return f"0..{max(found)}" if found == set(range(max(found) + 1)) else ", ".join(map(str, sorted(found)))


def check_model_folder(folder: Path) -> Optional[str]:
    """What is wrong with the safetensors weights of a local model folder, or None.

    Checks every `*.safetensors` file's header against its size, the shard index (when there
    is one) against the shards, and the embedding shape and layer count against config.json.
    A folder without safetensors files is left to the loader.
    """
    files = sorted(folder.glob("*.safetensors"))
    try:
        headers = {p.name: read_header(p) for p in files}
        weight_map = _read_index(folder)
        if weight_map is not None:
            _check_index(folder, weight_map, headers)
        config = json.loads((folder / "config.json").read_text())
        if headers and isinstance(config, dict):
            _check_against_config(config, {k: v for h in headers.values() for k, v in h.items()})
    except WeightsProblem as exc:
        return str(exc)
    except (OSError, json.JSONDecodeError) as exc:
        return f"config.json or a weights file cannot be read ({type(exc).__name__}: {exc})"
    return None
