#!/usr/bin/env python
"""Low-bit kernel candidates per layer shape, then decode/prefill throughput of the best per scheme vs bf16.

Kernel part (benchmarks/kernel_candidates.py): Llama-3-8B layer shapes (q/k/v fused 6144x4096,
o 4096x4096, gate/up fused 28672x4096, down 4096x14336, lm_head 128256x4096) x rows 1/16/64
(+ 2048, the prefill, except lm_head) x schemes W4G128 sym/asym, W3G64 asym, W2G64 asym, W8 sym
(per channel): every candidate (bf16, our Triton kernel per tile, tinygemm = torch's
_weight_int4pack_mm (2/3-bit widened), int8pack, gemlite, and at prefill rows the scratch route):
us per call, % of the memory roofline (bytes read / measured copy bandwidth), relative error vs
the reference dequantization. Each scheme gets an equal share of the kernel part's time (a time
box; what does not fit is recorded as skipped). Decode part (benchmarks/decode_candidates.py):
32-layer 8B-shaped models on the torch backend's engine, planner policy auto (quick tuning),
decode batch 1/16 and prefill 2,048 tokens, weight memory, vs bf16; variants bf16, W4G128 sym,
W4G128 asym, W3G64, W2G64, W4G128 sym with lm_head quantized, W4G128 sym planned with batch 1
weighted 4 (bench.kernel_batch1_weight: the one-format trade-off), W8; a variant starts only
when the time left covers the slowest one so far.

On a Hopper card other than the H100, gemlite's H100-tuned config file is loaded (most W4
shapes then skip gemlite's autotuning); the record names it.

Needs torch, triton (+ gemlite for its candidates); no checkpoints on disk. Usage:
  python benchmarks/bench_kernels.py --out $OUT                  # H200: both parts, about --budget-s (510) s
  python benchmarks/bench_kernels.py --parts kernels --out $OUT --budget-s 300
  python benchmarks/bench_kernels.py --parts decode --out $OUT --budget-s 300
  python benchmarks/bench_kernels.py --small --out /tmp/bk        # CPU: tiny shapes, code paths only
  python benchmarks/bench_kernels.py --report DIR [DIR ...] --out $OUT   # merge earlier JSON into kernels.md
Writes <out>/kernels.json, <out>/decode.json and <out>/kernels.md after every unit (a shape of a
scheme, a decode variant), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts from here, before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

import decode_candidates as dc  # noqa: E402
import kernel_candidates as kc  # noqa: E402
from kernels_report import merge_decode, merge_kernels, render  # noqa: E402

FIRST_VARIANT_GUESS_S = 45.0  # a decode variant's wall time before one has been measured (8B-shaped, H200)
BATCH1_WEIGHT_VARIANT = 4.0  # the extra decode variant's bench.kernel_batch1_weight


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


def use_gemlite_h100_config(rec: dict) -> None:
    """Load gemlite's H100-tuned configs on another Hopper card (its own lookup misses it); record the file."""
    cfg = gemlite_h100_config()
    if cfg:
        import gemlite

        gemlite.load_config(cfg)  # then gemlite skips its autotuning wherever the file has the shape
        rec["gemlite_config_file"] = cfg


def kernels_part(args, out: Path, data: dict) -> dict:
    device, dtype = ("cuda:0", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    schemes = kc.SCHEMES_SMALL if args.small else kc.SCHEMES
    shapes = kc.SHAPES_SMALL if args.small else kc.SHAPES_8B
    schemes = {k: v for k, v in schemes.items() if not args.schemes or k in args.schemes.split(",")}
    shapes = {k: v for k, v in shapes.items() if not args.shapes or k in args.shapes.split(",")}
    rows = [1, 3] if args.small else [int(r) for r in args.rows.split(",")]
    prefill = [64] if args.small else [int(r) for r in args.prefill_rows.split(",") if r]
    bw = kc.copy_bandwidth(device)
    rec = {"machine": machine(), "dtype": str(dtype), "rows": rows, "prefill_rows": prefill,
           "copy_bandwidth_GBps": bw and bw / 1e9, "results": {},
           "timing": "median of CUDA-graph replays of 24 calls over copies > L2" if device != "cpu" else "wall clock"}
    use_gemlite_h100_config(rec)
    data["kernels"] = rec
    log(f"kernel part on {rec['machine']['card']}: copy bandwidth {rec['copy_bandwidth_GBps']} GB/s, "
        f"{args.kernel_budget:.0f} s")

    def on_unit(results: dict) -> None:
        rec["results"] = results
        save(out, "kernels", rec, data)

    rec["results"] = kc.sweep(schemes, shapes, rows, device, dtype, not args.full_tiles, kc.Budget(args.kernel_budget),
                              log, bw, tuple(prefill), on_unit)
    save(out, "kernels", rec, data)
    return rec


def decode_variants(args) -> list[tuple]:
    """(name, scheme, lm_head scheme, batch-1 weight) in priority order: bf16, every scheme but W8, the lm_head
    variant, the first scheme again with batch 1 weighted BATCH1_WEIGHT_VARIANT (the one-format trade-off), W8.
    With --schemes, only the named schemes run (the two extra variants only when the first scheme is named)."""
    schemes = kc.SCHEMES_SMALL if args.small else kc.SCHEMES
    chosen = [(k, v) for k, v in schemes.items() if not args.schemes or k in args.schemes.split(",")]
    first_name, first = next(iter(schemes.items()))
    w, late = args.batch1_weight, [(k, v, None, args.batch1_weight) for k, v in chosen if v[0] == 8]
    extra = [(f"{first_name}_lmhead", first, first, w),
             (f"{first_name}_b1w{BATCH1_WEIGHT_VARIANT:g}", first, None, BATCH1_WEIGHT_VARIANT)]
    return ([("bf16", None, None, w)] + [(k, v, None, w) for k, v in chosen if v[0] != 8]
            + (extra if any(k == first_name for k, _ in chosen) else []) + late)


def decode_part(args, out: Path, data: dict) -> dict:
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda:0", torch.bfloat16) if cuda else ("cpu", torch.float32)
    dims = dc.SMALL if args.small else dc.LLAMA_8B
    rec = {"machine": machine(), "model": dims, "workloads": [w.to_dict() for w in dc.workloads_for(args.small)],
           "policy": args.decode_policy, "batch1_weight": args.batch1_weight, "records": {}}
    if cuda:
        use_gemlite_h100_config(rec)
    data["decode"] = rec
    deadline = T0 + args.budget_s
    slowest = 0.0 if args.small else FIRST_VARIANT_GUESS_S
    for name, scheme, head, batch1_weight in decode_variants(args):
        left = deadline - time.perf_counter()
        if left < 1.1 * slowest:
            rec["records"][name] = {"skipped": f"time budget spent ({left:.0f} s left, a variant takes ~{slowest:.0f} s)"}
            save(out, "decode", rec, data)
            continue
        t0 = time.perf_counter()
        try:
            r = dc.run_variant(dims, scheme, head, "auto" if scheme is None else args.decode_policy, device, dtype,
                               dc.workloads_for(args.small), kc.random_layer, log, quick=True,
                               batch1_weight=batch1_weight)
        except Exception as exc:  # one variant failing must not lose the others
            r = {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
        slowest = max(slowest, time.perf_counter() - t0)
        rec["records"][name] = r
        base = rec["records"].get("bf16", {})
        if name != "bf16" and "error" not in r and "decode" in base:
            r["vs_bf16"] = dc.ratios(r, base)
        log(f"decode {name}: {r.get('vs_bf16', r.get('error', 'baseline'))}")
        save(out, "decode", rec, data)
    return rec


def save(out: Path, name: str, rec: dict, data: dict) -> None:
    """Write <out>/<name>.json and re-render <out>/kernels.md (atomically: a cut-short run keeps both)."""
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in ((f"{name}.json", json.dumps(rec, indent=1, default=str) + "\n"), ("kernels.md", render(data))):
        tmp = out / f".{fname}.tmp"
        tmp.write_text(text)
        tmp.replace(out / fname)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="kernels,decode")
    ap.add_argument("--small", action="store_true", help="tiny shapes and model: CPU check of the code paths")
    ap.add_argument("--out", default="benchmarks/results/kernels")
    ap.add_argument("--budget-s", type=float, default=510.0, help="seconds for the whole run, from start-up")
    ap.add_argument("--kernel-share", type=float, default=0.4, help="share of the budget for the kernel part")
    ap.add_argument("--schemes", default="", help="comma list (default: all)")
    ap.add_argument("--shapes", default="", help="comma list of qkv,o,gate_up,down,lm_head (default: all)")
    ap.add_argument("--rows", default="1,16,64", help="decode row counts of the kernel part")
    ap.add_argument("--prefill-rows", default="2048", help="prefill row counts of the kernel part (bf16 vs scratch)")
    ap.add_argument("--full-tiles", action="store_true", help="every Triton tile and gemlite kernel (slower)")
    ap.add_argument("--decode-policy", default="auto", help="bench.linear_kernel policy of the decode part")
    ap.add_argument("--batch1-weight", type=float, default=1.0, help="bench.kernel_batch1_weight of the decode part")
    ap.add_argument("--report", nargs="+", metavar="DIR",
                    help="only merge earlier runs' JSON into kernels.json, decode.json and kernels.md (kernel "
                         "matrices merge per shape; decode variants a later run measured fill those an earlier one "
                         "skipped)")
    args = ap.parse_args(argv)
    out, parts = Path(args.out), args.parts.split(",")
    both = "kernels" in parts and "decode" in parts
    args.kernel_budget = (args.budget_s * (args.kernel_share if both else 1.0)) - (time.perf_counter() - T0)
    data: dict = {}
    if args.report:  # kernel matrices merge per (scheme, shape); decode records per variant
        matrices = [json.loads((Path(d) / "kernels.json").read_text()) for d in args.report
                    if (Path(d) / "kernels.json").is_file()]
        if matrices:
            data["kernels"] = merge_kernels(matrices)
        decodes = [json.loads((Path(d) / "decode.json").read_text()) for d in args.report
                   if (Path(d) / "decode.json").is_file()]
        if decodes:
            data["decode"] = merge_decode(decodes)
        for name in ("kernels", "decode"):  # the merged records beside the table (inputs are read already)
            if name in data:
                save(out, name, data[name], data)
    else:
        if "kernels" in parts:
            kernels_part(args, out, data)
        if "decode" in parts:
            decode_part(args, out, data)
    out.mkdir(parents=True, exist_ok=True)
    md = render(data)
    (out / "kernels.md").write_text(md)
    print(md[-3000:], flush=True)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
