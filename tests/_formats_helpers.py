"""Builders for the packing tests: qstates from random or real weights, fake-quantized models, packers.

Independent of the quantize stage: layers come straight from stages.quant.qdq.quantize_weight
and are written with stages.quant.qstate.save_qstate.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import save_file

from stages.formats.source import QStateReader, SourceModel
from core.schema import QuantScheme, quant_config
from stages.formats.writer import PackOptions
from stages.quant.base import LayerScheme, QuantizedLayer
from stages.quant.qdq import quantize_weight
from stages.quant.qstate import save_qstate

BLOCKS = "model.layers"


@pytest.fixture(scope="module")
def tiny_once(tiny_store):
    """The tiny random Llama loaded once per test module (float32, CPU)."""
    from conftest import compose_config
    from core.models import load_model, load_tokenizer
    from pipeline.models import prepare_model
    from core.store import ArtifactStore

    cfg, _ = compose_config(["model=tiny_random"])
    handle = prepare_model(cfg.model, ArtifactStore(tiny_store), log=lambda m: None)
    return load_model(handle, torch.float32, "cpu"), load_tokenizer(handle), handle


@pytest.fixture
def tiny_model(tiny_once):
    """Overrides conftest's tiny_model in the packing tests: a fresh copy (tests fake-quantize it in place)."""
    model, tok, handle = tiny_once
    return copy.deepcopy(model), tok, handle


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(BLOCKS + ".")}


def quantize_linears(model: torch.nn.Module, bits: int, group_size: int, sym: bool,
                     scheme_for: Optional[Callable[[str], Optional[LayerScheme]]] = None
                     ) -> tuple[dict[str, QuantizedLayer], list[str]]:
    """RTN every block Linear (scheme_for(name) may override or return None to skip). Returns (layers, skipped)."""
    layers, skipped = {}, []
    for name, mod in block_linears(model).items():
        s = scheme_for(name) if scheme_for else LayerScheme(bits, group_size, sym)
        if s is None:
            skipped.append(name)
            continue
        codes, qp = quantize_weight(mod.weight.data, s.bits, s.group_size, s.sym)
        layers[name] = QuantizedLayer(codes, qp.scale, qp.zero, s)
    return layers, skipped


def save_test_qstate(folder: Path, layers: dict[str, QuantizedLayer], skipped: list[str], num_blocks: int,
                     method: str = "rtn") -> QStateReader:
    folder.mkdir(parents=True, exist_ok=True)
    save_qstate(folder, layers, {"skipped": skipped + ["lm_head"], "blocks": BLOCKS, "num_blocks": num_blocks,
                                 "method": method})
    return QStateReader.open(folder)


def fake_quantize(model: torch.nn.Module, layers: dict[str, QuantizedLayer]) -> torch.nn.Module:
    """Replace each quantized weight by its qdq value (in place); returns the model."""
    mods = dict(model.named_modules())
    for name, layer in layers.items():
        mods[name].weight.data = layer.dequantize(mods[name].weight.dtype)
    return model


def options(dtype: torch.dtype = torch.float32, shard: int = 4 * 10**9, packing_format: str = "auto") -> PackOptions:
    return PackOptions(dtype, shard, packing_format)


def recipe(bits: int, group_size: int, sym: bool, method: str = "rtn", **kw) -> QuantScheme:
    return quant_config(method, bits=bits, group_size=group_size, sym=sym, **kw)


def pack_gptq_layout(qs: QStateReader, *args, **kwargs):
    """The GPTQ layout that stores the qstate exactly: v1 for all-sym, gptq_v2 (zeros as they are) otherwise."""
    from stages.formats.gptq import pack_gptq, pack_gptq_v2

    packer = pack_gptq if all(qs.scheme(n).sym for n in qs.names) else pack_gptq_v2
    return packer(qs, *args, **kwargs)


def source(path) -> SourceModel:
    return SourceModel.open(str(path))


def random_ids(n: int = 2, length: int = 12, vocab: int = 49152, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device)).logits.float().cpu()


def make_llama_folder(folder: Path, seed: int = 0, tokenizer_from: Optional[Path] = None, **dims) -> Path:
    """A small random Llama saved as safetensors (dims override hidden 64 / intermediate 128 / 2 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(dims)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(folder, safe_serialization=True)
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_from / f).is_file():
                (folder / f).write_bytes((tokenizer_from / f).read_bytes())
    return folder


def act_order_layer(out_f: int, in_f: int, bits: int, group_size: int, sym: bool, seed: int = 0) -> QuantizedLayer:
    """A layer with a permuted g_idx, as GPTQ act-order produces (column i in group perm_pos(i) // gs)."""
    g = torch.Generator().manual_seed(seed)
    groups = in_f // group_size
    perm = torch.randperm(in_f, generator=g)
    g_idx = (torch.argsort(perm) // group_size).to(torch.int32)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scale = (torch.rand(out_f, groups, generator=g) * 0.02 + 0.001).half().float()
    zero = torch.full((out_f, groups), 2.0 ** (bits - 1)) if sym else torch.randint(1, 2**bits, (out_f, groups), generator=g).float()
    return QuantizedLayer(codes, scale, zero, LayerScheme(bits, group_size, sym), g_idx)


def tensor_bytes_in_file(path: Path) -> tuple[int, int]:
    """(sum of tensor bytes from the header, header length) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    sizes = [v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"]
    return sum(sizes), n


def write_fake_source(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder
