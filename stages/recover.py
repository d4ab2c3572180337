"""Recover stage: win back quality after quantization, between quantize and pack (recover.mode=scales | lora |
scales_lora).

Core: `stages.recovery.core.recover_model` (no I/O). Stage I/O (`run`):
* reads the unquantized model (`ctx.model`), the calibration ids (calibrate artifact; never the
  evaluation text) and the qstate (quantize artifact);
* keeps its resumable state in `progress/` of the work folder: the teacher's top-k cache, the
  losses before training and, every recover.checkpoint_every steps, the trainable parameters
  with their Adam moments, so a crash or kill resumes at the last checkpoint;
* writes, for mode=scales, `qstate.safetensors` + `layers.json` (same codes, tuned scales and
  zeros; the format of stages.quant.qstate) and `replacements.safetensors` (the tuned norm
  weights, which pack writes in place of the model's); for mode=lora, `adapter/` (a PEFT
  adapter: adapter_config.json + adapter_model.safetensors), which pack puts beside the
  checkpoint; for mode=scales_lora, both; and `recover.json` (metrics and the loss per step);
* logs `loss` and `lr` per step (step = optimizer step) and the summary metrics to MLflow.
With recover.mode=none the DAG skips the stage and pack reads the quantize stage's qstate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from core.errors import ConfigError

if TYPE_CHECKING:
    from core.context import Artifact, StageContext, StageResult
    from core.models import ModelHandle
    from core.schema import PipelineConfig

RECOVER_FILE = "recover.json"
REPLACEMENTS_FILE = "replacements.safetensors"  # read by stages.formats.source.QStateReader


ADAPTER_MODES = ("lora", "scales_lora")  # recover.mode values whose output includes a PEFT adapter


def writes_adapter(cfg: "PipelineConfig") -> bool:
    """Whether the packed checkpoint gets a LoRA adapter beside it (evaluate must load it through PEFT)."""
    return cfg.recover.mode in ADAPTER_MODES


def fingerprint_view(config: dict[str, Any]) -> dict[str, Any]:
    """The stage config as its fingerprint sees it: recover.scales_lr left out while null (every mode but
    scales_lora), so the scales and lora artifacts keep the fingerprints they had before the field existed."""
    recover = {k: v for k, v in config["recover"].items() if not (k == "scales_lr" and v is None)}
    return {**config, "recover": recover}


def enabled(cfg: "PipelineConfig") -> bool:
    """Whether the recover node is part of the DAG for this config (pipeline.dag's `enabled_when`)."""
    return cfg.recover.mode != "none"


def qstate_input(inputs: dict[str, "Artifact"]) -> "Artifact":
    """The artifact whose qstate pack reads: the recovered one when recovery rewrote it, else quantize's."""
    from stages.quant.qstate import QSTATE_FILE

    recovered = inputs.get("recover")
    if recovered is not None and (recovered.path / QSTATE_FILE).is_file():
        return recovered
    return inputs["quantize"]


def attach_adapter(inputs: dict[str, "Artifact"], pack_folder: Path) -> Optional[Path]:
    """Copy the recover stage's adapter (lora mode) beside the packed checkpoint; returns its new folder."""
    from stages.recovery.adapter import ADAPTER_DIR, find_adapter

    recovered = inputs.get("recover")
    source = find_adapter(recovered.path) if recovered is not None else None
    if source is None:
        return None
    target = Path(pack_folder) / ADAPTER_DIR
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


def _write_outputs(workdir: Path, result: Any, meta: dict, base_model: str) -> list[str]:
    from safetensors.torch import save_file

    from stages.quant.qstate import LAYERS_FILE, save_qstate
    from stages.recovery.adapter import ADAPTER_DIR, CONFIG_FILE, write_adapter

    export, files = result.export, []
    if export.layers is not None:
        save_qstate(workdir, export.layers, meta)
        save_file({k: v.contiguous() for k, v in export.replacements.items()}, str(workdir / REPLACEMENTS_FILE))
        files.append(LAYERS_FILE)  # the qstate itself (a byte per weight) stays out of MLflow
    if export.adapter is not None:
        write_adapter(workdir / ADAPTER_DIR, export.adapter, base_model)
        files.append(f"{ADAPTER_DIR}/{CONFIG_FILE}")
        # what recovery adds on disk beside the checkpoint
        result.metrics["adapter_mb"] = sum(p.stat().st_size for p in (workdir / ADAPTER_DIR).iterdir()) / 1e6
    record = {"metrics": result.metrics, "curve": result.curve}
    (workdir / RECOVER_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return files + [RECOVER_FILE]


def _hooks(ctx: "StageContext"):
    from stages.recovery import progress
    from stages.recovery.core import RecoverHooks

    work, cfg = Path(ctx.workdir), ctx.cfg.recover
    resumed = ctx.resumed

    def on_step(step: int, loss: float, lr: float) -> None:
        ctx.log_metric("loss", loss, step)
        ctx.log_metric("lr", lr, step)

    state = progress.load_state(work) if resumed else None
    if state is not None:
        ctx.log(f"[recover] resuming at step {state.step} of {cfg.steps} (an earlier attempt's checkpoint)")
        for i, loss in enumerate(state.curve):
            ctx.log_metric("loss", loss, i + 1)
    return RecoverHooks(resume=state, init_metrics=progress.load_init(work) if resumed else None,
                        on_init=lambda m: progress.save_init(work, m), on_topk=lambda c: progress.save_topk(work, c),
                        on_step=on_step, on_checkpoint=lambda s: progress.save_state(work, s))


def run(ctx: "StageContext") -> "StageResult":
    """Recover ctx.inputs["quantize"] against the unquantized ctx.model on the calibration set."""
    import torch

    from core.context import StageResult
    from core.models import load_model
    from stages.calibrate import load_calibration
    from stages.formats.source import QStateReader, SourceModel
    from stages.recovery import progress

    cfg, work = ctx.cfg.recover, Path(ctx.workdir)
    qstate = QStateReader.open(ctx.inputs["quantize"].path)
    input_ids = load_calibration(ctx.inputs["calibrate"].path)
    hooks = _hooks(ctx)
    if ctx.resumed and cfg.loss == "kl" and cfg.teacher == "topk":
        hooks.cached_topk = progress.load_topk(work, cfg.topk, (input_ids.shape[0], input_ids.shape[1] - 1))
    dtype, device = ctx.torch_dtype(), torch.device(ctx.device)
    model = load_model(ctx.model, dtype, ctx.device)
    source = SourceModel.open(ctx.model.path, ctx.model.revision)
    from stages.recovery.core import recover_model

    result = recover_model(model, qstate.iter_layers(), input_ids, cfg, device,
                           load_teacher=lambda: load_model(ctx.model, dtype, ctx.device),
                           fp_weight=lambda name: source.load(f"{name}.weight"), seed=ctx.cfg.run.seed,
                           hooks=hooks, progress=ctx.progress)
    meta = {k: v for k, v in qstate.meta.items() if k != "layers"}
    meta["recovered"] = {"mode": cfg.mode, "loss": cfg.loss, "steps": cfg.steps}
    files = _write_outputs(work, result, meta, ctx.model.name)
    shutil.rmtree(work / progress.PROGRESS_DIR, ignore_errors=True)
    m = result.metrics
    ctx.log(f"[recover] {cfg.mode}: train loss {m['train_loss_init']:.4f} -> {m['train_loss_final']:.4f} "
            f"in {m['train_seconds']:.1f} s ({m['tokens_per_s']:.0f} tokens/s)")
    summary = {"mode": cfg.mode, "loss": cfg.loss, "steps": cfg.steps,
               "train_loss": f"{m['train_loss_init']:.4g} -> {m['train_loss_final']:.4g}",
               "trainable": int(m["trainable_params"])}
    if "val_loss_init" in m:
        summary["val_loss"] = f"{m['val_loss_init']:.4g} -> {m['val_loss_final']:.4g}"
    return StageResult(metrics=m, summary=summary, artifacts=files)


# -- checks before any stage runs ------------------------------------------------------------
def check_recover_config(cfg: "PipelineConfig") -> None:
    """Config-only checks (no model): sample counts."""
    r, n = cfg.recover, cfg.calib.nsamples
    if cfg.quant.method.startswith("bnb_"):
        raise ConfigError("recover.mode", r.mode, "none with a bitsandbytes quant method",
                          f"drop recover= or quantize with rtn/gptq/autoround (quant={cfg.quant.method} has no qstate "
                          "to recover)", problem=f"cannot follow quant={cfg.quant.method}")
    if r.val_samples >= n:
        raise ConfigError("recover.val_samples", r.val_samples, f"less than calib.nsamples={n}",
                          f"e.g. recover.val_samples={min(8, n // 4)}", problem="leaves no training samples")
    if r.batch_size > n - r.val_samples:
        raise ConfigError("recover.batch_size", r.batch_size, f"at most the {n - r.val_samples} training samples "
                          f"(calib.nsamples={n} minus recover.val_samples={r.val_samples})",
                          f"e.g. recover.batch_size={max(1, min(8, n - r.val_samples))}",
                          problem="exceeds the calibration samples")
    if r.scales_lr is not None and r.mode != "scales_lora":
        raise ConfigError("recover.scales_lr", r.scales_lr, "null unless recover.mode=scales_lora",
                          f"drop recover.scales_lr (recover.mode={r.mode} trains with recover.lr alone) or set "
                          "recover=scales_lora", problem=f"has no effect with recover.mode={r.mode}")
    if r.warmup_steps > r.steps:
        raise ConfigError("recover.warmup_steps", r.warmup_steps, f"at most recover.steps={r.steps}",
                          f"e.g. recover.warmup_steps={r.steps // 10}")


def model_layers(cfg: "PipelineConfig", model: "ModelHandle"):
    """Every Linear's shape and which ones the quantize config quantizes (meta device, no weights)."""
    from torch import nn

    from stages.quant.schemes import plan_quantization
    from stages.quantize import meta_model
    from stages.recovery.modes import ModelLayers

    meta = meta_model(model)
    plan = plan_quantization(meta, cfg.quant)
    linears = {n: (m.out_features, m.in_features) for n, m in meta.named_modules() if isinstance(m, nn.Linear)}
    return ModelLayers(linears, set(plan.schemes), {n for n, s in plan.schemes.items() if not s.sym})


def preflight(cfg: "PipelineConfig", model: Optional["ModelHandle"], spec: Any = None) -> None:
    """Every recover check that needs no weights: sample counts, and the mode against the model's layers.

    Args:
        cfg: the pipeline config (reads cfg.recover, cfg.quant, cfg.calib).
        model: the model handle (its config gives the layer shapes), or None.
        spec: the DAG node (unused).
    """
    from stages.registry import RECOVER_MODES, resolve

    check_recover_config(cfg)
    if model is not None:
        resolve(RECOVER_MODES, "recover.mode", cfg.recover.mode)(cfg.recover).check(model_layers(cfg, model))
