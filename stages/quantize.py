"""Quantize stage: RTN / GPTQ / AutoRound, block by block, streamed, resumable, optionally data-parallel.

Core: `quantize_model(model, input_ids, cfg, device)` (stages.quant.driver; no I/O).
Stage I/O (`run`, through stages.quant.job.run_job):
* streams the model (`ctx.model`) from its safetensors shards: a meta-device skeleton, one
  block's tensors in memory at a time (stages.quant.stream; docs/scale.md), and reads, for
  calibrated methods, `calib.safetensors` from the calibrate artifact;
* saves each finished block to `blocks/block_<i>.safetensors` in the work folder as soon as
  it completes (written to a temporary name, then renamed), so a crash or kill resumes at
  the first unfinished block;
* writes `qstate.safetensors` + `layers.json` (stages.quant.qstate, merged from the block
  files), `block_metrics.json`, then removes `blocks/`; logs per-block step metrics
  (`block_loss` = best tuned loss or the block MSE, `block_loss_init` (the RTN loss of
  iteration 0), `block_loss_best`, `block_best_iter`, `block_mse` (quantized block vs fp
  targets on all samples), `block_seconds`), step = block index;
* with run.nproc_per_node > 1 (or run.nnodes > 1) runs the same job on that many torchrun
  ranks (stages.quant.launch); rank 0 writes, this process logs.
`preflight` builds the model on the meta device and checks every layer's scheme (group
sizes against input dims, overrides), the ranks against the visible GPUs and the model
folder's shards against its config before any stage runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from core.errors import ConfigError, InputError
from stages.quant.job import BLOCK_METRICS_FILE

if TYPE_CHECKING:
    import torch

    from core.context import StageContext, StageResult
    from core.models import ModelHandle
    from core.schema import PipelineConfig, QuantScheme
    from stages.quant.job import QuantizeJob

STEP_METRICS = {"loss_init": "block_loss_init", "loss_best": "block_loss_best", "best_iter": "block_best_iter",
                "mse": "block_mse", "seconds": "block_seconds", "tune_seconds": "block_tune_seconds",
                # GPTQ's per-block numbers (layer-level errors, Hessian health, time split)
                "layer_mse_gptq": "block_layer_mse_gptq", "layer_mse_rtn": "block_layer_mse_rtn",
                "damp_retries": "block_damp_retries", "dead_columns": "block_dead_columns",
                "rtn_fallbacks": "block_rtn_fallbacks", "hessian_seconds": "block_hessian_seconds",
                "solve_seconds": "block_solve_seconds"}


def quantize_model(model: Any, input_ids: Optional["torch.Tensor"], cfg: "QuantScheme", device: Any, *,
                   seed: int = 0, progress: bool = False, done: Optional[dict] = None,
                   on_block_done: Optional[Any] = None, log: Any = None) -> Any:
    """The stage's pure core: quantize every decoder block (see stages.quant.driver.quantize_model).

    Imported lazily so that importing this stage module (config checks, `--help`) needs no torch.
    """
    from stages.quant.driver import quantize_model as core

    return core(model, input_ids, cfg, device, seed=seed, progress=progress, done=done, on_block_done=on_block_done,
                log=log or (lambda m: None))


def _log_block(ctx: "StageContext", index: int, metrics: dict) -> None:
    for key, name in STEP_METRICS.items():
        if key in metrics and metrics[key] is not None:
            ctx.log_metric(name, float(metrics[key]), index)
    loss = metrics.get("loss_best", metrics.get("mse"))
    if loss is not None:  # one comparable curve per run: the tuned loss, or the block MSE for untuned methods
        ctx.log_metric("block_loss", float(loss), index)


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


class BlockLogger:
    """Sends each block's metrics to the tracker once: resumed blocks first, then new ones as they finish."""

    def __init__(self, ctx: "StageContext"):
        self.ctx, self.logged = ctx, set()

    def log(self, index: int, metrics: dict) -> None:
        if index not in self.logged:
            self.logged.add(index)
            _log_block(self.ctx, index, metrics)

    def from_files(self) -> None:
        """Every block file in the work folder not logged yet (written by this or an earlier attempt)."""
        from stages.quant.progress import block_file, finished_indices, read_metadata

        for index in finished_indices(self.ctx.workdir):
            if index not in self.logged:
                try:
                    self.log(index, read_metadata(block_file(self.ctx.workdir, index))["metrics"])
                except FileNotFoundError:  # merged and removed meanwhile: logged from block_metrics.json
                    pass


def make_job(ctx: "StageContext") -> "QuantizeJob":
    """What this attempt needs, from the stage context."""
    from dataclasses import asdict

    from stages.quant.driver import quantizer_class
    from stages.quant.job import QuantizeJob

    cfg = ctx.cfg.quant
    calib = None
    if quantizer_class(cfg).uses_calibration:
        if "calibrate" not in ctx.inputs:
            raise InputError(f"quant.method={cfg.method} needs the calibrate stage's output")
        calib = str(Path(ctx.inputs["calibrate"].path).resolve())
    return QuantizeJob(workdir=str(Path(ctx.workdir).resolve()), model_path=ctx.model.path,
                       revision=ctx.model.revision, trust_remote_code=ctx.model.trust_remote_code, calib_dir=calib,
                       device=ctx.device, dtype=ctx.dtype, quant=asdict(cfg), seed=ctx.cfg.run.seed,
                       progress=ctx.progress, resumed=ctx.resumed)


def run(ctx: "StageContext") -> "StageResult":
    """Quantize the model block by block into ctx.workdir (resuming finished blocks), streamed from its
    shards; data-parallel under torchrun when run.nproc_per_node or run.nnodes asks for several ranks."""
    from core.context import StageResult
    from core.launch import world_size
    from stages.quant.job import run_job
    from stages.quant.qstate import LAYERS_FILE

    from stages.quant.driver import quantizer_class

    cfg, workdir = ctx.cfg.quant, Path(ctx.workdir)
    whole_stage = getattr(quantizer_class(cfg), "run_stage", None)
    if whole_stage is not None:  # a method without block-by-block work (bitsandbytes quantizes at load time)
        return whole_stage(ctx)
    job = make_job(ctx)
    logger = BlockLogger(ctx)
    logger.from_files()  # blocks an interrupted attempt finished
    if world_size(ctx.cfg.run) > 1:
        from stages.quant.launch import run_data_parallel

        metrics = run_data_parallel(job, ctx.cfg.run, ctx.log, poll=logger.from_files)
    else:
        metrics = run_job(job, log=ctx.log, on_block=logger.log)
    block_metrics = json.loads((workdir / BLOCK_METRICS_FILE).read_text())
    for m in block_metrics:
        logger.log(m["block"], m)
    meta = json.loads((workdir / LAYERS_FILE).read_text())
    summary = {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
               "layers": len(meta["layers"]), "skipped": len(meta["skipped"])}
    # qstate.safetensors is the big output (a byte per weight): attach only the small files to MLflow
    return StageResult(metrics=_summary_metrics(block_metrics, metrics), summary=summary,
                       artifacts=[LAYERS_FILE, BLOCK_METRICS_FILE])


def data_parallel_identity(run: Any) -> Optional[dict]:
    """The number of ranks, when several tune together: each draws its own share of every mini-batch, so
    the result is not the single-process one (None for one process: its fingerprint stays what it was)."""
    world = run.nproc_per_node * run.nnodes
    return {"world_size": world} if world > 1 else None


def meta_model(model: "ModelHandle"):
    """The model's architecture on the meta device (no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    from core.models import load_config

    config = load_config(model)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)


def check_quant_config(cfg: "QuantScheme", nsamples: int) -> None:
    """Config-only checks (no model): an AutoRound batch must fit in the calibration samples."""
    from core.schema import AutoRoundConfig

    if isinstance(cfg, AutoRoundConfig) and cfg.iters > 0 and cfg.batch_size > nsamples:
        raise ConfigError("quant.batch_size", cfg.batch_size, f"at most calib.nsamples={nsamples}",
                          f"e.g. quant.batch_size={min(8, nsamples)}", problem="exceeds the calibration samples")


def check_model_files(model: "ModelHandle", skeleton: Any) -> None:
    """A local model folder: every shard its index names exists and holds the tensors its config implies.

    Hub models are checked when the stage opens them (they may not be downloaded yet).
    """
    from stages.quant.stream import check_tensors, checkpoint_tensors, read_headers, shard_files

    folder = Path(model.path).expanduser()
    if folder.is_dir():
        check_tensors(folder, checkpoint_tensors(skeleton), read_headers(folder, shard_files(folder)))


def check_ranks(cfg: "PipelineConfig") -> None:
    """A data-parallel run on CUDA needs a GPU per rank on this node."""
    from core.launch import check_world, world_size

    if world_size(cfg.run) > 1:
        import torch

        from core.device import resolve_device

        check_world(cfg.run, resolve_device(cfg.run.device), torch.cuda.device_count())


def preflight(cfg: "PipelineConfig", model: Optional["ModelHandle"], spec: Any = None) -> None:
    """Every quantize check that needs no weights: schemes per layer, overrides, batch sizes, ranks vs GPUs,
    and the model folder's shards (present, and matching its config).

    Args:
        cfg: the pipeline config (reads cfg.quant, cfg.calib.nsamples and the run.* rank settings).
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
    check_ranks(cfg)
    if model is not None:
        skeleton = meta_model(model)
        plan_quantization(skeleton, cfg.quant)
        check_model_files(model, skeleton)
