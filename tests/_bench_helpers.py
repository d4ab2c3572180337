"""Test helpers for the benchmark tests: a packed GPTQ checkpoint of a small model, built with
the project's own quantizer math (RTN) and packer, and a tiny context for the stage's run()."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from stages.quant.base import LayerScheme, QuantizedLayer
from stages.quant.qdq import quantize_weight
from stages.quant.qstate import save_qstate

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn_qstate(model_path: str, out: Path, bits: int, group_size: int, sym: bool) -> Path:
    """RTN-quantize every decoder Linear of the model in `model_path` into a qstate folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(LINEAR_SUFFIXES):
            codes, qp = quantize_weight(mod.weight.detach(), bits, group_size, sym)
            layers[name] = QuantizedLayer(codes, qp.scale, qp.zero, LayerScheme(bits, group_size, sym))
    out.mkdir(parents=True, exist_ok=True)
    save_qstate(out, layers, {"skipped": ["lm_head"], "blocks": "model.layers",
                              "num_blocks": model.config.num_hidden_layers, "method": "rtn"})
    return out


def pack_checkpoint(model_path: str, work: Path, bits: int = 4, group_size: int = 32, sym: bool = True,
                    dtype: torch.dtype = torch.float32) -> Path:
    """A GPTQ checkpoint folder of the model (RTN): v1 for sym, gptq_v2 (zeros as they are) for asym."""
    from stages.formats.gptq import pack_gptq, pack_gptq_v2
    from stages.formats.source import QStateReader, SourceModel
    from core.schema import RTNConfig
    from stages.formats.writer import PackOptions

    qdir = rtn_qstate(model_path, work / "qstate", bits, group_size, sym)
    recipe = RTNConfig(bits=bits, group_size=group_size, sym=sym)
    out = work / "checkpoint"
    packer = pack_gptq if sym else pack_gptq_v2
    packer(QStateReader.open(qdir), SourceModel.open(model_path), out, PackOptions(dtype), recipe,
           f"test-{bits}-{group_size}-{sym}")
    return out


def dequantized_reference_model(checkpoint: Path, dtype: torch.dtype = torch.float32):
    """The packed checkpoint as a plain transformers model (QuantLinear forward = reference dequantization)."""
    from stages.formats.qlinear import load_quantized_model

    return load_quantized_model(checkpoint, "cpu", dtype)


def fake_vllm_log(kernel: Optional[str] = "MacheteLinearKernel", quant: str = "gptq_marlin") -> str:
    lines = [
        f"INFO 11-27 10:00:00 [llm_engine.py:1] Initializing a V1 LLM engine (v0.26.0) with config: "
        f"model='/ckpt', dtype=torch.bfloat16, quantization={quant}, enforce_eager=False",
        "(EngineCore pid=1) INFO 11-27 10:00:01 [gptq_marlin.py:1] The model is convertible to gptq_marlin during "
        "runtime. Using gptq_marlin kernel.",
    ]
    if kernel:
        lines.append(f"(EngineCore pid=1) INFO 11-27 10:00:02 [gptq_marlin.py:387] Using {kernel} for "
                     "GPTQMarlinLinearMethod")
    lines += ["(EngineCore pid=1) INFO 11-27 10:00:03 [cuda.py:1] Using FLASH_ATTN attention backend out of "
              "potential backends: ['FLASH_ATTN']",
              "(EngineCore pid=1) INFO 11-27 10:00:05 [gpu_model_runner.py:1] Model loading took 2.1524 GiB and "
              "3.2 seconds"]
    return "\n".join(lines)
