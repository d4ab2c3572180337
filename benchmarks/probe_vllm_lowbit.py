#!/usr/bin/env python
"""Can vLLM serve our 2/3-bit checkpoints through a maintained route? Try each route, record why not.

What reading vLLM 0.26 and gemlite 0.6 says (docs/benchmark.md has the details):
* vLLM's GPTQ path (`auto_gptq`, which `quant_method: gptq` resolves to) maps (bits, sym) to
  a Marlin/Machete type for (4, sym) and (8, sym) only and raises "Unsupported quantization
  config: bits=B, sym=S" for anything else; auto-round checkpoints go through the same
  GPTQ/AWQ configs; compressed-tensors WNA16 takes 4/8 bits only.
* gemlite's vLLM plugin (entry point `vllm.general_plugins`, switched on by
  VLLM_GEMLITE_ENABLE=1) subclasses those configs and swaps the linear method for 4/8-bit
  layers only; the parent config's constructor has already refused 2/3-bit.
So every route below is expected to refuse; the script records vLLM's own message per route,
so the claim rests on a run, not on reading.

Routes per checkpoint (2-layer Llama-3-shaped, random weights, written by the project's packer):
  as_written     the folder as pack.format=auto writes it (sym: GPTQ v1; asym: auto-round plain layout)
  gptq_v2        the same tensors declared as GPTQ checkpoint_format gptq_v2 (zeros stored as they are)
  gemlite_plugin as_written with VLLM_GEMLITE_ENABLE=1 (gemlite's vLLM integration, if gemlite is installed)
A route that loads is also timed (batch 1, 8-token prompt, 64 new tokens). Usage (GPU + vLLM):
  python benchmarks/probe_vllm_lowbit.py --out $OUT      # about 2-4 minutes (engine starts dominate)
Writes <out>/vllm_lowbit.json and <out>/vllm_lowbit.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

from bench_throughput import name_list  # noqa: E402
from bench_throughput_report import one_line  # noqa: E402

CHECKPOINTS = {"w2g64_asym": (2, 64, False), "w3g64_asym": (3, 64, False), "w2g64_sym": (2, 64, True),
               "w3g64_sym": (3, 64, True)}


def as_gptq_v2(src: Path, dst: Path) -> Path:
    """A copy whose config declares the tensors as GPTQ v2 (only possible where they are in the GPTQ layout)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg = json.loads((dst / "config.json").read_text())
    q = cfg["quantization_config"]
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": q["bits"], "group_size": q["group_size"],
                                  "sym": q["sym"], "desc_act": False, "checkpoint_format": "gptq_v2"}
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


def probe(args) -> dict:
    from bench_throughput import CHECK_MODEL, random_llama, write_packed
    from stages.bench.options import BenchOptions, BenchTarget
    from stages.bench.vllm_backend import build_request, run_worker, vllm_available
    from stages.bench.workload import Workload

    out, work = Path(args.out), Path(args.work)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if not vllm_available() or not torch.cuda.is_available():
        return {"skipped": "needs vLLM and a CUDA device (see docs/gpu.md)"}
    import importlib.metadata as md
    import importlib.util

    record = {"vllm": md.version("vllm"), "gemlite": md.version("gemlite") if importlib.util.find_spec("gemlite") else None,
              "card": torch.cuda.get_device_name(0), "routes": {},
              "command": "python benchmarks/probe_vllm_lowbit.py " + " ".join(sys.argv[1:])}
    model = random_llama(CHECK_MODEL, "cuda", torch.bfloat16, seed=3)
    wl = Workload(1, 8, 64, (1,), warmup=0, repeats=1)
    opts = BenchOptions("cuda:0", "bfloat16", gpu_memory_utilization=0.3, vllm_enforce_eager=True)
    for name in args.checkpoints:
        bits, gs, sym = CHECKPOINTS[name]
        path = Path(write_packed(model, work / name, bits, gs, sym)["path"])
        routes = {"as_written": (path, None), "gptq_v2": (None, None),
                  "gemlite_plugin": (path, {"VLLM_GEMLITE_ENABLE": "1"})}
        if sym:  # GPTQ v1 folder: the v2 declaration would change the zeros' meaning; asym is in auto-round layout
            routes["gptq_v2"] = (None, "sym checkpoints are GPTQ v1 already (as_written)")
        elif json.loads((path / "config.json").read_text())["quantization_config"].get("packing_format") == "auto_round":
            routes["gptq_v2"] = (as_gptq_v2(path, work / f"{name}_gptq_v2"), None)
        for route, (folder, extra) in routes.items():
            if folder is None:
                record["routes"][f"{name}/{route}"] = {"ok": False, "not_tried": extra or "n/a"}
                continue
            if route == "gemlite_plugin" and record["gemlite"] is None:
                record["routes"][f"{name}/{route}"] = {"ok": False, "not_tried": "gemlite is not installed"}
                continue
            req = build_request(BenchTarget(str(folder), "quantized"), wl, opts, check_only=False)
            res = run_worker(req, args.timeout, out / "logs" / f"{name}_{route}.log", env=extra)
            keep = {k: res.get(k) for k in ("ok", "error", "quantization", "linear_kernels", "engine_start_s")}
            if not res.get("ok"):
                keep["log_tail"] = str(res.get("log_tail", ""))[-1200:]
            else:
                keep["results"] = res.get("results")
            record["routes"][f"{name}/{route}"] = keep
            print(f"{name}/{route}: ok={keep['ok']} {str(keep.get('error'))[:300]}", flush=True)
            (out / "vllm_lowbit.json").write_text(json.dumps(record, indent=1, default=str))
    return record


def render(record: dict) -> str:
    lines = ["## vLLM and our 2/3-bit checkpoints", ""]
    if "skipped" in record:
        return "\n".join(lines + [f"(not run: {record['skipped']})", ""])
    lines += [f"vLLM {record['vllm']}, gemlite {record['gemlite']}, {record['card']}; 2-layer Llama-3-shaped models.", "",
              f"Command: `{record.get('command', 'benchmarks/probe_vllm_lowbit.py')}`", "",
              "| checkpoint / route | loads | quantization | kernel | vLLM's message |", "|---|---|---|---|---|"]
    for key, r in record["routes"].items():
        msg = one_line(r.get("not_tried") or str(r.get("error") or ""))
        lines.append(f"| {key} | {'yes' if r.get('ok') else 'no'} | {r.get('quantization') or '–'} | "
                     f"{r.get('linear_kernels') or '–'} | {msg[:300].replace('|', '/')} |")
    loaded = [k for k, r in record["routes"].items() if r.get("ok")]
    lines += ["", f"Routes that load: {', '.join(loaded)}." if loaded else
              f"No route loads: vLLM {record['vllm']} serves none of these checkpoints, so `bench=auto` runs them "
              "on the torch backend (the pack stage records vLLM's refusal in compat.json)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/vllm_lowbit")
    ap.add_argument("--work", default="/tmp/vllm_lowbit_work")
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--report", metavar="JSON", help="only render an earlier vllm_lowbit.json into vllm_lowbit.md")
    ap.add_argument("--checkpoints", type=name_list(tuple(CHECKPOINTS)), default=tuple(CHECKPOINTS),
                    help=f"comma list of {', '.join(CHECKPOINTS)} (default: all)")
    args = ap.parse_args()
    record = json.loads(Path(args.report).read_text()) if args.report else probe(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "vllm_lowbit.json").write_text(json.dumps(record, indent=1, default=str))
    (Path(args.out) / "vllm_lowbit.md").write_text(render(record))
    print(render(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
