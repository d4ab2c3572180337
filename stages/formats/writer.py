"""Writing a checkpoint folder: sharded safetensors, config files, tokenizer, atomically.

`write_checkpoint` is the part every format shares: it walks the source model's tensors in
order, replaces each quantized Linear's `weight` by the tensors the format's `Layout` packs
(GPTQ: qweight/qzeros/scales/g_idx), copies every other tensor in the checkpoint dtype,
shards by size, writes config.json with `quantization_config`, the format's extra config
file, tokenizer and generation files. Everything goes into a temporary sibling folder that
is renamed into place only when complete; an existing folder holding a different checkpoint
is an error, never overwritten. Before the rename, every quantized layer is unpacked again
from the written files and compared with the qstate bit for bit (`verify_packed`): a format
that cannot hold the quantized numbers exactly fails the stage instead of shipping them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import InputError
from core.schema import PackConfig, QuantScheme
from stages.formats import parse_size

from stages.formats.source import (
    SAFETENSORS_INDEX, SAFETENSORS_SINGLE, QStateReader, SourceModel, read_safetensors_headers,
)
from stages.quant.base import LayerScheme, QuantizedLayer
from stages.quant.qdq import group_index

PACKING_FILE = "packing.json"  # our own record inside the checkpoint (identity, layers)
PACKER_VERSION = "1"


@dataclass(frozen=True)
class PackOptions:
    """How to write: dtype of the unquantized tensors, shard size, and the format's packing choice."""

    dtype: torch.dtype
    max_shard_bytes: int = field(default_factory=lambda: parse_size(PackConfig().max_shard_size))
    packing_format: str = "auto"  # auto_round format only (see stages.formats.auto_round)


@dataclass
class LayerRecord:
    """What was packed for one Linear (for the compatibility report and the size accounting)."""

    scheme: LayerScheme
    act_order: bool
    shape: tuple[int, int]  # [out, in]
    packed_bytes: int


@dataclass
class PackResult:
    path: Path
    files: list[str]
    quantization_config: dict[str, Any]
    layers: dict[str, LayerRecord]
    packing_format: str
    tensor_bytes: int  # all tensors
    size_on_disk: int  # all files of the folder
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def quantized_bytes(self) -> int:
        return sum(r.packed_bytes for r in self.layers.values())

    @property
    def fp16_bytes(self) -> int:
        return sum(2 * r.shape[0] * r.shape[1] for r in self.layers.values())


class Layout(Protocol):
    """A checkpoint format: how one layer is packed and what the config says."""

    name: str
    config_file: str  # extra copy of quantization_config: quantize_config.json / quantization_config.json

    def check(self, qstate: QStateReader, source: SourceModel) -> None: ...

    def pack_layer(self, name: str, layer: QuantizedLayer) -> tuple[dict[str, torch.Tensor], LayerRecord]: ...

    def unpack_layer(self, tensors: dict[str, torch.Tensor], scheme: LayerScheme) -> QuantizedLayer:
        """Inverse of pack_layer; `tensors` keys without the layer prefix (qweight, qzeros, scales, g_idx)."""
        ...

    def quantization_config(self, qstate: QStateReader, recipe: QuantScheme) -> dict[str, Any]: ...


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """Collects tensors and writes safetensors shards of at most `max_bytes` (one tensor may exceed it)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor_nbytes(tensor)
        if self.buffer and self.buffered + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += size
        self.total += size

    def flush(self) -> None:
        if not self.buffer:
            return
        save_file(self.buffer, str(self.folder / f".shard-{len(self.shards)}"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> list[str]:
        """Rename shards to their final names, write the index when sharded; returns the file names."""
        self.flush()
        if len(self.shards) == 1:
            os.replace(self.folder / ".shard-0", self.folder / SAFETENSORS_SINGLE)
            return [SAFETENSORS_SINGLE]
        n = len(self.shards)
        names, weight_map = [], {}
        for i, keys in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f".shard-{i}", self.folder / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names + [SAFETENSORS_INDEX]


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _write_tensors(layout: Layout, qstate: QStateReader, source: SourceModel, out: Path,
                   options: PackOptions) -> tuple[list[str], dict[str, LayerRecord], dict[str, list[str]], int]:
    """Source tensors in order; quantized weights replaced by their packed tensors.

    Returns:
        (files written, per-layer records, the packed tensor keys of each quantized layer, total tensor bytes)
    """
    quantized = {f"{n}.weight": n for n in qstate.names}
    writer = ShardWriter(out, options.max_shard_bytes)
    records: dict[str, LayerRecord] = {}
    packed_keys: dict[str, list[str]] = {}
    for key in sorted(source.tensors, key=_natural_key):
        if key in quantized:
            name = quantized[key]
            packed, records[name] = layout.pack_layer(name, qstate.layer(name))
            packed_keys[name] = list(packed)
            for k, t in packed.items():
                writer.add(k, t)
            continue
        t = qstate.replacement(key) if key in qstate.replaced else source.load(key)
        writer.add(key, t.to(options.dtype) if t.is_floating_point() else t)
    return writer.finish(), records, packed_keys, writer.total


def layer_difference(expected: QuantizedLayer, found: QuantizedLayer) -> Optional[str]:
    """What differs between two layers bit for bit (codes, fp16 scales, zero points, group order), or None."""
    found = found.to(expected.codes.device)
    if not torch.equal(expected.codes.to(torch.uint8), found.codes.to(torch.uint8)):
        n = int((expected.codes.to(torch.int16) != found.codes.to(torch.int16)).sum())
        return f"{n} codes differ"
    e16, f16 = expected.scale.to(torch.float16).view(torch.int16), found.scale.to(torch.float16).view(torch.int16)
    if not torch.equal(e16, f16):
        return f"{int((e16 != f16).sum())} scales differ"
    ez, fz = expected.zero.to(torch.int32), found.zero.to(torch.int32)
    if not torch.equal(ez, fz):
        return f"{int((ez != fz).sum())} zero points differ (e.g. {int(ez[ez != fz][0])} written as {int(fz[ez != fz][0])})"
    natural = group_index(expected.codes.shape[1], expected.scheme.group_size)
    eg = natural if expected.g_idx is None else expected.g_idx.to(torch.int32)
    fg = natural if found.g_idx is None else found.g_idx.to(torch.int32)
    return None if torch.equal(eg, fg) else "group order (g_idx) differs"


def verify_packed(layout: Layout, qstate: QStateReader, folder: Path, packed_keys: dict[str, list[str]]) -> int:
    """Unpack every quantized layer from the files in `folder` and compare it with the qstate bit for bit.

    Returns:
        The number of layers verified.
    Raises:
        InputError naming the layers whose packed numbers differ from the quantized ones.
    """
    headers = read_safetensors_headers(folder)
    problems = []
    for name, keys in packed_keys.items():
        tensors = {}
        for key in keys:
            with safe_open(str(folder / headers[key].file), framework="pt") as f:
                tensors[key[len(name) + 1:]] = f.get_tensor(key)
        expected = qstate.layer(name)
        diff = layer_difference(expected, layout.unpack_layer(tensors, expected.scheme))
        if diff:
            problems.append(f"{name}: {diff}")
    if problems:
        raise InputError(f"pack.format={layout.name} did not store the quantized weights exactly ({len(problems)} "
                         f"layers, e.g. {'; '.join(problems[:3])}); nothing was written. Use pack.format=auto, "
                         "which picks an exact layout for every scheme")
    return len(packed_keys)


def _config_json(source: SourceModel, qconfig: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    cfg = {k: v for k, v in source.config.items() if k != "quantization_config"}
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    cfg["torch_dtype"] = name  # older readers (transformers 4.x, some vLLM paths) look here
    cfg["quantization_config"] = qconfig
    return cfg


def folder_identity(path: Path) -> Optional[str]:
    """The identity recorded by a checkpoint this module wrote, or None if the folder has none."""
    rec = path / PACKING_FILE
    if not rec.is_file():
        return None
    try:
        return json.loads(rec.read_text()).get("identity")
    except (OSError, ValueError):
        return None


def check_output_folder(out: Path, identity: str) -> None:
    """An existing non-empty `out` must hold the same checkpoint (same identity), else InputError."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    found = folder_identity(out)
    if found != identity:
        what = "a different checkpoint" if found or (out / "config.json").exists() else "other files"
        raise InputError(f"output folder {out} already holds {what} (identity {found or 'unknown'}, this pack is "
                         f"{identity}); choose an empty folder or remove it first")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(out: Path) -> None:
    """Temporary folders of crashed earlier attempts (their process is gone) are deleted."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _commit(tmp: Path, out: Path) -> None:
    """Put the finished folder in place; an older copy of the same checkpoint is replaced."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_checkpoint(layout: Layout, qstate: QStateReader, source: SourceModel, out: Path, options: PackOptions,
                     recipe: QuantScheme, identity: str, progress: Optional[Callable[[str], None]] = None) -> PackResult:
    """Write a complete checkpoint folder at `out` (atomically); see the module docstring.

    Args:
        layout: the format (stages.formats.gptq.GPTQLayout, stages.formats.auto_round.AutoRoundLayout).
        identity: hash of everything that defines the output; an existing `out` must carry the same one.
    Returns:
        PackResult with the files written, per-layer records and sizes.
    """
    out = Path(out)
    check_output_folder(out, identity)
    layout.check(qstate, source)
    qconfig = layout.quantization_config(qstate, recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        if progress:
            progress(f"packing {len(qstate.names)} layers as {layout.name} into {out}")
        files, records, packed_keys, total = _write_tensors(layout, qstate, source, tmp, options)
        if progress:
            progress(f"verifying {len(packed_keys)} packed layers against the qstate")
        verified = verify_packed(layout, qstate, tmp, packed_keys)
        (tmp / "config.json").write_text(json.dumps(_config_json(source, qconfig, options.dtype), indent=2) + "\n")
        (tmp / layout.config_file).write_text(json.dumps(qconfig, indent=2) + "\n")
        for aux in source.aux_files():
            shutil.copy2(aux, tmp / aux.name)
        record = {"identity": identity, "format": layout.name, "packer_version": PACKER_VERSION,
                  "created_by": "autoround-pipeline", "method": recipe.method if recipe else qstate.meta.get("method"),
                  "recipe": asdict(recipe) if recipe else None, "layers": len(records)}
        (tmp / PACKING_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _commit(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    size = sum((out / n).stat().st_size for n in names)
    return PackResult(out, names, qconfig, records, getattr(layout, "packing_format", layout.name), total, size,
                      extras={"skipped": qstate.skipped, "dtype": str(options.dtype).removeprefix("torch."),
                              "verified_layers": verified})
