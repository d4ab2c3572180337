"""Quantize stage: RTN / GPTQ / AutoRound, block by block, resumable.

Core: `quantize_model(model, input_ids, cfg, device)` (stages.quant.driver; no I/O).
Stage I/O (`run`):
* reads the model (`ctx.model`) and, for calibrated methods, `calib.safetensors` from the
  calibrate artifact;
* saves each finished block to `blocks/block_<i>.safetensors` in the work folder as soon as
  it completes (written to a temporary name, then renamed), so a crash or kill resumes at
  the first unfinished block;
* writes `qstate.safetensors` + `layers.json` (stages.quant.qstate), `block_metrics.json`,
  then removes `blocks/`; logs per-block step metrics (`block_loss` = best tuned loss or the
  block MSE, `block_loss_init` (the RTN loss of iteration 0), `block_loss_best`, `block_best_iter`,
  `block_mse` (quantized block vs fp targets on all samples), `block_seconds`), step = block index.
`preflight` builds the model on the meta device and checks every layer's scheme (group
sizes against input dims, overrides) before any stage runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pipeline.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch

    from pipeline.context import StageContext, StageResult
    from pipeline.models import ModelHandle
    from pipeline.schema import PipelineConfig, QuantConfig
    from stages.quant.base import BlockResult, QuantizedLayer

PROGRESS_DIR = "blocks"
BLOCK_METRICS_FILE = "block_metrics.json"
STEP_METRICS = {"loss_init": "block_loss_init", "loss_best": "block_loss_best", "best_iter": "block_best_iter",
                "mse": "block_mse", "seconds": "block_seconds", "tune_seconds": "block_tune_seconds",
                # GPTQ's per-block numbers (layer-level errors, Hessian health, time split)
                "layer_mse_gptq": "block_layer_mse_gptq", "layer_mse_rtn": "block_layer_mse_rtn",
                "damp_retries": "block_damp_retries", "dead_columns": "block_dead_columns",
                "rtn_fallbacks": "block_rtn_fallbacks", "hessian_seconds": "block_hessian_seconds",
                "solve_seconds": "block_solve_seconds"}


def quantize_model(model: Any, input_ids: Optional["torch.Tensor"], cfg: "QuantConfig", device: Any, *,
                   seed: int = 0, progress: bool = False, done: Optional[dict] = None,
                   on_block_done: Optional[Any] = None, log: Any = None) -> Any:
    """The stage's pure core: quantize every decoder block (see stages.quant.driver.quantize_model).

    Imported lazily so that importing this stage module (config checks, `--help`) needs no torch.
    """
    from stages.quant.driver import quantize_model as core

    return core(model, input_ids, cfg, device, seed=seed, progress=progress, done=done, on_block_done=on_block_done,
                log=log or (lambda m: None))


def block_file(folder: Path, index: int) -> Path:
    return folder / PROGRESS_DIR / f"block_{index:05d}.safetensors"


def save_block(folder: Path, index: int, result: "BlockResult", seconds: float) -> None:
    """Write one finished block's layers (relative names) + metrics atomically."""
    from safetensors.torch import save_file

    from stages.quant.qstate import layer_record, layer_tensors

    path = block_file(folder, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    for name, layer in result.layers.items():
        tensors.update(layer_tensors(name, layer))
    meta = {"metrics": json.dumps({**result.metrics, "seconds": seconds}),
            "layers": json.dumps({n: layer_record(l) for n, l in result.layers.items()})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_finished_blocks(folder: Path) -> tuple[dict[int, dict[str, "QuantizedLayer"]], dict[int, dict]]:
    """Blocks an interrupted attempt finished: (index -> layers, index -> metrics)."""
    from safetensors import safe_open

    from stages.quant.base import LayerScheme, QuantizedLayer

    layers: dict[int, dict[str, QuantizedLayer]] = {}
    metrics: dict[int, dict] = {}
    for path in sorted((folder / PROGRESS_DIR).glob("block_*.safetensors")):
        index = int(path.stem.split("_")[1])
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            records = json.loads(meta["layers"])
            layers[index] = {
                n: QuantizedLayer(f.get_tensor(f"{n}.codes"), f.get_tensor(f"{n}.scale").float(),
                                  f.get_tensor(f"{n}.zero").float(), LayerScheme(r["bits"], r["group_size"], r["sym"]),
                                  f.get_tensor(f"{n}.g_idx") if r["act_order"] else None)
                for n, r in records.items()}
            metrics[index] = json.loads(meta["metrics"])
    return layers, metrics


def _log_block(ctx: "StageContext", index: int, metrics: dict) -> None:
    for key, name in STEP_METRICS.items():
        if key in metrics and metrics[key] is not None:
            ctx.log_metric(name, float(metrics[key]), index)
    loss = metrics.get("loss_best", metrics.get("mse"))
    if loss is not None:  # one comparable curve per run: the tuned loss, or the block MSE for untuned methods
        ctx.log_metric("block_loss", float(loss), index)


def _calibration(ctx: "StageContext") -> "torch.Tensor":
    from stages.calibrate import load_calibration

    if "calibrate" not in ctx.inputs:
        raise InputError(f"quant.method={ctx.cfg.quant.method} needs the calibrate stage's output")
    return load_calibration(ctx.inputs["calibrate"].path)


def _summary_metrics(block_metrics: list[dict], result_metrics: dict) -> dict[str, float]:
    out = {k: float(v) for k, v in result_metrics.items()}
    for key in ("loss_init", "loss_best", "mse"):
        vals = [m[key] for m in block_metrics if m.get(key) is not None]
        if vals:
            out[f"{key}_last_block"] = float(vals[-1])
    tuned = [m for m in block_metrics if not m.get("resumed")]
    if tuned:
        out["seconds_per_block"] = sum(m["seconds"] for m in tuned) / len(tuned)
    if any("tune_seconds" in m for m in tuned):  # AutoRound: the iteration loop alone (linear in quant.iters)
        out["tune_seconds"] = float(sum(m.get("tune_seconds", 0.0) for m in tuned))
    out["blocks_resumed"] = float(sum(1 for m in block_metrics if m.get("resumed")))
    return out


def run(ctx: "StageContext") -> "StageResult":
    """Quantize the model block by block into ctx.workdir (resuming finished blocks)."""
    import shutil

    import torch

    from pipeline.context import StageResult
    from pipeline.models import load_model
    from stages.quant.driver import quantizer_class
    from stages.quant.qstate import LAYERS_FILE, save_qstate

    cfg = ctx.cfg.quant
    whole_stage = getattr(quantizer_class(cfg), "run_stage", None)
    if whole_stage is not None:  # a method without block-by-block work (bitsandbytes quantizes at load time)
        return whole_stage(ctx)
    workdir = Path(ctx.workdir)
    done, done_metrics = load_finished_blocks(workdir) if ctx.resumed else ({}, {})
    if done:
        ctx.log(f"[quantize] resuming: blocks {sorted(done)} were finished by an earlier attempt")
    for index, metrics in sorted(done_metrics.items()):
        _log_block(ctx, index, metrics)
    needs_calib = quantizer_class(cfg).uses_calibration
    input_ids = _calibration(ctx) if needs_calib else None
    model = load_model(ctx.model, ctx.torch_dtype(), "cpu" if cfg.low_gpu_mem else ctx.device)

    def on_block_done(index: int, result: "BlockResult", seconds: float) -> None:
        save_block(workdir, index, result, seconds)
        _log_block(ctx, index, {**result.metrics, "seconds": seconds})

    result = quantize_model(model, input_ids, cfg, torch.device(ctx.device), seed=ctx.cfg.run.seed,
                            progress=ctx.progress, done=done, on_block_done=on_block_done, log=ctx.log)
    for m in result.block_metrics:
        m.update({k: v for k, v in done_metrics.get(m["block"], {}).items() if k not in m})
    save_qstate(workdir, result.layers, result.meta)
    (workdir / BLOCK_METRICS_FILE).write_text(json.dumps(result.block_metrics, indent=2))
    shutil.rmtree(workdir / PROGRESS_DIR, ignore_errors=True)
    summary = {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
               "layers": len(result.layers), "skipped": len(result.meta["skipped"])}
    # qstate.safetensors is the big output (a byte per weight): attach only the small files to MLflow
    return StageResult(metrics=_summary_metrics(result.block_metrics, result.metrics), summary=summary,
                       artifacts=[LAYERS_FILE, BLOCK_METRICS_FILE])


def meta_model(model: "ModelHandle"):
    """The model's architecture on the meta device (no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_config

    config = load_config(model)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)


def check_quant_config(cfg: "QuantConfig", nsamples: int) -> None:
    """Config-only checks (no model): method-specific ranges and batch/sample counts."""
    if cfg.method == "autoround" and cfg.iters > 0 and cfg.batch_size > nsamples:
        raise ConfigError("quant.batch_size", cfg.batch_size, f"at most calib.nsamples={nsamples}",
                          f"e.g. quant.batch_size={min(8, nsamples)}", problem="exceeds the calibration samples")
    if cfg.compile == "on" and cfg.method != "autoround":
        raise ConfigError("quant.compile", cfg.compile, f"auto or off for quant.method={cfg.method}",
                          "set quant.compile=auto", problem="only applies to autoround")


def preflight(cfg: "PipelineConfig", model: Optional["ModelHandle"], spec: Any = None) -> None:
    """Every quantize check that needs no weights: schemes per layer, overrides, batch sizes.

    Args:
        cfg: the pipeline config (reads cfg.quant and cfg.calib.nsamples).
        model: the model handle (its config gives the layer shapes).
        spec: the DAG node (unused).
    """
    from stages.quant.driver import quantizer_class
    from stages.quant.schemes import plan_quantization

    own = getattr(quantizer_class(cfg.quant), "preflight", None)
    if own is not None:  # a method with checks of its own (bitsandbytes: the package runs the scheme here)
        own(cfg, model)
        return
    check_quant_config(cfg.quant, cfg.calib.nsamples)
    if model is not None:
        plan_quantization(meta_model(model), cfg.quant)
