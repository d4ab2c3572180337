"""The reference comparison table: the shape of the AutoRound paper's comparison, from a sweep's jobs.

One row per method (the unquantized model first, then the jobs in sweep order), one column per
lm-eval task (its primary metric; accuracies in %, and their average), then perplexity, stored
bits per weight, checkpoint size and decode throughput, and which backend scored the tasks.
Every quantized row comes from its packed checkpoint loaded back from disk (evaluate and
benchmark load what pack wrote); the unquantized row from the model's own folder.

`build_reference_table(jobs)` is pure (manifests in, `ReferenceTable` out); `write_reference_table`
writes reference_table.md and .csv. `stages.report.build_sweep_report` calls them when
report.reference_table is true (conf/experiment/compare_reference_table.yaml sets it).
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from core.errors import InputError
from core.schema import QuantScheme, quant_config_from_record

METHOD_TITLES = {"autoround": "AutoRound", "gptq": "GPTQ", "rtn": "RTN", "bnb_nf4": "bitsandbytes NF4",
                 "bnb_int8": "bitsandbytes LLM.int8"}
REFERENCE_W4_GROUP = 128  # the reference comparison's 4-bit group size
PERCENT_METRICS = ("acc", "acc_norm", "exact_match")
MB = 10**6


@dataclass
class ReferenceTable:
    """Rows keyed by `columns` (machine names; `headers` maps them to what the table shows)."""

    title: str
    columns: list[str]
    headers: dict[str, str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def _metrics(manifests: Mapping[str, dict], stage: str) -> dict[str, Any]:
    return manifests.get(stage, {}).get("metrics", {})


def _task_scores(metrics: Mapping[str, Any]) -> dict[str, float]:
    """`<task>.<metric>` -> value for each lm-eval task's primary metric (accuracies in %), perplexity excluded."""
    from stages.eval.results import PPL, primary_metric, task_names

    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out = {}
    for task in task_names(numeric):
        key = primary_metric(task, numeric) if task != PPL else None
        if key is not None:
            percent = key.rsplit(".", 1)[-1] in PERCENT_METRICS
            out[key] = 100.0 * numeric[key] if percent else numeric[key]
    return out


def _scheme(quant: QuantScheme) -> str:
    from stages.quant.bnb_options import BNB_SCHEMES

    if quant.method in BNB_SCHEMES:
        s = BNB_SCHEMES[quant.method]
        return f"W{s.bits} {s.quant_type.upper()}, " + (f"blocks of {s.group_size}" if s.group_size > 0 else "per row")
    return f"W{quant.bits}G{quant.group_size} {'sym' if quant.sym else 'asym'}"


def _decode(manifests: Mapping[str, dict], stage: str) -> Optional[float]:
    value = _metrics(manifests, stage).get("decode_tokens_per_s")
    return float(value) if isinstance(value, (int, float)) else None


def _baseline_row(manifests: Mapping[str, dict]) -> dict[str, Any]:
    ev = manifests.get("baseline_evaluate", {})
    size = _metrics(manifests, "baseline_benchmark").get("size_on_disk_mb")  # MiB (stages.benchmark.metrics_of)
    dtype = ev.get("dtype") or manifests.get("baseline_benchmark", {}).get("dtype") or "16-bit"
    return {"method": "FP (unquantized)", "scheme": str(dtype).replace("bfloat16", "bf16").replace("float", "fp"),
            **_task_scores(ev.get("metrics", {})), "ppl": ev.get("metrics", {}).get("ppl"),
            "bits_per_weight": 32.0 if dtype == "float32" else 16.0,
            "size_mb": size * 2**20 / MB if isinstance(size, (int, float)) else None,
            "decode_tok_s": _decode(manifests, "baseline_benchmark"),
            "eval_backend": ev.get("summary", {}).get("backend", "hf") if ev else None}


def _job_row(name: str, manifests: Mapping[str, dict]) -> dict[str, Any]:
    quant = quant_config_from_record(manifests["quantize"].get("config", {}).get("quant", {}))
    ev = manifests.get("evaluate", {})
    pack = _metrics(manifests, "pack")
    return {"job": name, "method": METHOD_TITLES.get(quant.method, quant.method),
            "scheme": _scheme(quant), "quant": quant, **_task_scores(ev.get("metrics", {})),
            "ppl": ev.get("metrics", {}).get("ppl"), "bits_per_weight": pack.get("bits_per_weight"),
            "size_mb": pack.get("size_mb"), "decode_tok_s": _decode(manifests, "benchmark"),
            "eval_backend": ev.get("summary", {}).get("backend", "hf") if ev else None}


def _group_note(rows: list[dict[str, Any]], in_features: Sequence[int]) -> Optional[str]:
    """Says so when 4-bit rows use another group size than the reference comparison's 128."""
    groups = sorted({r["quant"].group_size for r in rows if "quant" in r and r["quant"].bits == 4
                     and r["quant"].method in ("autoround", "gptq", "rtn")})
    other = [g for g in groups if g != REFERENCE_W4_GROUP]
    if not other:
        return None
    why = ""
    odd = sorted({f for f in in_features if f % REFERENCE_W4_GROUP})
    if odd:
        why = (f": the model's Linears have in_features {sorted(set(in_features))}, and {odd[0]} is not a multiple of "
               f"{REFERENCE_W4_GROUP}")
    return f"W4 rows use group size {', '.join(map(str, other))} instead of the reference comparison's {REFERENCE_W4_GROUP}{why}"


def build_reference_table(jobs: Sequence[tuple[str, Mapping[str, dict]]], model: str,
                          in_features: Sequence[int] = ()) -> ReferenceTable:
    """The reference-shaped table over jobs given as (name, {stage: manifest}), in the order given.

    Args:
        jobs: sweep jobs; each needs its quantize manifest, the other stages are optional.
        model: the model's name (title).
        in_features: the quantized Linears' input widths (explains a group size other than 128).
    """
    usable = [(n, m) for n, m in jobs if "quantize" in m]
    if not usable:
        raise InputError("the reference table needs at least one job with a quantize manifest; none were given")
    rows = [_job_row(n, m) for n, m in usable]
    base = next((m for _, m in usable if "baseline_evaluate" in m or "baseline_benchmark" in m), None)
    if base is not None:
        rows.insert(0, _baseline_row(base))
    tasks = list(dict.fromkeys(k for r in rows for k in r if "." in k and not k.startswith("quant")))
    headers = {"method": "method", "scheme": "scheme"}
    for key in tasks:
        task, metric = key.rsplit(".", 1)
        headers[key] = f"{task} {metric}" + (" %" if metric in PERCENT_METRICS else "")
    acc = [k for k in tasks if k.rsplit(".", 1)[-1] in PERCENT_METRICS]
    if len(acc) > 1:
        headers["avg_acc"] = "avg acc %"
        for r in rows:
            vals = [r[k] for k in acc if r.get(k) is not None]
            r["avg_acc"] = statistics.fmean(vals) if len(vals) == len(acc) else None
    headers.update({"ppl": "ppl", "bits_per_weight": "bits/weight", "size_mb": "size MB",
                    "decode_tok_s": "decode tok/s (b1)", "eval_backend": "tasks scored by"})
    columns = [c for c in headers if c in ("method", "scheme") or any(r.get(c) is not None for r in rows)]
    notes = ["each quantized row is scored from its packed checkpoint loaded back from disk; the FP row from the "
             "unquantized model's folder"]
    note = _group_note(rows, in_features)
    if note:
        notes.append(note)
    return ReferenceTable(f"{model}: the reference comparison", columns, headers, rows, notes)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def to_markdown(table: ReferenceTable) -> str:
    heads = [table.headers[c] for c in table.columns]
    lines = [f"# {table.title}", "", "| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in table.columns) + " |" for r in table.rows]
    lines += ["", "Notes:", *[f"- {n}" for n in table.notes]]
    return "\n".join(lines) + "\n"


def write_reference_table(table: ReferenceTable, out_dir: Path) -> list[Path]:
    """reference_table.md and reference_table.csv (machine column names) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table_csv = out_dir / "reference_table.md", out_dir / "reference_table.csv"
    md.write_text(to_markdown(table))
    with open(table_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=table.columns, extrasaction="ignore")
        writer.writeheader()
        for row in table.rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in table.columns})
    return [md, table_csv]


def in_features_of(quantize_dirs: Sequence[Path]) -> list[int]:
    """Input widths of the quantized Linears recorded by quantize artifacts (layers.json or bnb_layers.json)."""
    widths: set[int] = set()
    for folder in quantize_dirs:
        for name in ("layers.json", "bnb_layers.json"):
            path = Path(folder) / name
            if path.is_file():
                layers = json.loads(path.read_text()).get("layers", {})
                widths |= {int(rec["shape"][1]) for rec in layers.values() if "shape" in rec}
    return sorted(widths)
