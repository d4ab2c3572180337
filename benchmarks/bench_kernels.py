#!/usr/bin/env python
"""Low-bit kernel candidates per layer shape, then decode/prefill throughput of the best per scheme vs bf16.

Kernel part (benchmarks/kernel_candidates.py): Llama-3-8B layer shapes (q/k/v fused 6144x4096,
o 4096x4096, gate/up fused 28672x4096, down 4096x14336, lm_head 128256x4096) x rows 1/16/64
x schemes W4G128 sym/asym, W3G64 asym, W2G64 asym, W8 sym (per channel): every candidate
(bf16, our Triton kernel per tile, tinygemm = torch's _weight_int4pack_mm (2/3-bit widened),
int8pack, gemlite per kernel type and its own choice, gemlite launched eagerly, and gemlite
again with its H100-tuned config file on a Hopper card it has no file for): us per call,
% of the memory roofline (bytes read / measured copy bandwidth), relative error vs the
reference dequantization. Decode part (benchmarks/decode_candidates.py): 32-layer 8B-shaped
models on the torch backend's engine, planner policy auto, decode batch 1/16 and prefill
2,048 tokens, weight memory, vs bf16 (+ a W4G128 variant with lm_head quantized).

Needs torch, triton (+ gemlite for its candidates); no checkpoints on disk. Usage:
  python benchmarks/bench_kernels.py --out $OUT                 # H200: both parts, within --budget-s (470)
  python benchmarks/bench_kernels.py --parts kernels --out $OUT --budget-s 470
  python benchmarks/bench_kernels.py --parts decode --out $OUT --budget-s 470
  python benchmarks/bench_kernels.py --small --out /tmp/bk       # CPU: tiny shapes, code paths only
  python benchmarks/bench_kernels.py --report DIR [DIR ...] --out $OUT   # merge earlier JSON into kernels.md
Writes <out>/kernels.json, <out>/decode.json (after every unit, so a cut-short run keeps its
numbers) and <out>/kernels.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

import decode_candidates as dc  # noqa: E402
import kernel_candidates as kc  # noqa: E402
from kernels_report import render  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def machine() -> dict:
    import platform

    cuda = torch.cuda.is_available()
    return {"card": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()})",
            "torch": torch.__version__, "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def gemlite_h100_config() -> str:
    """gemlite's tuned-config file for the H100 when this card is a Hopper its own lookup misses, else ''."""
    import importlib.util

    spec = importlib.util.find_spec("gemlite")
    if spec is None or not torch.cuda.is_available() or torch.cuda.get_device_capability(0) != (9, 0):
        return ""
    name = torch.cuda.get_device_name(0).lower()
    path = Path(spec.origin).parent / "configs" / "h100.json"
    return str(path) if "h100" not in name and path.is_file() else ""


def kernels_part(args, out: Path) -> dict:
    device, dtype = ("cuda:0", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    schemes = kc.SCHEMES_SMALL if args.small else kc.SCHEMES
    shapes = kc.SHAPES_SMALL if args.small else kc.SHAPES_8B
    schemes = {k: v for k, v in schemes.items() if not args.schemes or k in args.schemes.split(",")}
    shapes = {k: v for k, v in shapes.items() if not args.shapes or k in args.shapes.split(",")}
    rows = [1, 3] if args.small else [int(r) for r in args.rows.split(",")]
    bw = kc.copy_bandwidth(device)
    rec = {"machine": machine(), "dtype": str(dtype), "rows": rows, "copy_bandwidth_GBps": bw and bw / 1e9,
           "timing": "graph: median of CUDA-graph replays of 24 calls over copies > L2; eager: Python launches",
           "results": {}}
    budget = kc.Budget(args.kernel_budget)
    log(f"kernel part on {rec['machine']['card']}: copy bandwidth {rec['copy_bandwidth_GBps']} GB/s")
    rec["results"] = kc.sweep(schemes, shapes, rows, device, dtype, args.quick, budget, log, bw)
    save(out, "kernels", rec)
    cfg = gemlite_h100_config()
    if cfg and budget.left() > 0:
        import gemlite

        gemlite.load_config(cfg)  # then gemlite skips its autotuning wherever the file has the shape
        rec["gemlite_config_file"] = cfg
        extra = kc.sweep(schemes, shapes, rows, device, dtype, args.quick, budget, log, bw, only="gemlite",
                         suffix="+h100cfg")
        for scheme, per_shape in extra.items():
            for shape, cell in per_shape.items():
                rec["results"][scheme][shape]["candidates"].update(cell["candidates"])
        save(out, "kernels", rec)
    return rec


def decode_part(args, out: Path) -> dict:
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda:0", torch.bfloat16) if cuda else ("cpu", torch.float32)
    dims = dc.SMALL if args.small else dc.LLAMA_8B
    schemes = kc.SCHEMES_SMALL if args.small else kc.SCHEMES
    variants = [("bf16", None, None)] + [(k, v, None) for k, v in schemes.items()
                                         if not args.schemes or k in args.schemes.split(",")]
    first = next(iter(schemes.values()))
    variants.append((f"{next(iter(schemes))}_lmhead", first, first))
    rec = {"machine": machine(), "model": dims, "workloads": [w.to_dict() for w in dc.workloads_for(args.small)],
           "policy": args.decode_policy, "records": {}}
    deadline = time.perf_counter() + args.decode_budget
    cfg = gemlite_h100_config()
    if cfg:  # the planner tunes gemlite per group and row count: with the file, most W4 shapes skip autotuning
        import gemlite

        gemlite.load_config(cfg)
        rec["gemlite_config_file"] = cfg
    for name, scheme, head in variants:
        if time.perf_counter() > deadline:
            rec["records"][name] = {"skipped": "time budget spent"}
            continue
        try:
            r = dc.run_variant(dims, scheme, head, "auto" if scheme is None else args.decode_policy, device, dtype,
                               dc.workloads_for(args.small), kc.random_layer, log, quick=True)
        except Exception as exc:  # one variant failing must not lose the others
            r = {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
        rec["records"][name] = r
        if "bf16" in rec["records"] and "error" not in r and "error" not in rec["records"]["bf16"] and name != "bf16":
            r["vs_bf16"] = dc.ratios(r, rec["records"]["bf16"])
        log(f"decode {name}: {r.get('vs_bf16', r.get('error', 'baseline'))}")
        save(out, "decode", rec)
    return rec


def save(out: Path, name: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(out / f"{name}.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="kernels,decode")
    ap.add_argument("--small", action="store_true", help="tiny shapes and model: CPU check of the code paths")
    ap.add_argument("--out", default="benchmarks/results/kernels")
    ap.add_argument("--budget-s", type=float, default=470.0, help="seconds for all parts together")
    ap.add_argument("--kernel-share", type=float, default=0.5, help="share of the budget for the kernel part")
    ap.add_argument("--schemes", default="", help="comma list (default: all)")
    ap.add_argument("--shapes", default="", help="comma list of qkv,o,gate_up,down,lm_head (default: all)")
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--quick", action="store_true", help="fewer Triton tiles per M")
    ap.add_argument("--decode-policy", default="auto", help="bench.linear_kernel policy of the decode part")
    ap.add_argument("--report", nargs="+", metavar="DIR", help="only render earlier JSON into kernels.md")
    ap.add_argument("--gemlite-autotune", default="fast", choices=("fast", "default", "max"),
                    help="gemlite.set_autotune mode for shapes its config file lacks (default: gemlite's own 'fast')")
    args = ap.parse_args(argv)
    if args.gemlite_autotune != "fast" and not args.report:
        import importlib.util

        if importlib.util.find_spec("gemlite") is not None and torch.cuda.is_available():
            import gemlite

            gemlite.set_autotune(args.gemlite_autotune)
    out, parts = Path(args.out), args.parts.split(",")
    both = "kernels" in parts and "decode" in parts
    args.kernel_budget = args.budget_s * (args.kernel_share if both else 1.0)
    args.decode_budget = args.budget_s - args.kernel_budget if both else args.budget_s
    data = {}
    if args.report:
        for d in args.report:
            for name in ("kernels", "decode"):
                f = Path(d) / f"{name}.json"
                if f.is_file():
                    data[name] = json.loads(f.read_text())
    else:
        if "kernels" in parts:
            data["kernels"] = kernels_part(args, out)
            args.decode_budget = args.budget_s - (time.perf_counter() - T0)
        if "decode" in parts:
            data["decode"] = decode_part(args, out)
    out.mkdir(parents=True, exist_ok=True)
    md = render(data)
    (out / "kernels.md").write_text(md)
    print(md[-3000:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
