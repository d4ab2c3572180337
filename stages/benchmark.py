"""Benchmark stage: generation throughput of the packed checkpoint and of the unquantized baseline.

Core: `benchmark(backend, target, workload, options, log) -> record` (backends in
stages/bench/: `torch` = the static-cache decode engine with low-bit kernels, `vllm` = vLLM's
offline engine in a child process). `run(ctx)` resolves `bench.*` for the device, runs the
core on the baseline model (node baseline_benchmark) or the packed checkpoint (node
benchmark), adds the speedup over the baseline record (same backend and workload), and
writes `throughput.json`. See docs/benchmark.md for every field.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from core.context import BASELINE, StageContext, StageResult
from core.errors import ConfigError
from core.schema import BenchConfig, PipelineConfig
from stages.bench.options import Backend, BenchOptions, BenchTarget, folder_size
from stages.bench.workload import Workload, speedups

RESULT_FILE = "throughput.json"
# Metrics the report reads (each also per batch size as <name>.b<B>; unsuffixed = the first batch size)
TOKENS_PER_S_METRIC = "tokens_per_s"
SPEEDUP_METRIC = "speedup_vs_baseline"
GPU_ONLY_SWITCHES = ("compile", "cuda_graphs")
CPU_LABEL = "CPU path check (not a speed number)"


def workload_from(cfg: BenchConfig) -> Workload:
    return Workload(cfg.num_prompts, cfg.input_len, cfg.output_len, tuple(cfg.batch_sizes), cfg.warmup, cfg.repeats,
                    cfg.seed)


def resolve_backend(requested: str, device: str, vllm_verdict: Optional[dict[str, Any]] = None) -> tuple[str, str]:
    """(backend to run, why): auto = vLLM when it is importable, the device is CUDA and the pack stage's
    compatibility report (`vllm_verdict`, compat.json's "vllm" entry) does not say vLLM refuses the checkpoint."""
    from stages.bench.vllm_backend import vllm_available

    if requested != "auto":
        return requested, "requested"
    if not vllm_available():
        return "torch", "auto: vLLM is not installed"
    if not device.startswith("cuda"):
        return "torch", "auto: vLLM needs a CUDA device"
    if vllm_verdict is not None and not vllm_verdict.get("loads", False):
        return "torch", (f"auto: vLLM {vllm_verdict.get('version', '')} refuses this checkpoint "
                         f"({vllm_verdict.get('reason', 'see compat.json')}), so the torch backend runs it")
    return "vllm", "auto: vLLM is importable and a CUDA device is in use"


def resolve_options(cfg: BenchConfig, device: str, dtype: str) -> BenchOptions:
    """bench.* with auto switches resolved: compile and CUDA graphs on for CUDA, off for the CPU."""
    cuda = device.startswith("cuda")
    return BenchOptions(device=device, dtype=dtype, compile=cfg.compile == "on" or (cfg.compile == "auto" and cuda),
                        cuda_graphs=cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and cuda),
                        linear_kernel=cfg.linear_kernel, kernel_tuning=cfg.kernel_tuning,
                        kernel_batch1_weight=cfg.kernel_batch1_weight,
                        gpu_memory_utilization=cfg.gpu_memory_utilization, vllm_enforce_eager=cfg.vllm_enforce_eager,
                        vllm_timeout_s=cfg.vllm_timeout_s)


def check_bench(cfg: BenchConfig, device: str, max_positions: Optional[int]) -> None:
    """Every bad bench setting for this device and model, as one ConfigError (no work done yet)."""
    from stages.bench.vllm_backend import INSTALL_HINT, vllm_available
    from stages.kernels.catalog import package_problem
    from stages.kernels.planner import CUDA_ONLY_POLICIES

    cuda = device.startswith("cuda")
    if cfg.backend == "vllm" and not vllm_available():
        raise ConfigError("bench.backend", "vllm", "torch here: the vllm package is not installed", INSTALL_HINT,
                          problem="needs the vllm package")
    if cfg.backend == "vllm" and not cuda:
        raise ConfigError("bench.backend", "vllm", f"torch on device {device}", "use bench.backend=torch, or a CUDA "
                          "device (run.device=cuda)", problem="needs a CUDA device")
    if not cuda:
        for key in GPU_ONLY_SWITCHES:
            if getattr(cfg, key) == "on":
                raise ConfigError(f"bench.{key}", "on", f"auto or off on device {device}", f"use bench.{key}=auto",
                                  problem="needs a CUDA device")
        if cfg.linear_kernel in CUDA_ONLY_POLICIES:
            raise ConfigError("bench.linear_kernel", cfg.linear_kernel, f"auto or dequant on device {device}",
                              "use bench.linear_kernel=auto (dequantizes on the CPU)", problem="needs a CUDA device")
    weight = cfg.kernel_batch1_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ConfigError("bench.kernel_batch1_weight", weight, "a number > 0 (1: batch 1 counts like any other "
                          "planned row count)", "e.g. bench.kernel_batch1_weight=4 to favour batch 1",
                          problem="is not a weight")
    missing = package_problem(cfg.linear_kernel)
    if missing:
        raise ConfigError("bench.linear_kernel", cfg.linear_kernel, missing, "install it, or use bench.linear_kernel=auto",
                          problem="cannot run here")
    need = cfg.input_len + cfg.output_len
    if max_positions is not None and need > max_positions:
        raise ConfigError("bench.output_len", cfg.output_len,
                          f"input_len + output_len <= the model's context of {max_positions} tokens",
                          f"e.g. bench.input_len={min(cfg.input_len, max_positions // 2)} "
                          f"bench.output_len={max(1, max_positions - min(cfg.input_len, max_positions // 2))}",
                          problem=f"makes the workload {need} tokens long, more than the model's context")


def preflight(cfg: PipelineConfig, model: Any, spec: Any = None) -> None:
    """Checks before any stage runs: backend availability, GPU-only options, workload length."""
    from core.device import resolve_device

    device = resolve_device(cfg.run.device)
    max_positions = None
    if model is not None:
        from core.models import load_config

        mcfg = load_config(model)
        mcfg = getattr(mcfg, "text_config", None) or mcfg
        max_positions = getattr(mcfg, "max_position_embeddings", None)
    check_bench(cfg.bench, device, max_positions)


def benchmark(backend: Backend, target: BenchTarget, workload: Workload, options: BenchOptions,
              log: Callable[[str], None] = print, **backend_kwargs: Any) -> dict[str, Any]:
    """Measure one model folder with one backend -> the record (see docs/benchmark.md)."""
    record = backend.run(target, workload, options, log, **backend_kwargs)
    record.update(variant=target.variant, model_path=str(target.path), workload=workload.to_dict(),
                  **folder_size(target.path))
    if target.adapter is not None:
        record["adapter_on_disk_bytes"] = folder_size(target.adapter)["size_on_disk_bytes"]
    return record


def attach_speedups(record: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Speedups and memory ratios against the baseline record (same backend and workload only)."""
    if baseline.get("backend") != record.get("backend") or baseline.get("workload") != record.get("workload"):
        record["speedup_note"] = (f"baseline ran {baseline.get('backend')} with workload {baseline.get('workload')}; "
                                  "not comparable, no speedup reported")
        return
    record["speedup_vs_baseline"] = {str(b): s for b, s in speedups(record["results"], baseline["results"]).items()}
    record["decode_speedup_vs_baseline"] = {
        str(b): s for b, s in speedups(record["results"], baseline["results"], "decode_tokens_per_s").items()}
    for key in ("weight_memory_bytes", "decoder_linear_bytes", "size_on_disk_bytes", "weights_on_disk_bytes"):
        if record.get(key) and baseline.get(key):
            record[key.replace("_bytes", "_ratio")] = record[key] / baseline[key]


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics for MLflow (prefixed bench. / baseline.bench. by the runner); unsuffixed = first batch size."""
    m: dict[str, float] = {}
    for i, r in enumerate(record.get("results", [])):
        for key, name in (("output_tokens_per_s", TOKENS_PER_S_METRIC), ("requests_per_s", "requests_per_s"),
                          ("ttft_ms", "ttft_ms"), ("tpot_ms", "tpot_ms"), ("decode_tokens_per_s", "decode_tokens_per_s")):
            if key in r:
                m[f"{name}.b{r['batch_size']}"] = r[key]["median"]
                if i == 0:
                    m[name] = r[key]["median"]
    for i, (b, s) in enumerate(record.get("speedup_vs_baseline", {}).items()):
        m[f"{SPEEDUP_METRIC}.b{b}"] = s
        if i == 0:
            m[SPEEDUP_METRIC] = s
    for key in ("peak_gpu_memory_bytes", "weight_memory_bytes", "size_on_disk_bytes"):
        if record.get(key):
            m[key.replace("_bytes", "_mb")] = record[key] / 2**20
    if record.get("weight_memory_gib"):
        m["weight_memory_mb"] = record["weight_memory_gib"] * 1024
    return m


def _measure(ctx: StageContext, name: str, target: BenchTarget, options: BenchOptions) -> dict[str, Any]:
    from stages import registry

    backend = registry.resolve(registry.BENCH_BACKENDS, "bench.backend", name)()
    extra = {"log_dir": ctx.workdir / "vllm"} if name == "vllm" else {}
    return benchmark(backend, target, workload_from(ctx.cfg.bench), options, ctx.log, **extra)


def comparable_baseline(ctx: StageContext, record: dict[str, Any], options: BenchOptions) -> Optional[dict[str, Any]]:
    """The baseline record to compare with: the baseline stage's, or, when that ran another backend (auto fell
    back to torch for this checkpoint), the unquantized model measured here on the same backend."""
    if "baseline_benchmark" not in ctx.inputs:
        return None
    baseline = ctx.inputs["baseline_benchmark"].read_json(RESULT_FILE)
    if baseline.get("backend") == record["backend"] or ctx.cfg.bench.backend != "auto":
        return baseline
    ctx.log(f"[{ctx.stage}] the baseline ran on {baseline.get('backend')}; measuring the unquantized model on "
            f"{record['backend']} too, for a comparable speedup")
    rerun = _measure(ctx, record["backend"], BenchTarget(ctx.model.path, BASELINE, ctx.model.trust_remote_code),
                     options)
    record["baseline_same_backend"] = rerun
    return rerun


def run(ctx: StageContext) -> StageResult:
    """Benchmark the baseline model or the packed checkpoint (ctx.variant) and write throughput.json."""
    cfg = ctx.cfg.bench
    from stages.formats.artifact import model_under_test

    target = model_under_test(ctx)
    name, why = resolve_backend(cfg.backend, ctx.device, (target.compat or {}).get("vllm"))
    if name != "vllm" and cfg.backend == "auto":
        ctx.log(f"[{ctx.stage}] backend: {name} ({why})")
    options = resolve_options(cfg, ctx.device, ctx.dtype)
    record = _measure(ctx, name, BenchTarget(target.path, ctx.variant, ctx.model.trust_remote_code, target.adapter),
                      options)
    record.update(backend_requested=cfg.backend, backend_choice=why)
    baseline = comparable_baseline(ctx, record, options) if target.quantized else None
    if baseline is not None:
        attach_speedups(record, baseline)
    (ctx.workdir / RESULT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    first = record["results"][0]
    summary = {"backend": record["backend"],
               "tok/s": ", ".join(f"b{r['batch_size']} {r['output_tokens_per_s']['median']:.1f}" for r in record["results"])}
    label = ""
    if not ctx.device.startswith("cuda"):  # every packed Linear is dequantized: only the path is checked
        summary = {"check": CPU_LABEL, **summary}
        label = f" ({CPU_LABEL})"
    elif record.get("speedup_vs_baseline"):
        summary["speedup"] = ", ".join(f"b{b} {s:.2f}x" for b, s in record["speedup_vs_baseline"].items())
    ctx.log(f"[{ctx.stage}] {record['backend']}: {first['output_tokens_per_s']['median']:.1f} tok/s at batch "
            f"{first['batch_size']}{label}")
    artifacts = [RESULT_FILE] + (["vllm/vllm.log"] if (ctx.workdir / "vllm" / "vllm.log").is_file() else [])
    return StageResult(metrics=metrics_of(record), summary=summary, artifacts=artifacts)
