"""The `torch` benchmark backend: the loaded model on the static-cache decode engine.

The packed checkpoint is loaded with `stages.formats.qlinear.load_quantized_model` and its
quantized Linears are replaced by kernel-backed ones (`stages.kernels.planner`); the
baseline is the unquantized model loaded with transformers. Both go through the same
engine, glue and measurement loop, so the comparison isolates the weights' kernels.
On the CPU everything dequantizes (a correctness path, not a speed claim).
"""

from __future__ import annotations

import gc
import platform
from dataclasses import asdict
from typing import Any, Callable, Optional

import torch

from core.context import BASELINE
from stages.bench.engine import LAST_TOKEN_LINEARS, DecodeEngine, prefill_rows
from stages.bench.hf_decoder import decoder_from_hf
from stages.bench.lora import add_lora, fused_out_sizes
from stages.bench.options import BenchOptions, BenchTarget, special_token_ids
from stages.bench.workload import BatchTiming, Workload, measure, prompt_token_ids
from stages.kernels.linear import DenseWeight
from stages.kernels.planner import build_kernel_linears
from stages.recovery.adapter import read_adapter


def load_target(target: BenchTarget, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The packed checkpoint through the project's loader, or the baseline through transformers."""
    if target.variant == BASELINE:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(target.path, dtype=dtype,
                                                     trust_remote_code=target.trust_remote_code)
        return model.to(device).eval()
    from stages.formats.qlinear import load_quantized_model

    return load_quantized_model(target.path, device, dtype).eval()


def weight_bytes(spec, linears: dict) -> dict[str, int]:
    """Bytes of every weight the engine holds (tied embeddings counted once)."""
    lin = 0
    embed_ptr = spec.embed.data_ptr()
    for name, mod in linears.items():
        dense = mod.formats.get("dense")
        if name == "lm_head" and isinstance(dense, DenseWeight) and dense.weight.data_ptr() == embed_ptr:
            continue
        lin += mod.weight_nbytes()
    quant = sum(m.weight_nbytes() for m in linears.values() if "dense" not in m.formats)
    decoder = sum(m.weight_nbytes() for n, m in linears.items() if n != "lm_head")
    return {"weight_memory_bytes": spec.nbytes() + lin, "quantized_linear_bytes": quant,
            "decoder_linear_bytes": decoder}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def build_engine(spec, linears: dict, workload: Workload, options: BenchOptions, prompts: torch.Tensor,
                 log: Callable[[str], None]) -> tuple[DecodeEngine, list[str]]:
    """The engine, warmed up on every batch size (captures its CUDA graph); if torch.compile or CUDA
    graphs fail on this machine, the engine is rebuilt without them and the failure is recorded."""
    notes: list[str] = []
    attempts = [(options.compile, options.cuda_graphs)]
    if options.compile:
        attempts.append((False, options.cuda_graphs))
    if options.cuda_graphs:
        attempts.append((False, False))
    for i, (comp, graphs) in enumerate(attempts):
        engine = DecodeEngine(spec, linears, max(workload.batch_sizes), workload.max_len, compile_glue=comp,
                              cuda_graphs=graphs)
        try:
            for b in workload.batch_sizes:
                idx = [j % prompts.shape[0] for j in range(b)]
                engine.generate(prompts[idx], workload.output_len)
            return engine, notes
        except Exception as exc:  # compile / capture problems of this machine: record them, fall back
            if i == len(attempts) - 1:
                raise
            msg = f"compile={comp} cuda_graphs={graphs} failed ({type(exc).__name__}: {str(exc)[:300]}); retrying"
            log(f"[bench] {msg}")
            notes.append(msg)
            del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise AssertionError("unreachable")


class TorchBackend:
    """Runs a model folder on `stages.bench.engine.DecodeEngine` (see module doc)."""

    name = "torch"

    def run(self, target: BenchTarget, workload: Workload, options: BenchOptions,
            log: Callable[[str], None] = print) -> dict[str, Any]:
        """Load, convert, measure every batch size; returns the backend's part of the record."""
        model = load_target(target, options.device, getattr(torch, options.dtype))
        return self.run_loaded(model, workload, options, log, adapter=target.adapter)

    def run_loaded(self, model: torch.nn.Module, workload: Workload, options: BenchOptions,
                   log: Callable[[str], None] = print, adapter: Optional[str] = None) -> dict[str, Any]:
        """Same as `run` for a model already loaded on options.device (its Linears are consumed)."""
        dtype = getattr(torch, options.dtype)
        cuda = options.device.startswith("cuda")
        exclude = special_token_ids(model.config.to_dict())
        out_sizes = fused_out_sizes(model) if adapter else {}
        spec, sources = decoder_from_hf(model, dtype, workload.max_len)
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        linears, plans = build_kernel_linears(sources, options.linear_kernel, dtype, list(workload.batch_sizes),
                                              quick=options.kernel_tuning == "quick",
                                              measure_bf16=options.measure_bf16_kernels, log=log,
                                              prefill_rows=prefill_rows(workload),
                                              last_token_only=LAST_TOKEN_LINEARS,
                                              batch1_weight=options.kernel_batch1_weight)
        if adapter:
            n = add_lora(linears, read_adapter(adapter), out_sizes, "model.layers", dtype, options.device)
            log(f"[bench] LoRA adapter {adapter} added to {n} fused Linears")
        prompts = prompt_token_ids(workload, spec.vocab_size, exclude).to(options.device)
        engine, notes = build_engine(spec, linears, workload, options, prompts, log)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def run_batch(idx: list[int]) -> BatchTiming:
            _, t = engine.generate(prompts[idx], workload.output_len)
            return BatchTiming(t.ttft_s, t.total_s)

        results = []
        for b in workload.batch_sizes:
            log(f"[bench] torch backend, batch {b}")
            results.append(measure(run_batch, workload, b,
                                   on_pass=lambda what, m: log(f"[bench] {what}: {m['output_tokens_per_s']:.1f} tok/s")))
        record = {
            "backend": self.name, "device": options.device, "device_name": device_name(options.device),
            "dtype": options.dtype, "compile": engine.compiled, "cuda_graphs": engine.cuda_graphs,
            "linear_kernel": options.linear_kernel, "results": results,
            "kernels": [asdict(p) for p in plans],
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "torch_version": torch.__version__, "engine_notes": notes, "adapter": adapter,
            **weight_bytes(spec, linears),
        }
        if not cuda:
            record["note"] = "CPU: every quantized Linear dequantizes on each call (correctness path, not a speed claim)"
        return record
