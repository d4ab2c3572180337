"""Markdown and console tables for benchmarks/bench_throughput.py (pure: JSON dicts in, text out)."""

from __future__ import annotations

import json
from typing import Any, Optional

GIB = 2**30
# Reference: auto-round's own W4G128 sym GPTQ checkpoint of a 3.9B Llama-3-shaped model, bf16 vs W4 tok/s
# (H200, vLLM 0.26.0, the same serving workload).
REFERENCE = {1: (387, 434), 16: (5789, 5843), 128: (24681, 32025)}
TARGETS = {"b1": 1.6, "b16": 1.0, "memory": 0.35}


def _metric(rec: dict, batch: int, key: str) -> Optional[float]:
    for r in rec.get("results", []):
        if r["batch_size"] == batch and key in r:
            return r[key]["median"]
    return None


def _f(x: Optional[float], fmt: str = "{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _ratio(q: Optional[float], b: Optional[float]) -> Optional[float]:
    return q / b if q is not None and b else None


def _torch_rows(part: dict) -> list[str]:
    recs = part["records"]
    base = recs.get("baseline", {})
    batches = part["workload"]["batch_sizes"]
    head = ["variant"] + [f"b{b} decode tok/s (x bf16)" for b in batches] + \
        [f"b{batches[0]} TTFT ms", "weight mem GiB (x bf16)", "decoder Linears (x bf16)", "disk GiB", "glue"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rec in recs.items():
        if "error" in rec:
            rows.append(f"| {name} | FAILED: {rec['error'][:200]} |")
            continue
        cells = [name]
        for b in batches:
            q, r = _metric(rec, b, "decode_tokens_per_s"), _ratio(_metric(rec, b, "decode_tokens_per_s"),
                                                                   _metric(base, b, "decode_tokens_per_s"))
            cells.append(f"{_f(q)} ({_f(r, '{:.2f}x')})")
        cells.append(_f(_metric(rec, batches[0], "ttft_ms")))
        wm = rec.get("weight_memory_bytes")
        cells.append(f"{_f(wm / GIB if wm else None, '{:.2f}')} ({_f(_ratio(wm, base.get('weight_memory_bytes')), '{:.3f}x')})")
        cells.append(_f(_ratio(rec.get("decoder_linear_bytes"), base.get("decoder_linear_bytes")), "{:.3f}x"))
        disk = rec.get("size_on_disk_bytes")
        cells.append(_f(disk / GIB if disk else None, "{:.2f}"))
        cells.append(f"compile={rec.get('compile')} graphs={rec.get('cuda_graphs')}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def torch_targets(part: dict) -> list[str]:
    recs = part["records"]
    base, w4 = recs.get("baseline", {}), recs.get("w4g128", {})
    if part.get("model", {}).get("hidden_size") != 4096 or not str(part.get("device_name", "")).startswith("NVIDIA"):
        return ["- targets (batch 1 >= 1.6x, batch 16 >= 1.0x, memory <= 0.35x) apply to the Llama-3-8B GPU run only"]
    if "results" not in w4 or "results" not in base:
        return ["- W4G128 targets: not measured"]
    out = []
    for b, key in ((1, "b1"), (16, "b16")):
        r = _ratio(_metric(w4, b, "decode_tokens_per_s"), _metric(base, b, "decode_tokens_per_s"))
        ok = r is not None and r >= TARGETS[key]
        out.append(f"- W4G128 decode batch {b}: {_f(r, '{:.2f}x')} bf16 (target >= {TARGETS[key]}x): "
                   f"{'met' if ok else 'NOT met'}")
    m = _ratio(w4.get("weight_memory_bytes"), base.get("weight_memory_bytes"))
    d = _ratio(w4.get("decoder_linear_bytes"), base.get("decoder_linear_bytes"))
    out.append(f"- W4G128 weight memory: {_f(m, '{:.3f}x')} bf16 for the whole model (target <= 0.35x: "
               f"{'met' if m is not None and m <= 0.35 else 'NOT met'}); {_f(d, '{:.3f}x')} for the decoder Linears "
               "(embeddings and lm_head stay bf16: 2 x 1.05 GB of Llama-3-8B, so the whole-model floor is about 0.355x)")
    head = recs.get("w4g128_lmhead", {})
    if "results" in head:
        sp = [_ratio(_metric(head, b, "decode_tokens_per_s"), _metric(base, b, "decode_tokens_per_s")) for b in (1, 16)]
        out.append(f"- W4G128 with lm_head quantized too: weight memory "
                   f"{_f(_ratio(head.get('weight_memory_bytes'), base.get('weight_memory_bytes')), '{:.3f}x')} bf16, "
                   f"decode {_f(sp[0], '{:.2f}x')} (batch 1), {_f(sp[1], '{:.2f}x')} (batch 16)")
    return out


def kernel_rows(part: dict) -> list[str]:
    rows = ["| variant | layer group | routes (chosen) | M | bf16 us | tinygemm us | best Triton us (tile) |",
            "|---|---|---|---|---|---|---|"]
    for name, rec in part["records"].items():
        for g in rec.get("kernels", []):
            if not g.get("ms"):
                continue
            for m, bf in sorted((int(k), v) for k, v in g.get("bf16_ms", {}).items()):
                tiny = g["ms"].get("tinygemm", {}).get(str(m), g["ms"].get("tinygemm", {}).get(m))
                triton = [(v.get(str(m), v.get(m)), lab) for lab, v in g["ms"].items() if lab.startswith("triton")]
                triton = [t for t in triton if t[0] is not None and t[0] != float("inf")]
                best = min(triton) if triton else (None, "-")
                rows.append(f"| {name} | {g['signature']} | {', '.join(g['routes'])} | {m} | {_f(bf * 1e3)} | "
                            f"{_f(tiny * 1e3 if tiny not in (None, float('inf')) else None)} | "
                            f"{_f(best[0] * 1e3 if best[0] else None)} ({best[1].replace('triton:', '')}) |")
    return rows


def _vllm_rows(part: dict) -> list[str]:
    recs = part["records"]
    batches = part["workload"]["batch_sizes"]
    head = ["model", "quantization", "linear kernel"] + [f"b{b} tok/s" for b in batches] + \
        [f"b{b} x bf16" for b in batches] + ["weights GiB", "engine start s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = recs.get("baseline", {})
    for name, rec in recs.items():
        if "error" in rec:
            rows.append(f"| {name} | FAILED: {rec['error'][:300]} |")
            continue
        kern = ", ".join(k["kernel"] for k in rec.get("linear_kernels", [])) or "-"
        cells = [name, str(rec.get("quantization") or rec.get("quantization_logged")), kern]
        cells += [_f(_metric(rec, b, "output_tokens_per_s")) for b in batches]
        cells += [_f(_ratio(_metric(rec, b, "output_tokens_per_s"), _metric(base, b, "output_tokens_per_s")),
                     "{:.2f}x") for b in batches]
        cells += [_f(rec.get("weight_memory_gib"), "{:.2f}"), _f(rec.get("engine_start_s"), "{:.0f}")]
        rows.append("| " + " | ".join(cells) + " |")
    ref = ["auto-round's W4G128 checkpoint, 3.9B (reference)", "Machete", "-"]
    ref += [f"{REFERENCE[b][0]} / {REFERENCE[b][1]}" if b in REFERENCE else "-" for b in batches]
    ref += [f"{REFERENCE[b][1] / REFERENCE[b][0]:.2f}x" if b in REFERENCE else "-" for b in batches] + ["-", "-"]
    rows.append("| " + " | ".join(ref) + " |")
    return rows


def one_line(message: str) -> str:
    """A table cell from an error message: whitespace folded, pydantic's wrapper dropped."""
    text = " ".join(message.split())
    if "Value error, " in text:
        text = text.split("Value error, ", 1)[1].split(" [type=", 1)[0]
    return text


def _check_rows(part: dict) -> list[str]:
    rows = ["| checkpoint | loads in vLLM | quantization method | linear kernel | details |", "|---|---|---|---|---|"]
    for name, c in part.get("checks", {}).items():
        kern = ", ".join(f"{k['kernel']} ({k['method']})" for k in c.get("linear_kernels", [])) or "-"
        detail = c.get("error", "") or "; ".join(c.get("quant_log_lines", [])[:2])
        if c.get("float16_retry"):
            r = c["float16_retry"]
            detail += f" | float16 retry: {'loads' if r.get('ok') else 'fails'} " \
                      f"({r.get('quantization') or r.get('quantization_logged')}, " \
                      f"{', '.join(k['kernel'] for k in r.get('linear_kernels', [])) or '-'}) {r.get('error', '')[:200]}"
        rows.append(f"| {name} | {'yes' if c.get('ok') else 'no'} | {c.get('quantization') or c.get('quantization_logged')}"
                    f" | {kern} | {one_line(detail)[:600].replace('|', '/')} |")
    return rows


def render_markdown(parts: dict[str, Any]) -> str:
    lines = ["# Generation throughput: packed low-bit checkpoints vs bf16", ""]
    t = parts.get("torch")
    if t:
        lines += [f"## torch backend ({t.get('device_name')}, torch {t.get('torch_version')})", "",
                  f"Model: {t['model']}. Workload: {t['workload']}. Decode tokens/s = batch x (output_len - 1) / "
                  "(total - TTFT), medians of the timed passes.", ""]
        lines += _torch_rows(t) + [""] + torch_targets(t) + ["", "### Kernels per layer group (GPU time per call)", ""]
        lines += kernel_rows(t) + [""]
        if t.get("kernel_checks"):
            lines += ["### Kernel correctness on this GPU", "", "```", json.dumps(t["kernel_checks"], indent=1), "```", ""]
        rejected = [f"- {n} {g['signature']}: {lab}: {why}" for n, r in t["records"].items()
                    for g in r.get("kernels", []) for lab, why in g.get("rejected", {}).items()]
        notes = [f"- {n}: {x}" for n, r in t["records"].items() for x in r.get("engine_notes", [])]
        notes += [f"- {n} {g['signature']}: {g['note']}" for n, r in t["records"].items()
                  for g in r.get("kernels", []) if g.get("note")]
        if rejected or notes:
            lines += ["### Rejected kernel candidates and fallbacks", ""] + rejected[:40] + notes + [""]
    v = parts.get("vllm")
    if v and v.get("skipped"):
        lines += ["## vLLM backend", "", f"Skipped: {v['skipped']}", ""]
    elif v:
        lines += [f"## vLLM backend ({v.get('device_name')}; {v.get('parameters', 0) / 1e9:.2f}B parameters)", "",
                  f"Workload: {v['workload']}; output tokens/s (medians).", ""]
        lines += _vllm_rows(v) + [""]
        if v.get("checks"):
            lines += ["### Other checkpoints (2-layer model, enforce_eager)", ""] + _check_rows(v) + [""]
    return "\n".join(lines) + "\n"


def short_table(parts: dict[str, Any]) -> str:
    out = ["", "=== summary ==="]
    t = parts.get("torch")
    if t:
        for name, rec in t["records"].items():
            if "error" in rec:
                out.append(f"torch {name:9s} FAILED {rec['error'][:150]}")
                continue
            sp = rec.get("decode_speedup_vs_baseline", {})
            dec = " ".join(f"b{r['batch_size']}={r['decode_tokens_per_s']['median']:.0f}" for r in rec["results"]
                           if "decode_tokens_per_s" in r)
            out.append(f"torch {name:9s} decode tok/s {dec}  x bf16 {sp or '-'}  "
                       f"mem {rec.get('weight_memory_bytes', 0) / GIB:.2f} GiB ({rec.get('weight_memory_ratio', 1):.3f}x)")
        out += torch_targets(t)
    v = parts.get("vllm")
    if v and not v.get("skipped"):
        for name, rec in v["records"].items():
            if "error" in rec:
                out.append(f"vllm  {name:11s} FAILED {rec['error'][:200]}")
                continue
            toks = " ".join(f"b{r['batch_size']}={r['output_tokens_per_s']['median']:.0f}" for r in rec["results"])
            kern = ",".join(k["kernel"] for k in rec.get("linear_kernels", [])) or "-"
            out.append(f"vllm  {name:11s} {toks}  x bf16 {rec.get('speedup_vs_baseline', '-')}  kernel {kern}")
        for name, c in v.get("checks", {}).items():
            kern = ",".join(k["kernel"] for k in c.get("linear_kernels", [])) or "-"
            out.append(f"vllm check {name}: {'loads' if c.get('ok') else 'REFUSED'} "
                       f"{c.get('quantization') or ''} {kern} {c.get('error', '')[:160]}")
    elif v:
        out.append(f"vllm: skipped ({v['skipped']})")
    return "\n".join(out)
