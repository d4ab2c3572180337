"""The quantize stage's progress on disk: one safetensors file per finished block, merged into the qstate at the end.

`blocks/block_<i>.safetensors` holds block i's layers (names relative to the block, the tensors
of stages.quant.qstate) and, in its metadata, the layer records and the block's metrics. Each is
written to a temporary name and renamed, so an interrupted run resumes at the first block
without a file. `FinishedBlocks` reads them back lazily (one block in memory at a time), and
`merge_qstate` writes qstate.safetensors + layers.json from them by copying bytes, so neither
resuming nor finishing ever holds the whole qstate (about a byte per weight) in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from stages.quant.base import BlockResult, LayerScheme, QuantizedLayer
from stages.quant.qstate import LAYERS_FILE, QSTATE_FILE, concat_safetensors, layer_record, layer_tensors

PROGRESS_DIR = "blocks"
HEAD_FILE = "head.safetensors"


def block_file(folder: Path, index: int) -> Path:
    return Path(folder) / PROGRESS_DIR / f"block_{index:05d}.safetensors"


def save_layers(path: Path, layers: dict[str, QuantizedLayer], metrics: dict[str, Any]) -> None:
    """Write layers (names relative to `path`'s block) + metrics atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    for name, layer in layers.items():
        tensors.update(layer_tensors(name, layer))
    meta = {"metrics": json.dumps(metrics), "layers": json.dumps({n: layer_record(l) for n, l in layers.items()})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def save_block(folder: Path, index: int, result: BlockResult, seconds: float) -> None:
    """One finished block's layers and metrics (see the module docstring)."""
    save_layers(block_file(folder, index), result.layers, {**result.metrics, "seconds": seconds})


def finished_indices(folder: Path) -> list[int]:
    """Blocks an earlier attempt finished (their files are complete: they were renamed into place)."""
    return sorted(int(p.stem.split("_")[1]) for p in (Path(folder) / PROGRESS_DIR).glob("block_*.safetensors"))


def read_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return {"metrics": json.loads(meta["metrics"]), "layers": json.loads(meta["layers"])}


def read_layers(path: Path) -> dict[str, QuantizedLayer]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        records = json.loads(f.metadata()["layers"])
        return {n: QuantizedLayer(f.get_tensor(f"{n}.codes"), f.get_tensor(f"{n}.scale").float(),
                                  f.get_tensor(f"{n}.zero").float(), LayerScheme(r["bits"], r["group_size"], r["sym"]),
                                  f.get_tensor(f"{n}.g_idx") if r["act_order"] else None)
                for n, r in records.items()}


class FinishedBlocks(Mapping[int, dict[str, QuantizedLayer]]):
    """index -> layers of the blocks an earlier attempt finished, read from their files on access."""

    def __init__(self, folder: Path, indices: list[int]):
        self.folder, self.indices = Path(folder), list(indices)

    def __getitem__(self, index: int) -> dict[str, QuantizedLayer]:
        if index not in self.indices:
            raise KeyError(index)
        return read_layers(block_file(self.folder, index))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def metrics(self, index: int) -> dict[str, Any]:
        return read_metadata(block_file(self.folder, index))["metrics"]


def merge_qstate(folder: Path, blocks_name: str, num_blocks: int, meta: dict[str, Any]) -> None:
    """qstate.safetensors + layers.json from every block file (and the head's, when quantized), byte for byte.

    Args:
        folder: the work folder holding blocks/.
        blocks_name: the blocks' prefix (e.g. "model.layers"); file names are relative to it.
        meta: layers.json extras (skipped, blocks, num_blocks, method).
    """
    folder = Path(folder)
    parts = [(block_file(folder, i), f"{blocks_name}.{i}.") for i in range(num_blocks)]
    head = folder / PROGRESS_DIR / HEAD_FILE
    if head.is_file():
        parts.append((head, ""))
    records: dict[str, Any] = {}
    for path, prefix in parts:
        records.update({prefix + n: r for n, r in read_metadata(path)["layers"].items()})
    concat_safetensors(parts, folder / QSTATE_FILE)
    (folder / LAYERS_FILE).write_text(json.dumps({"layers": records, **meta}, indent=2, sort_keys=True))
