"""Turn lm-eval results and perplexity numbers into flat metrics, deltas and a Markdown table."""

from __future__ import annotations

import math
from typing import Any, Optional

from core.summary import format_table

# The metric a task is judged by (for delta_vs_baseline and the summary), first match wins.
PRIMARY_METRICS = ("acc", "bits_per_byte", "word_perplexity", "perplexity", "exact_match")
PPL = "ppl"  # metrics of the rolling-window perplexity evaluator: ppl, ppl.nll, ppl.tokens, ...
# lm-eval's perplexity metrics (e.g. wikitext.word_perplexity), lower is better like PPL
LM_EVAL_PERPLEXITIES = ("word_perplexity", "perplexity")


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # lm-eval writes "N/A" for stderrs it cannot compute
    return float(value) if math.isfinite(value) else None


def flatten_lm_eval(results: dict[str, Any]) -> dict[str, float]:
    """`<task>.<metric>` -> value from lm-eval's results dict.

    lm-eval keys metrics as "acc,none" (metric, filter); the filter is dropped when it is
    "none" and kept as a suffix otherwise ("exact_match.strict-match"). Non-numbers are skipped;
    `<task>.samples` is the number of documents scored.
    """
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            number = _number(value)
            if not filt or number is None:
                continue
            flat[f"{task}.{metric}" if filt == "none" else f"{task}.{metric}.{filt}"] = number
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        if samples is not None:
            flat[f"{task}.samples"] = float(samples)
    return flat


def perplexity_metrics(out: dict[str, Any]) -> dict[str, float]:
    """Metrics of the perplexity evaluator: ppl, ppl.nll, ppl.tokens, ppl.windows, and with two or
    more windows ppl.nll_stderr and ppl.stderr (= ppl * nll_stderr, the delta method for exp)."""
    metrics = {PPL: out["ppl"], f"{PPL}.nll": out["nll"], f"{PPL}.tokens": float(out["tokens"]),
               f"{PPL}.windows": float(out["windows"])}
    if out.get("nll_stderr") is not None:
        metrics[f"{PPL}.nll_stderr"] = out["nll_stderr"]
        metrics[stderr_key(PPL)] = out["ppl"] * out["nll_stderr"]
    return metrics


def paired_ppl_ratio(out: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """ppl / baseline ppl on the same windows, with the standard error of the paired difference.

    ratio = exp(nll - baseline nll); its standard error is ratio * se, where se is the windows'
    standard error of the per-token NLL difference (both models scored the same tokens, so the
    text's own difficulty cancels and the ratio is far more precise than either perplexity).

    Args:
        out, baseline: the perplexity evaluator's outputs (with window_nll_sum / window_tokens).

    Returns:
        {"ppl.ratio_vs_baseline", "ppl.ratio_vs_baseline_stderr"}, or {} when the two were not
        scored on the same windows (or lack per-window numbers).
    """
    from stages.eval.perplexity import window_stderr

    counts = out.get("window_tokens")
    if not counts or counts != baseline.get("window_tokens") or not baseline.get("window_nll_sum"):
        return {}
    diffs = [q - b for q, b in zip(out["window_nll_sum"], baseline["window_nll_sum"])]
    ratio = math.exp(sum(diffs) / sum(counts))
    metrics = {f"{PPL}.ratio_vs_baseline": ratio}
    se = window_stderr(diffs, counts)
    if se is not None:
        metrics[stderr_key(f"{PPL}.ratio_vs_baseline")] = ratio * se
    return metrics


def stderr_key(key: str) -> str:
    """Where a metric's standard error is kept: lm-eval's `<task>.<metric>_stderr`, `ppl.stderr`."""
    return f"{PPL}.stderr" if key == PPL else f"{key}_stderr"


def with_stderr(metrics: dict[str, float], key: str) -> str:
    """`value ± stderr` (4 significant digits, the stderr to 2), or the value alone without one."""
    se = metrics.get(stderr_key(key))
    return f"{metrics[key]:.4g}" + (f" ± {se:.2g}" if se is not None else "")


def task_names(metrics: dict[str, float]) -> list[str]:
    """Tasks present in flat metrics, in first-seen order (the perplexity evaluator as "ppl")."""
    seen: list[str] = []
    for key in metrics:
        task = PPL if key == PPL else key.split(".")[0]
        if task not in seen:
            seen.append(task)
    return seen


def primary_metric(task: str, metrics: dict[str, float]) -> Optional[str]:
    """The full key of the metric a task is judged by, or None."""
    if task == PPL:
        return PPL if PPL in metrics else None
    for name in PRIMARY_METRICS:
        if f"{task}.{name}" in metrics:
            return f"{task}.{name}"
    return None


def deltas_vs_baseline(metrics: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """`<task>.delta_vs_baseline` = this model's primary metric minus the baseline's."""
    out = {}
    for task in task_names(metrics):
        key = primary_metric(task, metrics)
        if key is not None and key in baseline:
            out[f"{task}.delta_vs_baseline"] = metrics[key] - baseline[key]
    return out


def summary_table(metrics: dict[str, float], baseline: Optional[dict[str, float]] = None) -> str:
    """Markdown table: task | metric | value ± stderr (| baseline | delta), one row per task's primary
    metric, plus the perplexity ratio over the baseline when it was measured."""
    rows = []
    for task in task_names(metrics):
        key = primary_metric(task, metrics)
        if key is None:
            continue
        metric = key if task == PPL else key[len(task) + 1:]
        row: list[Any] = [task, metric, with_stderr(metrics, key)]
        if baseline is not None:
            base = baseline.get(key)
            row += [with_stderr(baseline, key) if base is not None else "-",
                    metrics[key] - base if base is not None else "-"]
        rows.append(row)
    ratio = f"{PPL}.ratio_vs_baseline"
    if ratio in metrics:
        rows.append([PPL, "ratio_vs_baseline", with_stderr(metrics, ratio)] + (["-", "-"] if baseline is not None else []))
    headers = ["task", "metric", "value"] + (["baseline", "delta"] if baseline is not None else [])
    return format_table(headers, rows)


def short_summary(metrics: dict[str, float]) -> dict[str, str]:
    """Each task's primary metric as `value ± stderr` (and its delta when present), for the final table."""
    out = {}
    for task in task_names(metrics):
        key = primary_metric(task, metrics)
        if key is not None:
            out[key] = with_stderr(metrics, key)
        if task == PPL and f"{PPL}.ratio_vs_baseline" in metrics:
            out["ppl/baseline"] = with_stderr(metrics, f"{PPL}.ratio_vs_baseline")
        elif f"{task}.delta_vs_baseline" in metrics:
            out[f"{task}.delta"] = f"{metrics[f'{task}.delta_vs_baseline']:.4g}"
    return out
