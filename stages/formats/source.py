"""What a packer reads: the quantize stage's qstate (lazily, layer by layer) and the source model's files.

Nothing here loads a whole model: the source model is read tensor by tensor from its
safetensors files, and the qstate one layer at a time, so packing an 8B model needs about
one layer of memory. Both inputs are checked against each other before anything is written
(`check_qstate_matches_model`): a qstate made from a different model is a clear InputError.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import safe_open

from core.errors import InputError
from stages.quant.base import LayerScheme, QuantizedLayer
from stages.quant.qdq import num_groups
from stages.quant.qstate import LAYERS_FILE, QSTATE_FILE

# Files next to the weights that a checkpoint folder should carry over (tokenizer, chat template,
# generation defaults). Copied when present.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
MAX_LISTED = 5  # mismatches named in one error message
# Tuned unquantized tensors (e.g. norm weights after recover.mode=scales) that replace the model's own.
REPLACEMENTS_FILE = "replacements.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str  # safetensors dtype name, e.g. "F32", "BF16", "I32"
    shape: tuple[int, ...]


def read_safetensors_headers(folder: Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of every tensor in a model folder (single file or sharded with index)."""
    folder = Path(folder)
    if (folder / SAFETENSORS_INDEX).is_file():
        files = sorted(set(json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"].values()))
    elif (folder / SAFETENSORS_SINGLE).is_file():
        files = [SAFETENSORS_SINGLE]
    else:
        raise InputError(f"{folder} holds no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}: not a safetensors model folder")
    out: dict[str, TensorInfo] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = TensorInfo(name, sl.get_dtype(), tuple(sl.get_shape()))
    return out


@dataclass
class SourceModel:
    """The unquantized model as files: config.json, tensor headers, and lazy tensor access."""

    folder: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, path: str, revision: Optional[str] = None) -> "SourceModel":
        """A local model folder, or a hub id resolved through the local Hugging Face cache/hub."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            folder = Path(snapshot_download(repo_id=str(path), revision=revision, allow_patterns=patterns))
        if not (folder / "config.json").is_file():
            raise InputError(f"model folder {folder} has no config.json")
        config = json.loads((folder / "config.json").read_text())
        return cls(folder, config, read_safetensors_headers(folder))

    def load(self, name: str) -> torch.Tensor:
        """One tensor, read from its file (a copy in memory)."""
        info = self.tensors[name]
        with safe_open(str(self.folder / info.file), framework="pt") as f:
            return f.get_tensor(name)

    def dtype(self) -> Optional[torch.dtype]:
        """The dtype config.json declares (transformers 5 `dtype`, older `torch_dtype`)."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        return getattr(torch, name, None) if isinstance(name, str) else None

    def aux_files(self) -> list[Path]:
        return [self.folder / n for n in AUX_FILES if (self.folder / n).is_file()]

    def identity(self) -> str:
        """Hash of config.json and every tensor's name, dtype and shape."""
        payload = {"config": self.config, "tensors": {k: [v.dtype, list(v.shape)] for k, v in sorted(self.tensors.items())}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class QStateReader:
    """The quantize stage's output (see stages.quant.qstate), read one layer at a time."""

    folder: Path
    meta: dict[str, Any]
    _keys: set[str] = field(default_factory=set)
    replaced: set[str] = field(default_factory=set)  # source tensor names with a replacement

    @classmethod
    def open(cls, folder: Path) -> "QStateReader":
        folder = Path(folder)
        for name in (QSTATE_FILE, LAYERS_FILE):
            if not (folder / name).is_file():
                raise InputError(f"{folder} is not a quantize-stage output: {name} is missing")
        meta = json.loads((folder / LAYERS_FILE).read_text())
        with safe_open(str(folder / QSTATE_FILE), framework="pt") as f:
            keys = set(f.keys())
        replaced: set[str] = set()
        if (folder / REPLACEMENTS_FILE).is_file():
            with safe_open(str(folder / REPLACEMENTS_FILE), framework="pt") as f:
                replaced = set(f.keys())
        return cls(folder, meta, keys, replaced)

    def replacement(self, key: str) -> torch.Tensor:
        """The tuned value of an unquantized source tensor (see REPLACEMENTS_FILE)."""
        with safe_open(str(self.folder / REPLACEMENTS_FILE), framework="pt") as f:
            return f.get_tensor(key)

    @property
    def names(self) -> list[str]:
        return list(self.meta["layers"])

    def scheme(self, name: str) -> LayerScheme:
        rec = self.meta["layers"][name]
        return LayerScheme(rec["bits"], rec["group_size"], rec["sym"])

    def act_order(self, name: str) -> bool:
        return bool(self.meta["layers"][name].get("act_order", False))

    def shape(self, name: str) -> tuple[int, int]:
        out_f, in_f = self.meta["layers"][name]["shape"]
        return int(out_f), int(in_f)

    @property
    def skipped(self) -> list[str]:
        return list(self.meta.get("skipped", []))

    @property
    def blocks(self) -> Optional[str]:
        return self.meta.get("blocks")

    def layer(self, name: str) -> QuantizedLayer:
        """One layer with the conventions of stages.quant.qstate.load_qstate (float32 scale/zero)."""
        with safe_open(str(self.folder / QSTATE_FILE), framework="pt") as f:
            codes = f.get_tensor(f"{name}.codes")
            scale = f.get_tensor(f"{name}.scale").float()
            zero = f.get_tensor(f"{name}.zero").float()
            g_idx = f.get_tensor(f"{name}.g_idx") if f"{name}.g_idx" in self._keys else None
        return QuantizedLayer(codes, scale, zero, self.scheme(name), g_idx)

    def iter_layers(self) -> Iterator[tuple[str, QuantizedLayer]]:
        for name in self.names:
            yield name, self.layer(name)

    def digest(self) -> str:
        """sha256 of qstate.safetensors and layers.json (streamed)."""
        h = hashlib.sha256()
        for name in (QSTATE_FILE, LAYERS_FILE):
            with open(self.folder / name, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()


def _listed(items: list[str]) -> str:
    more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return "; ".join(items[:MAX_LISTED]) + more


def check_qstate_matches_model(qstate: QStateReader, source: SourceModel) -> None:
    """Every quantized layer must be a weight of the source model with the recorded shape.

    Raises:
        InputError naming the mismatching layers (a qstate from a different model).
    """
    problems = []
    for name in qstate.names:
        info = source.tensors.get(f"{name}.weight")
        shape = qstate.shape(name)
        if info is None:
            problems.append(f"{name}: no such weight in the model")
        elif tuple(info.shape) != shape:
            problems.append(f"{name}: qstate shape {list(shape)} but the model's weight is {list(info.shape)}")
    for key in sorted(qstate.replaced):
        info = source.tensors.get(key)
        shape = tuple(qstate.replacement(key).shape)
        if info is None or tuple(info.shape) != shape:
            problems.append(f"replacement {key} {list(shape)}: the model has "
                            f"{'no such tensor' if info is None else list(info.shape)}")
    n_blocks = qstate.meta.get("num_blocks")
    n_layers = source.config.get("num_hidden_layers")
    if n_blocks is not None and n_layers is not None and int(n_blocks) != int(n_layers):
        problems.append(f"qstate covers {n_blocks} decoder blocks but the model has num_hidden_layers={n_layers}")
    if problems:
        raise InputError(f"the qstate in {qstate.folder} does not belong to the model in {source.folder} "
                         f"({len(problems)} mismatches): {_listed(problems)}. Quantize this model first "
                         f"(run.stages=[calibrate,quantize,pack]) or point pack at the matching model.")


def check_layer_values(name: str, layer: QuantizedLayer) -> None:
    """Codes, zeros, scales and g_idx must be consistent with the layer's scheme.

    Raises:
        InputError for a corrupt or inconsistent qstate entry.
    """
    s = layer.scheme
    out_f, in_f = layer.codes.shape
    if s.group_size != -1 and (s.group_size < 1 or in_f % s.group_size):
        raise InputError(f"qstate layer {name}: group_size {s.group_size} does not divide in_features {in_f}")
    groups = num_groups(in_f, s.group_size)
    expected = (out_f, groups)
    for key, t in (("scale", layer.scale), ("zero", layer.zero)):
        if tuple(t.shape) != expected:
            raise InputError(f"qstate layer {name}: {key} has shape {list(t.shape)}, expected {list(expected)}")
    maxq = 2 ** s.bits - 1
    if int(layer.codes.max()) > maxq or int(layer.zero.max()) > maxq or float(layer.zero.min()) < 0:
        raise InputError(f"qstate layer {name}: codes or zero points outside [0, {maxq}] for {s.bits} bits")
    if s.sym and not bool((layer.zero == 2 ** (s.bits - 1)).all()):
        raise InputError(f"qstate layer {name} is marked sym but its zero points are not all {2 ** (s.bits - 1)} "
                         "(the sym convention of stages.quant.qdq)")
    if not bool(torch.isfinite(layer.scale).all()) or bool((layer.scale == 0).any()):
        raise InputError(f"qstate layer {name}: scales must be finite and non-zero")
    if layer.g_idx is not None:
        g = layer.g_idx
        if tuple(g.shape) != (in_f,) or int(g.min()) < 0 or int(g.max()) >= groups:
            raise InputError(f"qstate layer {name}: g_idx must be [{in_f}] with values in [0, {groups})")
