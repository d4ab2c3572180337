"""Evaluate stage: lm-eval tasks and rolling-window perplexity of the packed checkpoint or the baseline.

The quantized variant loads the packed checkpoint back from disk through
`stages.formats.qlinear.load_quantized_model` (what is scored is what is shipped) and reports
`<task>.delta_vs_baseline` against the `baseline_evaluate` artifact; the baseline variant scores
the unquantized model (cached once per model and eval config by the DAG). See docs/evaluation.md.

Outputs (in the artifact folder): metrics.json, lm_eval_results.json (lm-eval's raw results,
without per-sample logs), summary.md (Markdown table).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

from core.context import BASELINE, QUANTIZED, StageContext, StageResult
from core.errors import ConfigError
from core.models import ModelHandle, is_offline, offline_env
from core.schema import EvalConfig, PipelineConfig
from stages.eval.harness import EvalTarget, check_tokenizer_files, check_vllm_available, close_lm, run_lm_eval
from stages.eval.results import (deltas_vs_baseline, flatten_lm_eval, paired_ppl_ratio, perplexity_metrics,
                                 short_summary, summary_table)
from stages.eval.tasks import check_task_names
from stages.eval.texts import check_text_source, load_perplexity_text
from stages.recover import writes_adapter
from stages.recovery.adapter import apply_adapter_with_peft
from stages.registry import EVAL_BACKENDS, EVAL_TASK_SOURCES, resolve

METRICS_FILE = "metrics.json"
RAW_RESULTS_FILE = "lm_eval_results.json"
SUMMARY_FILE = "summary.md"


@dataclass
class EvalOutcome:
    """What `evaluate` measured: flat metrics plus the raw outputs they came from."""

    metrics: dict[str, float]
    lm_eval_results: Optional[dict[str, Any]]
    perplexity: Optional[dict[str, Any]]


def resolve_add_bos(tokenizer: Any, add_bos: Optional[bool]) -> bool:
    """eval.perplexity.add_bos, where null means: whatever the tokenizer does by itself."""
    if add_bos is not None:
        return add_bos
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def run_perplexity(model: Any, tokenizer: Any, text: str, cfg: EvalConfig, device: str,
                   progress: bool = False) -> dict[str, Any]:
    """The perplexity evaluator over `text` with eval.perplexity's windows; returns numbers + settings."""
    from tqdm.auto import tqdm

    from stages.eval.perplexity import perplexity, tokenize_text

    p = cfg.perplexity
    add_bos = resolve_add_bos(tokenizer, p.add_bos)
    ids = tokenize_text(tokenizer, text, add_bos)
    with tqdm(desc="perplexity", unit="window", disable=not progress) as bar:
        def on_window(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        out = perplexity(model, ids, p.seqlen, p.stride, batch_size=cfg.batch_size, device=device,
                         max_windows=p.max_windows, on_window=on_window)
    return {**out, "add_bos": add_bos, "seqlen": p.seqlen, "stride": p.stride, "text": p.text,
            "text_tokens": int(ids.numel())}


def evaluate(target: EvalTarget, cfg: EvalConfig, text: Optional[str], progress: bool = False) -> EvalOutcome:
    """Score one model: the perplexity evaluator (when enabled) and the lm-eval tasks (when any).

    Args:
        target: the model to score (loaded lazily, once).
        cfg: the eval config.
        text: what the perplexity evaluator scores (None when it is disabled).
        progress: show progress bars.

    Returns:
        EvalOutcome with metrics keyed `<task>.<metric>` and `ppl`, `ppl.nll`, ...
    """
    metrics: dict[str, float] = {}
    ppl = None
    if cfg.perplexity.enabled and text is not None:
        ppl = run_perplexity(target.model(), target.tokenizer(), text, cfg, target.device, progress)
        metrics.update(perplexity_metrics(ppl))
    results = None
    if cfg.tasks:
        lm = resolve(EVAL_BACKENDS, "eval.backend", cfg.backend)(target, cfg)
        task_manager = resolve(EVAL_TASK_SOURCES, "eval.task_source", cfg.task_source)()
        try:
            results = run_lm_eval(lm, task_manager, cfg)
        finally:
            close_lm(lm)
        metrics.update(flatten_lm_eval(results))
    return EvalOutcome(metrics, results, ppl)


# -- the stage ------------------------------------------------------------------------------
def _offline(cfg: PipelineConfig) -> bool:
    return cfg.run.offline or is_offline()


def _planned_device(requested: str) -> str:
    if requested == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def preflight(cfg: PipelineConfig, model: Optional[ModelHandle], spec: Any) -> None:
    """Checks before any stage runs: tasks exist and can run here, the text, the backend, the tokenizer."""
    e = cfg.eval
    if not e.tasks and not e.perplexity.enabled:
        raise ConfigError("eval.tasks", e.tasks, "at least one task, or eval.perplexity.enabled=true",
                          "e.g. eval=local", problem="leaves nothing to evaluate")
    check_task_names(e.tasks, e.task_source, _offline(cfg))
    if e.perplexity.enabled:
        check_text_source(e.perplexity, _offline(cfg))
    if e.tasks and e.backend == "vllm":
        check_vllm_available(_planned_device(cfg.run.device))
    if getattr(spec, "variant", QUANTIZED) == BASELINE:
        if model is not None:
            check_tokenizer_files(model.path, "model folder")
    elif writes_adapter(cfg) and not e.dense_weights:
        raise ConfigError("eval.dense_weights", False, f"true with recover.mode={cfg.recover.mode} (PEFT wraps plain "
                          "Linear layers; "
                          "the packed layers become plain Linears with eval.dense_weights=true)",
                          "set eval.dense_weights=true")


def densify_quant_linears(model: Any, dtype: Any) -> int:
    """Replace every packed QuantLinear by an nn.Linear holding `ql.dequantize(dtype)`.

    QuantLinear.forward is `F.linear(x, ql.dequantize(x.dtype), bias)`, so with activations in
    `dtype` the outputs are identical; the weight is just computed once instead of at every call.

    Returns:
        How many Linears were replaced.
    """
    import torch

    from stages.formats.qlinear import iter_quant_linears

    swapped = list(iter_quant_linears(model))
    for name, ql in swapped:
        parent_name, _, child = name.rpartition(".")
        dense = torch.nn.Linear(ql.in_features, ql.out_features, bias=ql.bias is not None, device="meta")
        dense.weight = torch.nn.Parameter(ql.dequantize(dtype), requires_grad=False)
        if ql.bias is not None:
            dense.bias = torch.nn.Parameter(ql.bias.detach().to(dtype), requires_grad=False)
        setattr(model.get_submodule(parent_name), child, dense)
    return len(swapped)


def _target(ctx: StageContext) -> EvalTarget:
    """The packed checkpoint (quantized variant) or the unquantized model (baseline)."""
    from transformers import AutoTokenizer

    from stages.formats.artifact import model_under_test

    under_test = model_under_test(ctx)
    if not under_test.quantized:
        from core.models import load_model, load_tokenizer

        handle = ctx.model
        check_tokenizer_files(handle.path, "model folder")
        return EvalTarget(handle.path, lambda: load_model(handle, ctx.torch_dtype(), ctx.device),
                          lambda: load_tokenizer(handle), ctx.device, ctx.dtype, quantized=False,
                          trust_remote_code=handle.trust_remote_code)
    folder, adapter = under_test.path, under_test.adapter
    check_tokenizer_files(folder, "packed checkpoint")

    def load() -> Any:
        from stages.formats.qlinear import load_quantized_model

        model = load_quantized_model(folder, ctx.device, ctx.torch_dtype(),
                                     trust_remote_code=ctx.model.trust_remote_code).eval()
        swapped = densify_quant_linears(model, ctx.torch_dtype()) if ctx.cfg.eval.dense_weights else 0
        if swapped:  # none for a bitsandbytes checkpoint: its Linears run bitsandbytes' kernels as shipped
            ctx.log(f"[{ctx.stage}] dequantized {swapped} packed Linears once (eval.dense_weights=true)")
        if adapter is not None:
            model = apply_adapter_with_peft(model, adapter)
            ctx.log(f"[{ctx.stage}] LoRA adapter {adapter} applied with PEFT")
        return model

    return EvalTarget(folder, load, lambda: AutoTokenizer.from_pretrained(folder), ctx.device, ctx.dtype,
                      quantized=True, trust_remote_code=ctx.model.trust_remote_code, adapter=adapter)


@contextlib.contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _baseline_record(ctx: StageContext) -> Optional[dict[str, Any]]:
    """The baseline_evaluate artifact's metrics.json ({"metrics", "perplexity", ...}), or None."""
    art = ctx.inputs.get("baseline_evaluate")
    if ctx.variant == BASELINE or art is None:
        return None
    if (art.path / METRICS_FILE).is_file():
        return art.read_json(METRICS_FILE)
    return {"metrics": {k: v for k, v in art.manifest.get("metrics", {}).items() if k != "seconds"}}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def eval_backend(ctx: StageContext) -> tuple[str, str]:
    """(backend, why): eval.backend, except that a vllm request for a packed checkpoint the pack stage's
    compat.json says vLLM refuses is scored with hf (so one sweep can mix servable and unservable rows)."""
    requested = ctx.cfg.eval.backend
    pack = ctx.inputs.get("pack")
    if requested != "vllm" or ctx.variant == BASELINE or not ctx.cfg.eval.tasks or pack is None:
        return requested, f"eval.backend={requested}"
    from stages.formats.artifact import REPORT_FILE

    verdict = pack.read_json(REPORT_FILE).get("vllm", {}) if (pack.path / REPORT_FILE).is_file() else {}
    if verdict and not verdict.get("loads", False):
        return "hf", (f"eval.backend=vllm, but vLLM {verdict.get('version', '')} refuses this checkpoint "
                      f"({str(verdict.get('reason', 'see compat.json'))[:200]}): its tasks were scored with hf")
    return "vllm", "eval.backend=vllm (the pack stage's compat.json: vLLM serves this checkpoint)"


def run(ctx: StageContext) -> StageResult:
    """Load the model (packed or baseline), evaluate it, write metrics/raw results/summary."""
    backend, why = eval_backend(ctx)
    if backend != ctx.cfg.eval.backend:
        ctx.log(f"[{ctx.stage}] {why}")
    cfg = replace(ctx.cfg.eval, backend=backend)
    target = _target(ctx)
    text = load_perplexity_text(cfg.perplexity) if cfg.perplexity.enabled else None
    # Local tasks are small: lm-eval's bootstrap standard errors (100k resamples) take about a second
    # in this process, less than forking its pool of copies of this process (the model included).
    env = {**offline_env(), "DISABLE_MULTIPROC": "1"} if cfg.task_source == "local" else {}
    with scoped_env(env):
        outcome = evaluate(target, cfg, text, ctx.progress)
    metrics = dict(outcome.metrics)
    record = _baseline_record(ctx)
    baseline = record["metrics"] if record is not None else None
    if record is not None:
        metrics.update(deltas_vs_baseline(metrics, baseline))
        if outcome.perplexity is not None and record.get("perplexity"):
            metrics.update(paired_ppl_ratio(outcome.perplexity, record["perplexity"]))
    table = summary_table(metrics, baseline)
    title = f"{'packed checkpoint' if target.quantized else 'baseline'}: {target.path}"
    ctx.log(f"[{ctx.stage}] {title}\n{table}")
    (ctx.workdir / SUMMARY_FILE).write_text(f"# {ctx.stage}\n\n{title}\n\n{table}\n", encoding="utf-8")
    _write_json(ctx.workdir / METRICS_FILE, {"metrics": metrics, "perplexity": outcome.perplexity,
                                             "variant": ctx.variant, "model": target.path, "backend": backend,
                                             "backend_note": why})
    artifacts = [METRICS_FILE, SUMMARY_FILE]
    if outcome.lm_eval_results is not None:
        _write_json(ctx.workdir / RAW_RESULTS_FILE, outcome.lm_eval_results)
        artifacts.append(RAW_RESULTS_FILE)
    summary = {**short_summary(metrics), **({"backend": backend} if cfg.tasks else {})}
    return StageResult(metrics=metrics, summary=summary, artifacts=artifacts)
