"""AutoRound: block-wise SignSGD tuning of rounding offsets and clipping factors.

Per block, for every quantized Linear: a rounding offset V (init 0, the weight's shape) and
per-group min/max clipping factors (init 1, clamped to [0, 1]). The loss is the MSE between
the block with fake-quantized weights on the quantized stream's inputs and the
full-precision block's outputs on full-precision inputs, in fp32. SignSGD steps
p -= lr_t * sign(grad) with lr_t decaying linearly from lr to 0; the parameters of the best
iteration are kept. Semantics follow the reference auto-round 0.16.1 (lr = 1/iters, or
2/iters for <= 3-bit layers when iters >= 1000; V is not clamped; the loss leaves out the last
position of every sample and is scaled by 1000 before backward; batches are drawn from a
shuffled order, reshuffled when exhausted; the last iteration's update is never applied
because it is never scored).

Data-parallel (a `Comm` of several ranks, stages.quant.distributed): each rank tunes on its own
shard of the samples, drawing quant.batch_size / ranks of them per mini-batch; the loss and the
gradients are summed over the ranks before every step, and rank 0's parameters are broadcast at
the end, so every rank exports the same codes.

Speed: the block runs functionally (`torch.func.functional_call`) with weights from one
fused fake-quant per scheme bucket (stages.quant.fakequant), the step never syncs with the
host (best loss / parameters tracked on the device, batches picked by a device-side index
schedule), and `quant.compile` compiles the whole fake-quant + block + loss step.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from core.schema import AutoRoundConfig, switch_enabled
from stages.quant.base import BlockInputs, BlockResult, LayerScheme, QuantizedLayer
from stages.quant.distributed import LOCAL, Comm
from stages.quant.fakequant import Bucket, build_buckets, export_layers, fake_quant, split_layers
from stages.quant.feed import index_schedule, make_feeder

LOSS_SCALE = 1000.0  # as the reference: keeps tiny fp32 gradients away from zero before sign()


@dataclass
class BucketParams:
    """Tuning parameters of one bucket and their learning rates."""

    v: torch.Tensor  # [G, L] fp32
    min_factor: Optional[torch.Tensor]  # [G] fp32, None when min/max tuning is off
    max_factor: Optional[torch.Tensor]
    lr: float
    minmax_lr: float

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.v, self.min_factor, self.max_factor) if t is not None]


def default_lr(cfg: AutoRoundConfig, bits: int) -> float:
    """lr for a layer: quant.lr, else 1/iters (2/iters for <= 3 bits at >= 1000 iters, as the reference)."""
    if cfg.lr is not None:
        return float(cfg.lr)
    return (2.0 if cfg.iters >= 1000 and bits <= 3 else 1.0) / max(cfg.iters, 1)


def init_params(buckets: list[Bucket], cfg: AutoRoundConfig) -> list[BucketParams]:
    out = []
    for b in buckets:
        lr = default_lr(cfg, b.bits)
        dev = b.weight.device

        def factor() -> Optional[torch.Tensor]:
            return torch.ones(b.rows, device=dev, requires_grad=True) if cfg.tune_minmax else None

        v = torch.zeros(b.weight.shape, device=dev, requires_grad=True)
        out.append(BucketParams(v, factor(), factor(), lr, float(cfg.minmax_lr) if cfg.minmax_lr else lr))
    return out


def quantized_weights(buckets: list[Bucket], tensors: list[torch.Tensor], layout: list[tuple[bool, bool]]
                      ) -> dict[str, torch.Tensor]:
    """Parameter name ('mlp.up_proj.weight') -> fake-quantized weight for every bucket."""
    weights: dict[str, torch.Tensor] = {}
    pos = 0
    for bucket, (has_min, has_max) in zip(buckets, layout):
        v = tensors[pos]
        mn = tensors[pos + 1] if has_min else None
        mx = tensors[pos + 1 + has_min] if has_max else None
        pos += 1 + has_min + has_max
        for name, w in split_layers(bucket, fake_quant(bucket, v, mn, mx)).items():
            weights[f"{name}.weight"] = w
    return weights


def batch_sse(block: nn.Module, buckets: list[Bucket], layout: list[tuple[bool, bool]], tensors: list[torch.Tensor],
              x: torch.Tensor, target: torch.Tensor, kwargs: dict[str, Any], amp_dtype: Optional[torch.dtype]
              ) -> torch.Tensor:
    """Sum of squared errors (fp32) of the fake-quantized block on x against target."""
    weights = quantized_weights(buckets, tensors, layout)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        out = torch.func.functional_call(block, weights, (x,), kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    # the last position of every sample is left out of the loss, as the reference does
    return F.mse_loss(out[:, :-1].float(), target[:, :-1].float(), reduction="sum")


@dataclass
class TuneOutcome:
    losses: torch.Tensor  # [iters] per-iteration loss (mean over the global batch), on the device
    best_loss: torch.Tensor
    best_iter: torch.Tensor


def signsgd_step(params: list[BucketParams], it: int, iters: int) -> None:
    """p -= lr_t * sign(grad), lr_t = lr * (1 - it / iters); factors clamped to [0, 1]."""
    decay = 1.0 - it / iters
    with torch.no_grad():
        for p in params:
            p.v.sub_(p.v.grad.sign_(), alpha=p.lr * decay)
            for f in (p.min_factor, p.max_factor):
                if f is not None:
                    f.sub_(f.grad.sign_(), alpha=p.minmax_lr * decay).clamp_(0.0, 1.0)
            for t in p.tensors():
                t.grad = None


def _track_best(tensors: list[torch.Tensor], best: list[torch.Tensor], state: TuneOutcome, loss: torch.Tensor,
                it: int) -> None:
    improved = loss < state.best_loss
    state.best_loss = torch.where(improved, loss, state.best_loss)
    state.best_iter = torch.where(improved, torch.full_like(state.best_iter, it), state.best_iter)
    weight = improved.to(torch.float32)
    for b, t in zip(best, tensors):
        b.lerp_(t.detach(), weight)  # exact copy when improved, unchanged otherwise


def in_process_compile(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn` with inductor compiling in this process (compile_threads=1) unless TORCHINDUCTOR_COMPILE_THREADS
    says otherwise. The step is one small graph: inductor's default worker pool (one process per core, each
    with torch loaded) made the first block slower on an H200 (16.6 s against 6.6 s for a 70B-shaped block)
    and added about 6 GiB of resident memory (1.8 GiB proportional) to a stage that otherwise needs 2-3 GiB."""
    if os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"):
        return fn
    import torch._inductor.config as inductor_config

    return inductor_config.patch(compile_threads=1)(fn)


class AutoRoundQuantizer:
    """BlockQuantizer for AutoRound (registered as quant.method=autoround)."""

    uses_calibration = True
    needs_fp_targets = True

    def __init__(self, cfg: AutoRoundConfig, progress: bool = False, comm: Comm = LOCAL):
        self.cfg, self.progress, self.comm = cfg, progress, comm
        self._compiled: Optional[Callable[..., torch.Tensor]] = None

    def _loss_fn(self, device: torch.device) -> Callable[..., torch.Tensor]:
        if not switch_enabled(self.cfg.compile, device.type):
            return batch_sse
        if self._compiled is None:
            self._compiled = in_process_compile(torch.compile(batch_sse, dynamic=False))
        return self._compiled

    def _amp_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        return torch.bfloat16 if (self.cfg.amp and device.type == "cuda") else None

    def quantize_block(self, block: nn.Module, schemes: dict[str, LayerScheme], inputs: Optional[BlockInputs],
                       fp_targets: Optional[torch.Tensor], device: torch.device,
                       on_step: Optional[Callable[[int, float], None]] = None) -> BlockResult:
        """Tune V and the clipping factors of the block's Linears; see BlockQuantizer."""
        device = torch.device(device)
        weights = {name: block.get_submodule(name).weight for name in schemes}
        buckets = build_buckets(weights, schemes)
        params = init_params(buckets, self.cfg)
        if self.cfg.iters == 0 or inputs is None or fp_targets is None:
            return self._finish(block, buckets, params, {})
        frozen = [p for p in block.parameters() if p.requires_grad]
        for p in frozen:  # no grads for norms etc.: also skips the q/k/v input-gradient matmuls
            p.requires_grad_(False)
        t0 = time.perf_counter()
        try:
            with torch.enable_grad():  # also when the caller runs under no_grad
                outcome = self._tune(block, buckets, params, inputs, fp_targets, device)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        curve = outcome.losses.tolist()  # the first host sync: the tuning loop has finished
        metrics = {"loss_init": curve[0], "loss_best": float(outcome.best_loss), "best_iter": int(outcome.best_iter),
                   "loss_last": curve[-1], "tune_seconds": time.perf_counter() - t0}
        if on_step is not None:
            for i, loss in enumerate(curve):
                on_step(i, loss)
        result = self._finish(block, buckets, params, metrics)
        result.curve = curve
        return result

    def _tune(self, block: nn.Module, buckets: list[Bucket], params: list[BucketParams], inputs: BlockInputs,
              fp_targets: torch.Tensor, device: torch.device) -> TuneOutcome:
        cfg, comm = self.cfg, self.comm
        n = inputs.hidden.shape[0]  # this rank's samples
        batch = cfg.batch_size // comm.world_size  # this rank's part of every mini-batch
        global_batch = min(n, batch * cfg.grad_accum)  # this rank's samples per iteration
        gen = torch.Generator().manual_seed(comm.rank_seed(int(torch.randint(0, 2**31 - 1, (1,)).item())))
        schedule = index_schedule(n, global_batch, cfg.iters, gen)
        feeder = make_feeder(inputs.hidden, fp_targets, schedule, batch, device)
        steps_per_iter = -(-global_batch // batch)
        seq, hidden = inputs.hidden.shape[1], inputs.hidden.shape[2]
        # the loss is a mean over every rank's samples and all but the last position
        numel = int(comm.sum_float(global_batch)) * (seq - 1) * hidden
        layout = [(p.min_factor is not None, p.max_factor is not None) for p in params]
        tensors = [t for p in params for t in p.tensors()]
        best = [t.detach().clone() for t in tensors] if cfg.use_best_iter else []
        state = TuneOutcome(torch.zeros(cfg.iters, device=device), torch.tensor(float("inf"), device=device),
                            torch.tensor(-1, device=device))
        loss_fn, amp = self._loss_fn(device), self._amp_dtype(device)
        for it in tqdm(range(cfg.iters), desc="autoround block", leave=False, disable=not self.progress):
            total = torch.zeros((), device=device)
            for k in range(steps_per_iter):
                step = it * steps_per_iter + k
                x, t = feeder.get(step)
                sse = loss_fn(block, buckets, layout, tensors, x, t, inputs.kwargs, amp)
                (sse * (LOSS_SCALE / numel)).backward()
                total = total + sse.detach()
                feeder.done(step)
            stepping = it < cfg.iters - 1  # the last update would never be scored
            comm.sum_([total] + ([t.grad for t in tensors] if stepping else []))  # no-op on one process
            loss = total / numel
            state.losses[it] = loss
            if cfg.use_best_iter:
                _track_best(tensors, best, state, loss, it)
            if stepping:
                signsgd_step(params, it, cfg.iters)
        with torch.no_grad():
            if cfg.use_best_iter:
                for t, b in zip(tensors, best):
                    t.copy_(b)
            else:
                state.best_loss, state.best_iter = state.losses[-1], torch.tensor(cfg.iters - 1)
            comm.broadcast_(tensors)  # every rank exports rank 0's parameters, bit for bit
        return state

    def _finish(self, block: nn.Module, buckets: list[Bucket], params: list[BucketParams],
                metrics: dict[str, float]) -> BlockResult:
        """Export codes for the chosen parameters and leave the dequantized weights in the block."""
        layers: dict[str, QuantizedLayer] = {}
        with torch.no_grad():
            for bucket, p in zip(buckets, params):
                layers.update(export_layers(bucket, p.v.detach(), p.min_factor, p.max_factor))
            for name, layer in layers.items():
                w = block.get_submodule(name).weight
                w.data.copy_(layer.dequantize(w.dtype))
        return BlockResult(layers=layers, metrics=metrics)
