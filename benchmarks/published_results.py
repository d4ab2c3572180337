#!/usr/bin/env python
"""Regenerate benchmarks/RESULTS.md: every published quality, cost and throughput number.

Parts (``--parts``, comma list; default all but ``results``):
  quality  SmolLM2-135M through the real pipeline (calibrate on Austen 128 x 512 tokens, never on
           Persuasion -> quantize -> pack -> load the packed checkpoint back -> evaluate): RTN, GPTQ
           and AutoRound (200 iters) at W2G64 asym, W3G64 asym, W4G64 sym, plus the unquantized
           baseline. Scores: perplexity on persuasion.txt in 512-token windows and the local lm-eval
           tasks; cost: quantize seconds and peak GPU memory per cell. Sym cells are packed in the
           GPTQ format (what vLLM serves), asym cells in the auto-round format (it stores zero
           points as they are; GPTQ v1's zero-1 cannot store a zero of 0).
  recover  the recover stage on SmolLM2-135M through the same runner and data as the quality part:
           RTN, GPTQ and AutoRound at W2G64 asym and W4G64 sym (AutoRound also W3G64 asym), each
           without recovery and with it (RECOVER_CELLS; AutoRound W2G64 with both modes side by
           side), scored on Persuasion after loading the packed checkpoint (+ adapter) back; plus
           the 8B-shaped cost (benchmarks/bench_recover.py: peak GPU memory, seconds per 1M
           training tokens). About 7 minutes on an H200.
  block    per-block cost on a Llama-3-8B-shaped block: AutoRound (benchmarks/bench_quantize.py
           --parts block) and GPTQ (benchmarks/bench_gptq.py --parts block).
  torch    throughput on the torch backend (benchmarks/bench_throughput.py --part torch).
  vllm     throughput on vLLM (benchmarks/bench_throughput.py --part vllm; needs vLLM installed).
  kernels  low-bit kernel candidates per shape + decode/prefill of the best per scheme
           (benchmarks/bench_kernels.py, results in kernels/), and the vLLM 2/3-bit route probe
           (benchmarks/probe_vllm_lowbit.py, results in vllm_lowbit/).
  results  merge every part's JSON found under --results into RESULTS.md (runs anywhere), with the
           CPU quickstart timings that benchmarks/bench_quickstart.py writes to <results>/quickstart_cpu/,
           the reference comparison that benchmarks/reference_table.py writes to <results>/reference/, and
           the scale runs (one part per 10-minute call) of benchmarks/bench_scale.py (--out <results>/scale)
           and benchmarks/bench_dp.py (--out <results>/dp).

Each part writes JSON (with the card, torch version, date and command) under --results, so parts
can run in separate calls on an offline GPU machine and be merged afterwards:
  python benchmarks/published_results.py --parts quality,block --results benchmarks/results/published
  python benchmarks/published_results.py --parts torch,vllm --results benchmarks/results/published
  python benchmarks/published_results.py --parts recover --results benchmarks/results/published
  python benchmarks/published_results.py --parts results --results benchmarks/results/published
``--small`` runs the quality, recover and block parts on CPU-sized problems (tiny random model, few iters).
The quality part needs the pipeline's own dependencies (hydra-core, lm-eval) but not MLflow.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SCHEMES = (("W2G64 asym", 2, 64, False), ("W3G64 asym", 3, 64, False), ("W4G64 sym", 4, 64, True))
METHODS = ("rtn", "gptq", "autoround")
QUALITY_STAGES = "[calibrate,quantize,pack,baseline_evaluate,evaluate]"
RECOVER_STAGES = "[calibrate,quantize,recover,pack,baseline_evaluate,evaluate]"
W2, W3, W4 = SCHEMES[0], SCHEMES[1], SCHEMES[2]
# (scheme, quantizer, recover config group): every quantizer with and without recovery
RECOVER_CELLS = (
    (W2, "autoround", "none"), (W2, "autoround", "scales"), (W2, "autoround", "lora"),
    (W2, "rtn", "none"), (W2, "rtn", "lora"), (W2, "gptq", "none"), (W2, "gptq", "lora"),
    (W3, "autoround", "none"), (W3, "autoround", "scales"),
    (W4, "autoround", "none"), (W4, "autoround", "scales"), (W4, "rtn", "none"), (W4, "rtn", "scales"),
    (W4, "gptq", "none"), (W4, "gptq", "scales"),
)


def machine() -> dict[str, Any]:
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return {"card": card, "torch": torch.__version__, "date": dt.date.today().isoformat(),
            "python": platform.python_version(), "command": " ".join(shlex.quote(a) for a in sys.argv)}


def cell_overrides(scheme: tuple, method: str, small: bool, store: Path) -> list[str]:
    """Pipeline overrides for one (scheme, method) cell of the quality grid."""
    _, bits, group, sym = scheme
    ov = [f"quant={'autoround' if method == 'autoround' else method}", f"quant.bits={bits}",
          f"quant.sym={str(sym).lower()}", f"pack={'gptq' if sym else 'auto_round'}",
          "eval=local", f"run.stages={QUALITY_STAGES}", "tracking.enabled=false", f"run.outputs_dir={store}"]
    if method == "autoround":  # the compiled tuning step is 2x faster on the GPU (bench_quantize block part)
        ov += ["quant.iters=4"] if small else ["quant.iters=200", "quant.compile=on"]
    if method != "rtn":  # the calibrated methods' block batch (RTN's config has no batch)
        ov += [f"quant.batch_size={4 if small else 8}"]
    if small:
        return ov + ["model=tiny_random", "quant.group_size=32", "calib.nsamples=8", "calib.seqlen=64",
                     "eval.limit=4", "eval.perplexity.max_windows=2", "run.device=cpu"]
    return ov + ["model=smollm2_135m", f"quant.group_size={group}", "calib=austen", "calib.nsamples=128",
                 "calib.seqlen=512", "eval.limit=null", "eval.perplexity.max_windows=null", "eval.batch_size=32"]


def run_quality(args: argparse.Namespace, out: Path) -> None:
    """Every cell through the pipeline runner; results (manifests per cell) written after each cell."""
    store = Path(args.outputs)
    cells = [(s, m, cell_overrides(s, m, args.small, store) + list(args.set)) for s in SCHEMES for m in METHODS
             if not args.cells or s[0] in args.cells.split(",")]
    run_cells(cells, out, "quality", store)


def run_cells(cells: list[tuple[tuple, str, list[str]]], out: Path, name: str, store: Path) -> None:
    """(scheme, method, overrides) cells through the pipeline runner; the record is rewritten after each cell."""
    from pipeline.app import compose_job_config  # the same composition as `python -m pipeline`
    from pipeline.runner import PipelineRunner
    from pipeline.runtime import setup_runtime
    from pipeline.validate import validate_config

    record: dict[str, Any] = {"machine": machine(), "cells": [], "outputs": str(store)}
    for scheme, method, overrides in cells:
        cfg, _ = compose_job_config(overrides)
        validate_config(cfg)
        t0 = time.perf_counter()
        outcomes = PipelineRunner(cfg, setup_runtime(cfg, print)).run()
        manifests = {o.name: json.loads((o.path / "manifest.json").read_text()) for o in outcomes if o.status != "skipped"}
        record["cells"].append({"scheme": scheme[0], "method": method, "recover": cfg.recover.mode,
                                "overrides": overrides, "wall_seconds": time.perf_counter() - t0, "manifests": manifests})
        (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
        print(f"[{name}] {method} {scheme[0]} recover={cfg.recover.mode}: done in {time.perf_counter() - t0:.1f} s",
              flush=True)


def run_recover(args: argparse.Namespace, out: Path) -> None:
    """RECOVER_CELLS through the runner (recover.json), then the 8B-shaped cost script."""
    store = Path(args.outputs)
    cells = []
    for scheme, method, mode in RECOVER_CELLS:
        if args.cells and scheme[0] not in args.cells.split(","):
            continue
        ov = cell_overrides(scheme, method, args.small, store)
        ov = [o if not o.startswith("run.stages=") else f"run.stages={RECOVER_STAGES}" for o in ov]
        ov += [f"recover={mode}"] + (["recover.steps=4", "recover.batch_size=4", "recover.topk=16"]
                                     if args.small and mode != "none" else [])
        cells.append((scheme, method, ov + list(args.set)))
    run_cells(cells, out, "recover", store)
    small = ["--small"] if args.small else []
    run_script([sys.executable, "benchmarks/bench_recover.py", "--out", str(out / "recover_cost"), *small],
               out / "recover_cost.log")


def run_script(cmd: list[str], log: Path) -> int:
    """A benchmark script as a subprocess (its own CUDA context), output teed to a log."""
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        return proc.wait()


def run_block(args: argparse.Namespace, out: Path) -> None:
    small = ["--small"] if args.small else []
    run_script([sys.executable, "benchmarks/bench_quantize.py", "--parts", "block", "--out", str(out / "block_autoround"),
                *small, *args.block_args.split()], out / "block_autoround.log")
    run_script([sys.executable, "benchmarks/bench_gptq.py", "--parts", "block", "--out", str(out / "block_gptq"), *small],
               out / "block_gptq.log")


def run_throughput(part: str, args: argparse.Namespace, out: Path) -> None:
    small = ["--small"] if args.small else []
    run_script([sys.executable, "benchmarks/bench_throughput.py", "--part", part, "--out", str(out / f"throughput_{part}"),
                *small], out / f"throughput_{part}.log")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="quality,block,torch,vllm")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "published"))
    p.add_argument("--outputs", default="/tmp/published-outputs", help="pipeline run.outputs_dir for the quality grid")
    p.add_argument("--cells", default="", help="comma list of scheme labels (default: all three)")
    p.add_argument("--block-args", default="", help="extra arguments for bench_quantize.py's block part")
    p.add_argument("--set", nargs="*", default=[], help="extra pipeline overrides for every quality cell, "
                   "e.g. --set quant.compile=on")
    p.add_argument("--small", action="store_true", help="CPU-sized problems")
    p.add_argument("--markdown", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = p.parse_args()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    if "quality" in parts:
        run_quality(args, out)
    if "recover" in parts:
        run_recover(args, out)
    if "block" in parts:
        run_block(args, out)
    for part in ("torch", "vllm"):
        if part in parts:
            run_throughput(part, args, out)
    if "kernels" in parts:
        small = ["--small"] if args.small else []
        run_script([sys.executable, "benchmarks/bench_kernels.py", "--out", str(out / "kernels"), *small],
                   out / "kernels.log")
        if not args.small:
            run_script([sys.executable, "benchmarks/probe_vllm_lowbit.py", "--out", str(out / "vllm_lowbit")],
                       out / "vllm_lowbit.log")
    if "results" in parts:
        sys.path.insert(0, str(Path(__file__).parent))
        from results_markdown import write_results_markdown

        print(write_results_markdown(out, Path(args.markdown)))


if __name__ == "__main__":
    main()
