"""Merge the JSON/Markdown written by benchmarks/published_results.py's parts into RESULTS.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

# Targets (quality vs the unquantized model, and cost) checked in the summary.
AUTOROUND_PPL_TARGETS = {"W2G64 asym": 1.7, "W3G64 asym": 1.13, "W4G64 sym": 1.025}
SECONDS_TARGETS = {("autoround", "W2G64 asym"): 40.0, ("gptq", "W4G64 sym"): 20.0}
# Recovery targets: perplexity vs the unquantized model after AutoRound + recovery, and its time budget.
RECOVER_PPL_TARGETS = {"W2G64 asym": 1.35, "W3G64 asym": 1.08, "W4G64 sym": 1.015}
RECOVER_SECONDS_TARGET = ("W2G64 asym", 150.0)  # quantize + recover, AutoRound
TASK_METRICS = (("persuasion_ppl.bits_per_byte", "bits/byte"), ("persuasion_lastword.acc", "last-word acc"),
                ("persuasion_nextsent.acc", "next-sentence acc"))


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def _metric(manifest: Optional[dict], key: str) -> Optional[float]:
    return None if manifest is None else manifest.get("metrics", {}).get(key)


def quality_rows(record: dict) -> tuple[list[list[str]], dict[tuple[str, str], dict]]:
    """Table rows (baseline first) and per-cell numbers for the target checks."""
    cells = record["cells"]
    base = next((c["manifests"].get("baseline_evaluate") for c in cells if "baseline_evaluate" in c["manifests"]), None)
    base_ppl = _metric(base, "ppl")
    rows = [["unquantized", "bf16/fp32", _fmt(base_ppl, 2), "1.000",
             *[_fmt(_metric(base, k)) for k, _ in TASK_METRICS], "–", "–", _fmt(_metric(base, "size_mb"), 1)]]
    numbers: dict[tuple[str, str], dict] = {}
    for c in cells:
        m = c["manifests"]
        ppl = _metric(m.get("evaluate"), "ppl")
        ratio = ppl / base_ppl if ppl and base_ppl else None
        seconds = _metric(m.get("quantize"), "seconds")
        peak = _metric(m.get("quantize"), "peak_gpu_mem_gb")
        size = _metric(m.get("pack"), "size_mb")
        numbers[(c["method"], c["scheme"])] = {"ppl": ppl, "ratio": ratio, "seconds": seconds}
        rows.append([c["method"], c["scheme"], _fmt(ppl, 2), _fmt(ratio),
                     *[_fmt(_metric(m.get("evaluate"), k)) for k, _ in TASK_METRICS],
                     _fmt(seconds, 1), _fmt(peak, 2), _fmt(size, 1)])
    return rows, numbers


def table(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
                      *("| " + " | ".join(r) + " |" for r in rows)])


def target_lines(numbers: dict[tuple[str, str], dict]) -> list[str]:
    out = []
    for scheme, target in AUTOROUND_PPL_TARGETS.items():
        r = numbers.get(("autoround", scheme), {}).get("ratio")
        if r is not None:
            out.append(f"- AutoRound {scheme}: perplexity {r:.3f}x the unquantized model (target <= {target}x): "
                       f"{'met' if r <= target else 'NOT met'}")
    for scheme in ("W4G64 sym", "W3G64 asym", "W2G64 asym"):
        g, r = numbers.get(("gptq", scheme), {}).get("ppl"), numbers.get(("rtn", scheme), {}).get("ppl")
        if g is not None and r is not None:
            out.append(f"- GPTQ vs RTN {scheme}: {g:.2f} vs {r:.2f} perplexity ({'GPTQ better' if g < r else 'GPTQ not better'})")
    for (method, scheme), target in SECONDS_TARGETS.items():
        s = numbers.get((method, scheme), {}).get("seconds")
        if s is not None:
            out.append(f"- {method} {scheme} whole-model quantize stage: {s:.1f} s (target <= {target:.0f} s): "
                       f"{'met' if s <= target else 'NOT met'}")
    return out


def calibration_line(record: dict) -> str:
    calib = next((c["manifests"]["calibrate"] for c in record["cells"] if "calibrate" in c["manifests"]), None)
    model = next((c["manifests"]["quantize"].get("config", {}) for c in record["cells"]
                  if "quantize" in c["manifests"] and c["method"] == "autoround"), {})
    what = "?"
    if calib is not None:
        cc = calib["config"]["calib"]
        what = f"{cc['nsamples']} x {cc['seqlen']} tokens of {cc['source']} ({cc['mode']})"
    iters = model.get("quant", {}).get("iters") if model else None
    return (f"Calibrated on {what}, never on Persuasion; AutoRound {iters} iterations per block. Every score is of "
            "the packed checkpoint loaded back from disk (sym cells GPTQ format, asym cells auto-round format).")


def _machine_line(m: dict) -> str:
    return f"{m.get('date', '?')}, {m.get('card', m.get('device', '?'))}, torch {m.get('torch', '?')}: `{m.get('command', m.get('argv', '?'))}`"


def _section_from_md(title: str, folder: Path) -> list[str]:
    files = sorted(folder.glob("*.md")) if folder.is_dir() else []
    if not files:
        return [f"## {title}", "", f"(not run: no results in {folder.name}/)", ""]
    lines = [f"## {title}", ""]
    for f in files:
        text = f.read_text().strip()
        lines += [text.replace("\n# ", "\n### ").replace("\n## ", "\n### ") if not text.startswith("#") else
                  "###" + text.lstrip("#"), ""]
    return lines


def recover_rows(record: dict) -> tuple[list[list[str]], dict[tuple[str, str, str], dict]]:
    """One row per (quantizer, scheme, recovery) cell: quality, time, extra bytes."""
    cells = record["cells"]
    base = next((c["manifests"].get("baseline_evaluate") for c in cells if "baseline_evaluate" in c["manifests"]), None)
    base_ppl = _metric(base, "ppl")
    rows, numbers = [], {}
    for c in cells:
        m = c["manifests"]
        ppl = _metric(m.get("evaluate"), "ppl")
        ratio = ppl / base_ppl if ppl and base_ppl else None
        q_s, r_s = _metric(m.get("quantize"), "seconds"), _metric(m.get("recover"), "seconds")
        both = (q_s or 0.0) + (r_s or 0.0) if q_s is not None else None
        loss = "–"
        if m.get("recover"):
            loss = f"{_metric(m['recover'], 'train_loss_init'):.3f} -> {_metric(m['recover'], 'train_loss_final'):.3f}"
        numbers[(c["method"], c["scheme"], c.get("recover", "none"))] = {"ratio": ratio, "seconds": both}
        rows.append([c["method"], c["scheme"], c.get("recover", "none"), _fmt(ppl, 2), _fmt(ratio), loss,
                     _fmt(q_s, 1), _fmt(r_s, 1), _fmt(both, 1), _fmt(_metric(m.get("pack"), "size_mb"), 1),
                     _fmt(_metric(m.get("recover"), "adapter_mb"), 2)])
    return [["unquantized", "bf16/fp32", "–", _fmt(base_ppl, 2), "1.000", *["–"] * 6]] + rows, numbers


def recover_target_lines(numbers: dict[tuple[str, str, str], dict]) -> list[str]:
    out = []
    for scheme, target in RECOVER_PPL_TARGETS.items():
        best = [(v["ratio"], mode) for (meth, sch, mode), v in numbers.items()
                if meth == "autoround" and sch == scheme and mode != "none" and v["ratio"] is not None]
        if best:
            r, mode = min(best)
            out.append(f"- AutoRound + recovery ({mode}) {scheme}: perplexity {r:.3f}x the unquantized model "
                       f"(target <= {target}x): {'met' if r <= target else 'NOT met'}")
    scheme, limit = RECOVER_SECONDS_TARGET
    for (meth, sch, mode), v in sorted(numbers.items()):
        if meth == "autoround" and sch == scheme and mode != "none" and v["seconds"] is not None:
            out.append(f"- AutoRound + {mode} {scheme}: quantize + recover {v['seconds']:.1f} s (target <= "
                       f"{limit:.0f} s): {'met' if v['seconds'] <= limit else 'NOT met'}")
    return out


def search_numbers(results: Path) -> dict[tuple[str, str, str], dict]:
    """The recipe search's rows (benchmarks/recover_search.py: AutoRound W2G64 asym) for the target checks,
    keyed like recover_rows' numbers with the recovery named `search <recipe>`."""
    path = results / "recover_search" / "recover_search.json"
    if not path.is_file():
        return {}
    cells = json.loads(path.read_text())["cells"]
    base = next((c["manifests"]["baseline_evaluate"] for c in cells if "baseline_evaluate" in c.get("manifests", {})), None)
    base_ppl, numbers = _metric(base, "ppl"), {}
    q_s = next((_metric(c["manifests"].get("quantize"), "seconds") for c in cells
                if "quantize" in c.get("manifests", {})), None)
    for c in cells:
        m = c.get("manifests", {})
        ppl, r_s = _metric(m.get("evaluate"), "ppl"), _metric(m.get("recover"), "seconds")
        if c.get("skipped") or ppl is None or not base_ppl:
            continue
        both = q_s + r_s if q_s is not None and r_s is not None else None
        numbers[("autoround", "W2G64 asym", f"search {c['name']}")] = {"ratio": ppl / base_ppl, "seconds": both}
    return numbers


def recover_section(results: Path) -> list[str]:
    path = results / "recover.json"
    title = "## 7. Recovery after quantization: SmolLM2-135M"
    if not path.is_file():
        return [title, "", "(not run)", ""]
    record = json.loads(path.read_text())
    rows, numbers = recover_rows(record)
    numbers.update(search_numbers(results))
    heads = ["method", "scheme", "recovery", "ppl (Persuasion)", "ppl / unquantized", "train KL init -> final",
             "quantize s", "recover s", "quantize + recover s", "packed MB", "adapter MB"]
    return [title, "", f"Run: {_machine_line(record['machine'])}", "", calibration_line(record), "",
            table(heads, rows), "", "Targets, over this table and the recipe search below:", "",
            *recover_target_lines(numbers), ""] + \
        _section_from_md("7. Recovery recipes at 2 bits (benchmarks/recover_search.py)", results / "recover_search") + \
        _section_from_md("7. Recovery and vLLM: W4G64 sym after recover=scales", results / "recover_vllm") + \
        _section_from_md("7. Recovery cost: Llama-3-8B-shaped model", results / "recover_cost")


def write_results_markdown(results: Path, md_path: Path) -> str:
    """Write RESULTS.md from a results folder; returns the text."""
    lines = ["# Published results", "",
             "Regenerate with `benchmarks/published_results.py` (see its docstring); every number below comes "
             "from the run named with its table.", ""]
    quality = results / "quality.json"
    if quality.is_file():
        record = json.loads(quality.read_text())
        rows, numbers = quality_rows(record)
        heads = ["method", "scheme", "ppl (Persuasion, 512-token windows)", "ppl / unquantized",
                 *[h for _, h in TASK_METRICS], "quantize s", "peak GPU GiB", "packed MB"]
        lines += ["## 1. Quality and 2. quantization cost: SmolLM2-135M", "",
                  f"Run: {_machine_line(record['machine'])}", "",
                  calibration_line(record), "", table(heads, rows), "", *target_lines(numbers), ""]
    else:
        lines += ["## 1. Quality and 2. quantization cost: SmolLM2-135M", "", "(not run)", ""]
    lines += _section_from_md("2. Quantization cost: Llama-3-8B-shaped block, AutoRound", results / "block_autoround")
    lines += _section_from_md("2. Quantization cost: Llama-3-8B-shaped block, GPTQ", results / "block_gptq")
    lines += _section_from_md("3. Inference: torch backend", results / "throughput_torch")
    lines += _section_from_md("3. Inference: low-bit kernel candidates, torch backend", results / "kernels")
    lines += _section_from_md("3. Inference: vLLM", results / "throughput_vllm")
    lines += _section_from_md("3. Inference: vLLM and 2/3-bit checkpoints", results / "vllm_lowbit")
    lines += _section_from_md("4. The headline command end to end: Llama-3-8B-shaped model", results / "headline")
    soak = Path(__file__).resolve().parent / "results" / "soak_cpu.md"  # CPU, from benchmarks/soak_sweep.py
    if soak.is_file():
        lines += ["## 5. Reliability: parallel sweep soak (CPU)", "", soak.read_text().strip(), ""]
    lines += _section_from_md("6. CPU: the quickstart (benchmarks/bench_quickstart.py)", results / "quickstart_cpu")
    lines += recover_section(results)
    lines += _section_from_md("8. The reference comparison: one sweep (benchmarks/reference_table.py)",
                              results / "reference")
    lines += _section_from_md("9. Scale: streaming quantization (benchmarks/bench_scale.py)", results / "scale")
    lines += _section_from_md("9. Scale: inductor's compile worker pool vs compiling in-process, 70B-shaped blocks",
                              results / "scale" / "compile_pool")
    lines += _section_from_md("9. Scale: data-parallel tuning on two GPUs (benchmarks/bench_dp.py)", results / "dp")
    text = "\n".join(lines).rstrip() + "\n"
    md_path.write_text(text)
    return text
