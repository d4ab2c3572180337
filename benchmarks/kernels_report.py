"""Markdown tables of benchmarks/bench_kernels.py's JSON (kernels.json, decode.json)."""

from __future__ import annotations

from typing import Optional

from kernel_candidates import best_of

# scheme -> (decode x bf16 at batch 1, at batch 16): the targets the table is checked against
DECODE_TARGETS = {"w4g128_sym": (2.2, 1.3), "w4g128_asym": (2.2, 1.3), "w3g64_asym": (2.3, 1.1),
                  "w2g64_asym": (2.6, 1.1)}
PREFILL_TARGET, W4_MEMORY_TARGET = 0.9, 0.36


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _cell(b: Optional[tuple[float, str, float]], roof: Optional[float] = None) -> str:
    if b is None:
        return "–"
    return f"{b[0]:.1f} ({b[1]})" if b[1] != "-" else f"{b[0]:.1f}"


def kernel_tables(rec: dict) -> list[str]:
    m = rec["machine"]
    lines = [f"## Kernel candidates per layer shape ({m['card']}, torch {m['torch']}, {m['date']})", "",
             f"`{m['command']}`. us per call, {rec['timing']}; copy bandwidth "
             f"{(rec.get('copy_bandwidth_GBps') or 0):.0f} GB/s. Each cell: the candidate's fastest config whose "
             "relative error vs the reference dequantization is < 2e-2; best = fastest of all, with its % of the "
             "memory roofline (bytes read / copy bandwidth) and relative error. Prefill rows time bf16 and the "
             "scratch route only (dequantize into one shared buffer, then cuBLAS); lm_head has no prefill rows."
             + (f" gemlite tuned-config file: {rec['gemlite_config_file']}." if rec.get("gemlite_config_file") else ""),
             ""]
    for src in rec.get("merged_from", []):
        lines += [f"- from `{src['command']}` ({src['card']}, {src['date']}): {len(src['entries'])} scheme/shape "
                  f"entries ({', '.join(src['entries'])})"]
    if rec.get("merged_from"):
        lines += [""]
    for scheme, per_shape in rec["results"].items():
        names = sorted({c for cell in per_shape.values() for c in cell["candidates"]}, key=lambda n: (n != "bf16", n))
        rows = []
        for shape, cell in per_shape.items():
            if cell.get("skipped"):
                rows.append([f"{shape} {cell['n']}x{cell['k']}", "all", *["–"] * len(names), cell["skipped"]])
                continue
            for mrow in cell.get("rows", rec["rows"]):
                cands = cell["candidates"]
                bests = {n: best_of(cands[n], mrow) if n in cands and "error" not in cands[n] else None for n in names}
                quant = {n: b for n, b in bests.items() if b and n != "bf16"}
                top = min(quant, key=lambda n: quant[n][0]) if quant else None
                roof = cands[top][quant[top][1]][str(mrow)].get("roofline_pct") if top else None
                bf = bests.get("bf16")
                speed = f" {bf[0] / quant[top][0]:.2f}x bf16" if top and bf else ""
                best = (f"{top} {quant[top][0]:.1f}{speed}, {roof:.0f}% roofline, err {quant[top][2]:.1e}"
                        if top and roof is not None else (f"{top} {quant[top][0]:.1f}" if top else "–"))
                rows.append([f"{shape} {cell['n']}x{cell['k']}", str(mrow), *[_cell(bests[n]) for n in names], best])
        lines += [f"### {scheme}", "", *_table(["shape", "M", *names, "best"], rows), ""]
        skipped = {k: v for cell in per_shape.values() for k, v in cell.get("not_applicable", {}).items()}
        if skipped:
            lines += ["Not applicable: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()), ""]
    return lines


def _fmt(x: Optional[float], nd: int = 2) -> str:
    return "–" if x is None or x != x else f"{x:.{nd}f}"


def decode_tables(rec: dict) -> list[str]:
    m = rec["machine"]
    lines = [f"## Decode and prefill on the torch backend ({m['card']}, torch {m['torch']}, {m['date']})", "",
             f"`{m['command']}`. Model {rec['model']}, random weights; policy `{rec['policy']}`; workloads "
             f"{rec['workloads']}; batch-1 weight {rec.get('batch1_weight', 1.0)}. Decode tokens/s = batch x "
             "(output_len - 1) / (total - TTFT), medians. scratch MiB: the one buffer the large-M route shares "
             "(not in weight memory).", ""]
    rows, checks = [], []
    for name, r in rec["records"].items():
        if "decode" not in r:
            rows.append([name, r.get("error", r.get("skipped", "?"))[:200], *[""] * (len(rec["workloads"][0]["batch_sizes"]) + 4)])
            continue
        dec = {d["batch_size"]: d["decode_tokens_per_s"]["median"] for d in r["decode"]}
        ttft = r["prefill"][0]["ttft_ms"]["median"] if r.get("prefill") else None
        v = r.get("vs_bf16", {})
        routes = "; ".join(f"{p['group']}: {', '.join(p['routes'])}" for p in r["plans"] if "dense" not in p["group"])
        rows.append([name, *[f"{dec.get(b, float('nan')):.1f} ({_fmt(v.get(f'decode_b{b}', 1.0 if name == 'bf16' else None))}x)"
                             for b in sorted(dec)],
                     f"{_fmt(ttft, 1)} ({_fmt(v.get('prefill_b1', 1.0 if name == 'bf16' else None))}x)",
                     f"{r['weight_memory_bytes'] / 2**30:.2f} ({_fmt(v.get('weight_memory', 1.0 if name == 'bf16' else None), 3)}x)",
                     _fmt(v.get("decoder_linears"), 3), f"{r.get('scratch_bytes', 0) / 2**20:.0f}", routes[:400]])
        target = DECODE_TARGETS.get(name)
        if target and v:
            ok = v.get("decode_b1", 0) >= target[0] and v.get("decode_b16", 0) >= target[1]
            checks.append(f"- {name}: decode {_fmt(v.get('decode_b1'))}x / {_fmt(v.get('decode_b16'))}x bf16 at batch "
                          f"1 / 16 (targets >= {target[0]}x / >= {target[1]}x): {'met' if ok else 'NOT met'}; prefill "
                          f"{_fmt(v.get('prefill_b1'))}x (target >= {PREFILL_TARGET}x)")
        if name.startswith("w4g128") and v and "lmhead" not in name:
            checks.append(f"- {name} weight memory {_fmt(v.get('weight_memory'), 3)}x bf16 (target <= {W4_MEMORY_TARGET}x)")
    batches = rec["workloads"][0]["batch_sizes"]
    prefill_len = rec["workloads"][-1]["input_len"]
    lines += _table(["variant", *[f"b{b} decode tok/s (x bf16)" for b in batches],
                     f"prefill {prefill_len} TTFT ms (x bf16)",
                     "weight mem GiB (x bf16)", "decoder Linears x bf16", "scratch MiB", "kernels chosen"], rows)
    others = [f"- {name}: ratios to the bf16 of its own run (`{r['baseline_from']['command']}`, "
              f"{r['baseline_from']['date']})" for name, r in rec["records"].items() if "baseline_from" in r]
    if others:
        others.insert(0, "Measured in a later run than the rest of the table (the bf16 row is this table's run):")
    return lines + [""] + checks + [""] + others + ([""] if others else [])


def _measured(cell: dict) -> int:
    """How many (candidate, config, rows) timings a per-shape entry holds."""
    return sum(1 for cand in cell.get("candidates", {}).values() if isinstance(cand, dict)
               for cfg in cand.values() if isinstance(cfg, dict)
               for t in cfg.values() if isinstance(t, dict) and "us" in t)


def merge_kernels(records: list[dict]) -> dict:
    """Several runs' per-shape matrices as one: each (scheme, shape) entry comes from the run that measured the
    most timings for it (a later run of the missing schemes/shapes fills what an earlier one's time budget left
    out). The result names every run it took an entry from in `merged_from`."""
    out = {**records[0], "results": {}}
    used: dict[int, set] = {}
    for i, rec in enumerate(records):
        for scheme, shapes in rec["results"].items():
            dest = out["results"].setdefault(scheme, {})
            for shape, cell in shapes.items():
                if shape not in dest or _measured(cell) > _measured(dest[shape][1]):
                    dest[shape] = (i, cell)
    for scheme, shapes in out["results"].items():
        for shape, (i, cell) in shapes.items():
            used.setdefault(i, set()).add(f"{scheme} {shape}")
            shapes[shape] = cell
    if len(records) > 1:
        out["merged_from"] = [{**records[i]["machine"], "entries": sorted(names)} for i, names in sorted(used.items())]
    return out


def merge_decode(records: list[dict]) -> dict:
    """Several runs' decode records as one: the first run's variants, plus each variant a later run measured that
    the earlier ones skipped or lack. A taken variant keeps its ratios to its own run's bf16 and names that run in
    `baseline_from` (the table says so)."""
    out = {**records[0], "records": dict(records[0]["records"])}
    for rec in records[1:]:
        for name, r in rec["records"].items():
            if name != "bf16" and "decode" in r and "decode" not in out["records"].get(name, {}):
                out["records"][name] = {**r, "baseline_from": rec["machine"]}
    return out


def render(data: dict) -> str:
    lines = ["# Low-bit kernels on the torch backend", ""]
    if "kernels" in data:
        lines += kernel_tables(data["kernels"])
    if "decode" in data:
        lines += decode_tables(data["decode"])
    return "\n".join(lines).rstrip() + "\n"
