"""`recover_model`: the recover stage's pure core (no files, MLflow or Hydra).

Order: (1) the targets, using the unquantized model as the teacher (the top-k cache is
computed with the same model object before it becomes the student); (2) the student: the
quantized layers swapped in; (3) the mode switches on what trains; (4) losses before
training; (5) training; (6) losses after; (7) the export (a tuned qstate or an adapter).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from core.schema import RecoverConfig
from stages.quant.base import QuantizedLayer
from stages.recovery.losses import TopK
from stages.recovery.modes import Export
from stages.recovery.student import build_student
from stages.recovery.targets import TargetInputs
from stages.recovery.trainer import TrainState, autocast_for, mean_loss, train
from stages.registry import RECOVER_LOSSES, RECOVER_MODES, RECOVER_SCHEDULES, resolve


@dataclass
class RecoverHooks:
    """Where the stage plugs in persistence and tracking (all optional)."""

    resume: Optional[TrainState] = None
    cached_topk: Optional[TopK] = None
    on_topk: Optional[Callable[[TopK], None]] = None
    init_metrics: Optional[dict[str, float]] = None  # losses before training, from an earlier attempt
    on_init: Optional[Callable[[dict[str, float]], None]] = None
    on_step: Optional[Callable[[int, float, float], None]] = None
    on_checkpoint: Optional[Callable[[TrainState], None]] = None


@dataclass
class RecoverResult:
    export: Export
    metrics: dict[str, float]
    curve: list[float] = field(default_factory=list)


def split_samples(n: int, val_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): the last `val_samples` calibration samples are held out."""
    idx = torch.arange(n)
    return idx[:n - val_samples], idx[n - val_samples:]


def _losses(model: nn.Module, source: Any, input_ids: torch.Tensor, split: dict[str, torch.Tensor],
            cfg: RecoverConfig, device: torch.device, when: str) -> dict[str, float]:
    autocast = autocast_for(device, cfg.amp)
    out = {}
    for name, idx in split.items():
        if idx.numel():
            out[f"{name}_loss_{when}"] = mean_loss(model, source, input_ids, idx, cfg.batch_size, device, autocast)
    return out


def recover_model(model: nn.Module, layers: Iterable[tuple[str, QuantizedLayer]], input_ids: torch.Tensor,
                  cfg: RecoverConfig, device: torch.device | str, *, load_teacher: Callable[[], nn.Module],
                  fp_weight: Callable[[str], torch.Tensor], seed: int = 0, hooks: Optional[RecoverHooks] = None,
                  progress: bool = False) -> RecoverResult:
    """Train the recovery parameters of cfg.mode and return what to write.

    Args:
        model: the unquantized causal LM on `device` (becomes the student in place).
        layers: (full name, QuantizedLayer) of every quantized Linear (the quantize stage's qstate).
        input_ids: calibration ids [n, seqlen] (never the evaluation text).
        load_teacher: () -> a separate unquantized copy on `device` (only recover.teacher=online calls it).
        fp_weight: name -> the unquantized weight of a Linear (only recover.lora_init=svd calls it).
    Returns:
        RecoverResult: the export, metrics (losses before/after, time, tokens/s, trainable parameters).
    """
    device = torch.device(device)
    hooks = hooks or RecoverHooks()
    autocast = autocast_for(device, cfg.amp)
    train_idx, val_idx = split_samples(input_ids.shape[0], cfg.val_samples)
    t0 = time.perf_counter()
    source = resolve(RECOVER_LOSSES, "recover.loss", cfg.loss)(cfg, TargetInputs(
        input_ids, device, autocast, model, load_teacher, hooks.cached_topk, hooks.on_topk, progress))
    teacher_seconds = time.perf_counter() - t0
    student = build_student(model, layers, device)
    mode = resolve(RECOVER_MODES, "recover.mode", cfg.mode)(cfg)
    mode.attach(student, fp_weight)
    params = dict(student.trainable())
    if cfg.grad_checkpointing:
        student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.model.train()
    split = {"train": train_idx, "val": val_idx}
    init = hooks.init_metrics or _losses(student.model, source, input_ids, split, cfg, device, "init")
    if hooks.on_init is not None and hooks.init_metrics is None:
        hooks.on_init(init)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train(student.model, params, source, input_ids, train_idx, cfg, mode.learning_rates(list(params)),
                   resolve(RECOVER_SCHEDULES, "recover.schedule", cfg.schedule), device, seed=seed,
                   resume=hooks.resume, on_step=hooks.on_step, on_checkpoint=hooks.on_checkpoint, progress=progress)
    student.model.eval()
    final = _losses(student.model, source, input_ids, split, cfg, device, "final")
    metrics = {**init, **final, "teacher_seconds": teacher_seconds, "train_seconds": result.seconds,
               "steps": float(cfg.steps), "resumed_from_step": float(result.resumed_from),
               "trainable_params": float(sum(p.numel() for p in params.values())),
               "train_tokens": float(result.tokens),
               "tokens_per_s": result.tokens / result.seconds if result.seconds > 0 else 0.0}
    if device.type == "cuda":
        metrics["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return RecoverResult(mode.export(student), metrics, result.curve)
