"""Decoder blocks one at a time, from a model in memory or streamed from its tensor files.

The driver (stages.quant.driver) asks a block source for the non-block modules during the input
capture and for one block per turn:
* `ResidentBlocks(model)`: the whole model is in memory (tests, benchmarks, the in-memory
  reference); a block moves to the device for its turn and back.
* `StreamedBlocks(skeleton, tensors, dtype)`: the model's skeleton has every parameter on the
  meta device; the non-block tensors the input capture needs (embeddings, rotary tables; not the
  output head) are loaded for the capture and freed after it, and block i's tensors are loaded
  for its turn and freed after it. `tensors` is a lazy source: `ShardTensors` reads a model
  folder's safetensors shards with `safe_open` (only the requested tensors), and
  pipeline.random_model.RandomTensors draws seeded random weights. Host memory holds at most one
  block's tensors at a time.
`open_model_folder` checks a folder before any work: every shard its index names exists and
every tensor the config implies is there with the shape the config implies.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from torch import nn

from core.errors import InputError
from stages.quant.blocks import find_blocks, non_block_modules_to

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
MAX_LISTED = 5


class TensorSource(Protocol):
    def load_group(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The named tensors, each on `device` (in the stored dtype)."""
        ...


def _assign(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of parameter or buffer `name` (a new Parameter: no copy into the old storage)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=value.is_floating_point())
    else:
        owner._buffers[leaf] = value


def checkpoint_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a checkpoint of `model` holds: parameters (a tied weight once,
    under its first name) and persistent buffers."""
    out = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for mod_name, module in model.named_modules():
        for leaf, buf in module._buffers.items():
            if buf is not None and leaf not in module._non_persistent_buffers_set:
                out[f"{mod_name}.{leaf}" if mod_name else leaf] = tuple(buf.shape)
    return out


def _module_name(model: nn.Module, module: Optional[nn.Module]) -> Optional[str]:
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS after a block is released.

    glibc serves large allocations from its heap once its mmap threshold has grown, and keeps
    freed heap memory mapped: without a trim the resident set grows by about a block per block.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class ResidentBlocks:
    """A model held in memory: blocks visit the device for their turn (weights are left dequantized)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks_name, self.blocks = find_blocks(model)
        self._home: dict[int, torch.device] = {}

    @contextlib.contextmanager
    def embeddings_on(self, device: torch.device) -> Iterator[None]:
        home = next(self.model.get_input_embeddings().parameters()).device
        non_block_modules_to(self.model, self.blocks_name, device)
        try:
            yield
        finally:
            non_block_modules_to(self.model, self.blocks_name, home)

    def load_block(self, index: int, device: torch.device) -> nn.Module:
        self._home[index] = next(self.blocks[index].parameters()).device
        return self.blocks[index].to(device)

    def release_block(self, index: int) -> None:
        self.blocks[index].to(self._home.pop(index))

    def head_weight(self, name: str, device: torch.device) -> torch.Tensor:
        return self.model.get_submodule(name).weight.to(device)

    def set_head(self, name: str, weight: torch.Tensor) -> None:
        head = self.model.get_submodule(name)
        with torch.no_grad():
            head.weight.data.copy_(weight.to(head.weight.device, head.weight.dtype))


class StreamedBlocks:
    """A meta-device skeleton whose tensors come from `tensors` one block (or the embeddings) at a time."""

    def __init__(self, skeleton: nn.Module, tensors: TensorSource, dtype: torch.dtype, direct: bool = False):
        """direct: ask `tensors` for each tensor on the tuning device itself (e.g. random weights drawn on
        the GPU) instead of on the CPU."""
        self.model, self.tensors, self.dtype, self.direct = skeleton.eval(), tensors, dtype, direct
        self.blocks_name, self.blocks = find_blocks(skeleton)
        self.expected = checkpoint_tensors(skeleton)
        # the capture runs up to block 0 only: the output head (untied) is never needed there
        head = _module_name(skeleton, skeleton.get_output_embeddings())
        skip = tuple(p + "." for p in (self.blocks_name, head) if p)
        self._non_block = [n for n in self.expected if not n.startswith(skip)]

    def _cast(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        return t.to(device=device, dtype=self.dtype) if t.is_floating_point() else t.to(device)

    def _load(self, root: nn.Module, prefix: str, names: list[str], device: torch.device) -> None:
        loaded = self.tensors.load_group([prefix + n for n in names], device if self.direct else torch.device("cpu"))
        for name in names:
            _assign(root, name, self._cast(loaded.pop(prefix + name), device))

    def _release(self, root: nn.Module, names: list[str]) -> None:
        for name in names:
            owner_name, _, leaf = name.rpartition(".")
            owner = root.get_submodule(owner_name) if owner_name else root
            t = owner._parameters.get(leaf, owner._buffers.get(leaf))
            _assign(root, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))

    @staticmethod
    def _move_non_persistent(root: nn.Module, device: torch.device) -> None:
        for module in root.modules():
            for leaf in module._non_persistent_buffers_set:
                if module._buffers.get(leaf) is not None:
                    module._buffers[leaf] = module._buffers[leaf].to(device)

    @contextlib.contextmanager
    def embeddings_on(self, device: torch.device) -> Iterator[None]:
        """The tensors outside the blocks (but the output head) on `device` for the capture, freed after."""
        self._load(self.model, "", self._non_block, device)
        self._move_non_persistent(self.model, device)
        try:
            yield
        finally:
            self._release(self.model, self._non_block)
            self._move_non_persistent(self.model, torch.device("cpu"))
            return_freed_memory()

    def _block_names(self, index: int) -> list[str]:
        prefix = f"{self.blocks_name}.{index}."
        return [n[len(prefix):] for n in self.expected if n.startswith(prefix)]

    def load_block(self, index: int, device: torch.device) -> nn.Module:
        block = self.blocks[index]
        self._load(block, f"{self.blocks_name}.{index}.", self._block_names(index), device)
        self._move_non_persistent(block, device)
        return block

    def release_block(self, index: int) -> None:
        self._release(self.blocks[index], self._block_names(index))
        self._move_non_persistent(self.blocks[index], torch.device("cpu"))
        return_freed_memory()

    def head_weight(self, name: str, device: torch.device) -> torch.Tensor:
        key = f"{name}.weight"
        return self._cast(self.tensors.load_group([key], device if self.direct else torch.device("cpu"))[key], device)

    def set_head(self, name: str, weight: torch.Tensor) -> None:
        return None  # nothing to update: the model is not kept


class ShardTensors:
    """Tensors of a safetensors model folder, read lazily with safe_open (only the requested ones)."""

    def __init__(self, folder: Path, files: dict[str, str]):
        self.folder, self.files = Path(folder), files  # tensor name -> shard file name

    def load_group(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():  # each file is opened (mapped) only while its tensors are copied out
            with safe_open(str(self.folder / file), framework="pt", device=str(device)) as f:
                for key in keys:
                    out[key] = f.get_tensor(key)
        return out


def _listed(items: list[str]) -> str:
    more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return "; ".join(items[:MAX_LISTED]) + more


def shard_files(folder: Path) -> list[str]:
    """The safetensors files of a model folder: from its index, or the single model.safetensors.

    Raises:
        InputError when the folder has neither, or when files its index names are missing.
    """
    if (folder / SAFETENSORS_INDEX).is_file():
        index = json.loads((folder / SAFETENSORS_INDEX).read_text())
        files = sorted(set(index.get("weight_map", {}).values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise InputError(f"model folder {folder} is missing {len(missing)} of the {len(files)} shards its "
                             f"{SAFETENSORS_INDEX} names: {_listed(missing)}; copy the complete model folder "
                             "(or download it again)")
        return files
    if (folder / SAFETENSORS_SINGLE).is_file():
        return [SAFETENSORS_SINGLE]
    raise InputError(f"model folder {folder} holds no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}: quantizing "
                     "streams the weights from safetensors files; save the model with safe_serialization=True")


def read_headers(folder: Path, files: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """tensor name -> (shard file, shape), from the shards' headers only (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(str(folder / file), framework="pt") as f:
                for key in f.keys():
                    out[key] = (file, tuple(f.get_slice(key).get_shape()))
        except (SafetensorError, OSError) as exc:
            raise InputError(f"model shard {folder / file} cannot be read as safetensors ({exc}); "
                             "the file is truncated or corrupt: copy or download it again") from exc
    return out


def check_tensors(folder: Path, expected: dict[str, tuple[int, ...]],
                  found: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Every tensor the config implies must be in the shards, with the config's shape.

    Raises:
        InputError listing the missing and mis-shaped tensors.
    """
    problems = []
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"{name} is in no shard")
        elif found[name][1] != shape:
            problems.append(f"{name} in {found[name][0]} is {list(found[name][1])}, the config needs {list(shape)}")
    if problems:
        raise InputError(f"the shards in {folder} do not match its config.json ({len(problems)} tensors): "
                         f"{_listed(problems)}; the folder mixes files of different models or checkpoint "
                         "versions: copy the complete model folder again")


def meta_skeleton(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of `config` with parameters on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # Tie explicitly: whether from_config ties on the meta device differs between transformers versions,
    # and an untied lm_head would be looked for in shards that store it once, as the embedding.
    skeleton.tie_weights()
    return skeleton


def open_model_folder(folder: Path, config: Any, dtype: torch.dtype, trust_remote_code: bool = False
                      ) -> StreamedBlocks:
    """A checked, streamed view of a safetensors model folder (see `shard_files`, `check_tensors`)."""
    folder = Path(folder)
    skeleton = meta_skeleton(config, trust_remote_code)
    found = read_headers(folder, shard_files(folder))
    check_tensors(folder, checkpoint_tensors(skeleton), found)
    return StreamedBlocks(skeleton, ShardTensors(folder, {k: v[0] for k, v in found.items()}), dtype)
