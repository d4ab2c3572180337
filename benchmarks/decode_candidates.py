"""Decode and prefill throughput of whole models on the torch backend's engine (the decode part of
benchmarks/bench_kernels.py).

A Llama-3-8B-shaped decoder (32 layers) with random weights is built straight on the device:
bf16 for the baseline, and per scheme random codes in the checkpoint layout for every decoder
Linear (q/k/v and gate/up fused as the engine does), embeddings and lm_head in bf16 (one
variant quantizes lm_head too). Every quantized model goes through the planner
(`bench.linear_kernel` policy, default auto: one weight format per layer group, the fastest
candidate per row count, measured on this GPU), then `stages.bench.engine.DecodeEngine` with
compiled glue and CUDA graphs, measured with `stages.bench.workload.measure` exactly as the
benchmark stage does: decode at batch 1 and 16 (8-token prompts, 128 new tokens) and the
prefill of 2,048 tokens at batch 1 (time to first token). The planner tunes for the decode
batch sizes and the 2,048-row prefill (`plan_rows`).
"""

from __future__ import annotations

import gc
import math
import time
from typing import Callable

import torch

from stages.bench.engine import DecodeEngine, DecoderSpec
from stages.bench.torch_backend import weight_bytes
from stages.bench.workload import BatchTiming, Workload, measure, prompt_token_ids
from stages.kernels.linear import DenseWeight, fuse_sources
from stages.kernels.planner import build_kernel_linears


def scratch_bytes(linears: dict) -> int:
    """Bytes of the one buffer the scratch routes share (0 when no route uses it)."""
    pools = {id(r.config.pool): r.config.pool for m in linears.values() for r in m.routes if r.kind == "scratch"}
    return sum(p.nbytes() for p in pools.values())

LLAMA_8B = dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128256, theta=500000.0)
SMALL = dict(hidden=256, inter=512, layers=2, heads=4, kv_heads=2, vocab=1024, theta=500000.0)


def rope(max_len: int, head_dim: int, theta: float, device: str, dtype: torch.dtype):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype).contiguous(), emb.sin().to(dtype).contiguous()


def random_spec(d: dict, max_len: int, device: str, dtype: torch.dtype) -> DecoderSpec:
    gen = torch.Generator(device=device).manual_seed(0)
    head_dim = d["hidden"] // d["heads"]
    embed = (torch.randn(d["vocab"], d["hidden"], generator=gen, device=device) * 0.02).to(dtype)
    ones = lambda: torch.ones(d["hidden"], device=device, dtype=dtype)  # noqa: E731
    cos, sin = rope(max_len, head_dim, d["theta"], device, dtype)
    return DecoderSpec(d["layers"], d["heads"], d["kv_heads"], head_dim, 1e-5, embed,
                       [(ones(), ones()) for _ in range(d["layers"])], ones(), cos, sin)


def random_sources(d: dict, scheme, lm_head_scheme, device: str, dtype: torch.dtype, make_layer: Callable) -> dict:
    """name -> (source, None) for every Linear the engine runs; scheme None = bf16."""
    head_dim = d["hidden"] // d["heads"]
    h, kv = d["hidden"], d["kv_heads"] * head_dim
    gen = torch.Generator(device=device).manual_seed(1)

    def one(n: int, k: int, sch, seed: int):
        if sch is None:
            return DenseWeight((torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype))
        return make_layer(n, k, *sch, device, seed)

    out = {}
    for i in range(d["layers"]):
        out[f"layers.{i}.qkv"] = (fuse_sources([one(h, h, scheme, 4 * i), one(kv, h, scheme, 4 * i + 1),
                                                one(kv, h, scheme, 4 * i + 2)]), None)
        out[f"layers.{i}.o"] = (one(h, h, scheme, 4 * i + 3), None)
        out[f"layers.{i}.gate_up"] = (fuse_sources([one(d["inter"], h, scheme, 7000 + i),
                                                    one(d["inter"], h, scheme, 8000 + i)]), None)
        out[f"layers.{i}.down"] = (one(h, d["inter"], scheme, 9000 + i), None)
    out["lm_head"] = (one(d["vocab"], h, lm_head_scheme, 99999), None)
    return out


def plan_rows(workloads: list) -> tuple[list[int], list[int]]:
    """(decode rows, prefill rows) the planner tunes for: the decode batch sizes, and batch x prompt length of
    the prefill workloads (output_len <= 2; the short prompts of the decode workload take the nearest route)."""
    decode = sorted({b for w in workloads for b in w.batch_sizes})
    prefill = sorted({b * w.input_len for w in workloads if w.output_len <= 2 for b in w.batch_sizes})
    return decode, prefill


def run_variant(d: dict, scheme, lm_head_scheme, policy: str, device: str, dtype: torch.dtype, workloads: list,
                make_layer: Callable, log: Callable[[str], None], quick: bool, batch1_weight: float = 1.0) -> dict:
    """Build, plan, warm up and measure one model; returns its record."""
    t0 = time.perf_counter()
    cuda = device.startswith("cuda")
    max_len = max(w.max_len for w in workloads)
    spec = random_spec(d, max_len, device, dtype)
    sources = random_sources(d, scheme, lm_head_scheme, device, dtype, make_layer)
    rows, prefill = plan_rows(workloads)
    linears, plans = build_kernel_linears(sources, policy, dtype, rows, quick=quick, log=log, prefill_rows=prefill,
                                          batch1_weight=batch1_weight)
    engine = DecodeEngine(spec, linears, max(max(w.batch_sizes) for w in workloads), max_len, compile_glue=cuda,
                          cuda_graphs=cuda)
    record: dict = {"policy": policy, "plans": [{"group": p.signature, "routes": p.routes, "formats": p.formats,
                                                 "note": p.note} for p in plans], **weight_bytes(spec, linears),
                    "scratch_bytes": scratch_bytes(linears)}
    for w in workloads:
        prompts = prompt_token_ids(w, d["vocab"]).to(device)

        def run_batch(idx: list[int], w=w, prompts=prompts) -> BatchTiming:
            _, t = engine.generate(prompts[idx], w.output_len)
            return BatchTiming(t.ttft_s, t.total_s)

        key = "prefill" if w.output_len <= 2 else "decode"
        record[key] = [measure(run_batch, w, b) for b in w.batch_sizes]
    record["wall_s"] = time.perf_counter() - t0
    del engine, linears, spec
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return record


def workloads_for(small: bool) -> list[Workload]:
    if small:
        return [Workload(2, 8, 6, (1, 2), warmup=0, repeats=1), Workload(1, 32, 2, (1,), warmup=0, repeats=1)]
    return [Workload(2, 8, 128, (1, 16), warmup=1, repeats=3), Workload(1, 2048, 2, (1,), warmup=1, repeats=3)]


def ratios(rec: dict, base: dict) -> dict:
    """Decode tokens/s and prefill TTFT vs the bf16 record, and the weight-memory ratio."""
    def med(r, key):
        return r[key]["median"] if key in r else math.nan

    out = {f"decode_b{r['batch_size']}": med(r, "decode_tokens_per_s") / med(b, "decode_tokens_per_s")
           for r, b in zip(rec.get("decode", []), base.get("decode", []))}
    out.update({f"prefill_b{r['batch_size']}": med(b, "ttft_ms") / med(r, "ttft_ms")
                for r, b in zip(rec.get("prefill", []), base.get("prefill", []))})
    out["weight_memory"] = rec["weight_memory_bytes"] / base["weight_memory_bytes"]
    out["decoder_linears"] = rec["decoder_linear_bytes"] / base["decoder_linear_bytes"]
    return out
