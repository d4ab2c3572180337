"""The recovery training loop (no files, MLflow or Hydra: the stage does the I/O through callbacks).

One optimizer step = `grad_accum` micro-batches of `batch_size` calibration samples, drawn
epoch by epoch in a seeded order that depends only on the step number, so a run resumed from
a checkpoint sees exactly the batches an uninterrupted run would. The loss is computed over
the logits in chunks of positions (the hidden states are detached once and the head's
gradient is accumulated chunk by chunk), so full [batch x seqlen x vocabulary] logits never
exist. AdamW on float32 parameters; bf16 autocast on CUDA when recover.amp.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from core.schema import RecoverConfig
from stages.recovery.targets import TargetSource, body_and_head, chunk_slices, hidden_states

BETAS = (0.9, 0.95)


# -- schedules (stages.registry.RECOVER_SCHEDULES) ------------------------------------------
def constant_schedule(step: int, total: int) -> float:
    return 1.0


def linear_schedule(step: int, total: int) -> float:
    return 1.0 - step / max(total, 1)


def cosine_schedule(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def lr_at(schedule: Callable[[int, int], float], step: int, total: int, warmup: int) -> float:
    """The learning-rate factor of optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return schedule(step - warmup, total - warmup)


def batch_samples(step: int, micro: int, train_idx: torch.Tensor, batch: int, accum: int, seed: int) -> torch.Tensor:
    """Calibration sample indices of micro-batch `micro` of step `step` (seeded epoch permutations)."""
    n = train_idx.numel()
    start = (step * accum + micro) * batch
    out = []
    for pos in range(start, start + batch):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(train_idx[perm[i]])
    return torch.stack(out)


@dataclass
class TrainState:
    """Everything needed to continue training: the step reached, parameters, Adam moments, loss curve."""

    step: int
    params: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    curve: list[float] = field(default_factory=list)


@dataclass
class TrainResult:
    curve: list[float]  # loss per optimizer step
    seconds: float
    tokens: int  # training tokens processed (positions x steps, this attempt only)
    resumed_from: int = 0


def autocast_for(device: torch.device, amp: bool) -> Callable[[], Any]:
    if amp and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def chunked_loss(model: nn.Module, source: TargetSource, index: torch.Tensor, ids: torch.Tensor, scale: float,
                 autocast: Callable[[], Any], backward: bool) -> float:
    """Loss of one micro-batch times `scale`; with backward, gradients accumulate in the parameters."""
    _, head = body_and_head(model)
    targets = source.batch(index, ids)
    with autocast():
        hidden = hidden_states(model, ids)
    flat = hidden.reshape(-1, hidden.shape[-1])
    detached = flat.detach().requires_grad_(backward)
    total = 0.0
    for sl in chunk_slices(flat.shape[0], head.out_features):
        with autocast():
            logits = head(detached[sl])
        loss = targets.loss(logits, sl) * scale
        if backward:
            loss.backward()
        total += float(loss.detach())
    if backward and flat.requires_grad:
        flat.backward(detached.grad)
    return total


@torch.no_grad()
def mean_loss(model: nn.Module, source: TargetSource, input_ids: torch.Tensor, index: torch.Tensor, batch: int,
              device: torch.device, autocast: Callable[[], Any]) -> float:
    """Average loss per position over the samples `index` (no gradients)."""
    if index.numel() == 0:
        return float("nan")
    positions = index.numel() * (input_ids.shape[1] - 1)
    total = 0.0
    for start in range(0, index.numel(), batch):
        idx = index[start:start + batch]
        total += chunked_loss(model, source, idx, input_ids[idx].to(device), 1.0 / positions, autocast, False)
    return total


def _optimizer(params: dict[str, nn.Parameter], cfg: RecoverConfig, lrs: dict[str, float],
               resume: Optional[TrainState]) -> torch.optim.AdamW:
    """AdamW with one parameter group per peak learning rate (kept as the group's "peak_lr")."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in params.items():
        groups.setdefault(lrs[name], []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": lr, "peak_lr": lr} for lr, ps in groups.items()],
                            betas=BETAS, weight_decay=cfg.weight_decay)
    if resume is not None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(resume.params[name].to(p.device))
                opt.state[p] = {"step": torch.tensor(float(resume.step)),
                                "exp_avg": resume.exp_avg[name].to(p.device).clone(),
                                "exp_avg_sq": resume.exp_avg_sq[name].to(p.device).clone()}
    return opt


def snapshot(params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, step: int, curve: list[float]) -> TrainState:
    """The current training state, copied to the CPU."""
    state = {name: opt.state.get(p, {}) for name, p in params.items()}
    zeros = {name: torch.zeros_like(p, device="cpu") for name, p in params.items()}
    return TrainState(step, {n: p.detach().cpu().clone() for n, p in params.items()},
                      {n: s["exp_avg"].cpu().clone() if "exp_avg" in s else zeros[n] for n, s in state.items()},
                      {n: s["exp_avg_sq"].cpu().clone() if "exp_avg_sq" in s else zeros[n] for n, s in state.items()},
                      list(curve))


def train(model: nn.Module, params: dict[str, nn.Parameter], source: TargetSource, input_ids: torch.Tensor,
          train_idx: torch.Tensor, cfg: RecoverConfig, lrs: dict[str, float], schedule: Callable[[int, int], float],
          device: torch.device, *, seed: int = 0, resume: Optional[TrainState] = None,
          on_step: Optional[Callable[[int, float, float], None]] = None,
          on_checkpoint: Optional[Callable[[TrainState], None]] = None, progress: bool = False) -> TrainResult:
    """Run recover.steps optimizer steps on `params` (continuing from `resume` when given).

    Args:
        model: the student (its trainable parameters are `params`, by name).
        source: targets per batch (stages.recovery.targets).
        input_ids: calibration ids [n, T]; train_idx: the samples to train on.
        lrs: parameter name -> peak learning rate (the schedule scales every group alike).
        on_step: callback(step, loss, lr) after every optimizer step (1-based step).
        on_checkpoint: callback(state) every recover.checkpoint_every steps.
    """
    opt = _optimizer(params, cfg, lrs, resume)
    autocast = autocast_for(device, cfg.amp)
    curve = list(resume.curve) if resume else []
    first = resume.step if resume else 0
    positions = cfg.batch_size * cfg.grad_accum * (input_ids.shape[1] - 1)
    t0 = time.perf_counter()
    bar = tqdm(range(first, cfg.steps), desc=f"recover ({cfg.mode})", unit="step", disable=not progress,
               initial=first, total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * lr_at(schedule, step, cfg.steps, cfg.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for micro in range(cfg.grad_accum):
            idx = batch_samples(step, micro, train_idx, cfg.batch_size, cfg.grad_accum, seed)
            loss += chunked_loss(model, source, idx, input_ids[idx].to(device), 1.0 / positions, autocast, True)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        opt.step()
        curve.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(step + 1, loss, opt.param_groups[0]["lr"])
        if on_checkpoint is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 \
                and step + 1 < cfg.steps:
            on_checkpoint(snapshot(params, opt, step + 1, curve))
    bar.close()
    done = cfg.steps - first
    return TrainResult(curve, time.perf_counter() - t0, done * positions, first)
