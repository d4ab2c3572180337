"""Block-by-block driver shared by every quantization method (RTN, GPTQ, AutoRound).

For block i: (1) when the method needs targets, run the full-precision block on the
full-precision stream (in place: the outputs are block i+1's full-precision inputs);
(2) `quantizer.quantize_block` on the quantized stream's inputs; (3) run the quantized
block on the quantized stream (in place: block i+1's quantized inputs), scoring it against
the targets. Finished blocks go to `on_block_done` as they complete; blocks listed in
`done` (a resumed run) are not re-tuned, only replayed to rebuild both streams.

No files, MLflow or Hydra here: `stages.quantize.run` does the I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from core.errors import InputError
from core.schema import CalibratedConfig, QuantScheme
from stages.quant.base import BlockInputs, BlockResult, QuantizedLayer
from stages.quant.blocks import block_outputs, capture_first_inputs, capture_kwargs, kwargs_to
from stages.quant.distributed import LOCAL, Comm
from stages.quant.rtn import rtn_layer
from stages.quant.schemes import QuantPlan, plan_quantization
from stages.quant.stream import ResidentBlocks
from stages.registry import QUANT_METHODS, resolve

if TYPE_CHECKING:
    from stages.quant.stream import BlockSource


@dataclass
class Streams:
    """Cached block inputs: the quantized stream and (for methods with targets) the fp stream."""

    q: Optional[torch.Tensor]
    fp: Optional[torch.Tensor]
    kwargs: list[dict[str, Any]]


PEAK_MEMORY_METRIC = "peak_gpu_mem_gb"  # the quantize stage's peak GPU memory (GiB, CUDA only)


@dataclass
class QuantizeResult:
    layers: dict[str, QuantizedLayer]  # full module name -> result
    meta: dict[str, Any]  # layers.json extras: skipped, blocks, num_blocks, method
    block_metrics: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def quantizer_class(cfg: QuantScheme) -> type:
    """The BlockQuantizer class registered for quant.method (constructed as cls(cfg, progress))."""
    return resolve(QUANT_METHODS, "quant.method", cfg.method)


def make_quantizer(cfg: QuantScheme, progress: bool = False, comm: Comm = LOCAL):
    return quantizer_class(cfg)(cfg, progress, comm=comm)


def capture_streams(model: "nn.Module | BlockSource", input_ids: torch.Tensor, device: torch.device,
                    cfg: CalibratedConfig, needs_fp: bool) -> Streams:
    """Block-0 inputs for every sample (+ a copy for the fp stream) and every block's kwargs.

    Args:
        model: the model, or a block source (stages.quant.stream) that provides its non-block modules.
    """
    source = as_block_source(model)
    pin = cfg.low_gpu_mem and device.type == "cuda"
    with source.embeddings_on(device):
        kwargs = capture_kwargs(source.model, source.blocks, input_ids.shape[1], device)
        q = capture_first_inputs(source.model, source.blocks, input_ids, device, batch_size=cfg.batch_size, pin=pin)
    memo: dict[int, Any] = {}
    kwargs = [kwargs_to(kw, device, memo) for kw in kwargs]
    fp = None
    if needs_fp:
        fp = torch.empty(q.shape, dtype=q.dtype, pin_memory=True) if pin else torch.empty_like(q)
        fp.copy_(q)
    return Streams(q, fp, kwargs)


def _load_layers(block: nn.Module, layers: dict[str, QuantizedLayer]) -> None:
    with torch.no_grad():
        for name, layer in layers.items():
            w = block.get_submodule(name).weight
            w.data.copy_(layer.to(w.device).dequantize(w.dtype))


def _block_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (2**31 - 1)


def as_block_source(model: "nn.Module | BlockSource") -> "BlockSource":
    """A block source for a model held in memory (stages.quant.stream.ResidentBlocks); sources pass through."""
    return ResidentBlocks(model) if isinstance(model, nn.Module) else model


def _shared_mse(mse: Optional[float], samples: int, comm: Comm) -> Optional[float]:
    """The block MSE over every rank's samples (each rank scored its own shard)."""
    if mse is None or comm.world_size == 1:
        return mse
    return comm.sum_float(mse * samples) / comm.sum_float(float(samples))


def run_block_step(quantizer: Any, block: nn.Module, index: int, plan: QuantPlan, streams: Optional[Streams],
                   device: torch.device, cfg: QuantScheme, seed: int,
                   done: Optional[dict[str, QuantizedLayer]], comm: Comm = LOCAL) -> tuple[BlockResult, bool]:
    """Quantize (or replay, when `done` is given) one block on `device`; advances the streams.

    Returns:
        (result, tuned): tuned is False for a replayed block.
    """
    schemes = plan.block_schemes(index)
    if streams is not None and streams.fp is not None:
        block_outputs(block, streams.fp, streams.kwargs[index], device, cfg.batch_size, out=streams.fp,
                      amp_dtype=_amp(cfg, device))
    if done is not None:
        _load_layers(block, done)
        result = BlockResult(layers=done)
    else:
        inputs = BlockInputs(streams.q, streams.kwargs[index]) if streams is not None else None
        targets = streams.fp if streams is not None and quantizer.needs_fp_targets else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_block_seed(seed, index))
            result = quantizer.quantize_block(block, schemes, inputs, targets, device)
    if streams is not None:
        _, mse = block_outputs(block, streams.q, streams.kwargs[index], device, cfg.batch_size, out=streams.q,
                               amp_dtype=_amp(cfg, device), targets=streams.fp)
        mse = _shared_mse(mse, streams.q.shape[0], comm)
        if mse is not None and done is None:
            result.metrics["mse"] = mse
    return result, done is None


def _amp(cfg: CalibratedConfig, device: torch.device) -> Optional[torch.dtype]:
    return torch.bfloat16 if cfg.amp and device.type == "cuda" else None


def quantize_model(model: "nn.Module | BlockSource", input_ids: Optional[torch.Tensor], cfg: QuantScheme,
                   device: torch.device | str, *, seed: int = 0, progress: bool = False,
                   done: Optional[Mapping[int, dict[str, QuantizedLayer]]] = None,
                   on_block_done: Optional[Callable[[int, BlockResult, float], None]] = None,
                   log: Callable[[str], None] = lambda m: None, comm: Comm = LOCAL,
                   keep_layers: bool = True) -> QuantizeResult:
    """Quantize every decoder block of a causal LM, one block at a time.

    Args:
        model: Hugging Face causal LM in eval mode (its blocks may live on the CPU; each is
            moved to `device` for its turn and back afterwards), or a block source
            (stages.quant.stream.StreamedBlocks: each block is loaded for its turn and freed).
        input_ids: [n, seqlen] calibration ids (ignored by methods without calibration); with
            several ranks (`comm`), every rank passes all of them and keeps its own shard.
        cfg: quant config; cfg.method picks the quantizer from stages.registry.QUANT_METHODS.
        device: tuning device.
        seed: per-block seeds derive from it, so a resumed run equals an uninterrupted one.
        done: block index -> saved layers (relative names) of blocks finished earlier (may be lazy).
        on_block_done: callback(index, result, seconds) after each newly quantized block.
        comm: the data-parallel group (stages.quant.distributed); LOCAL for one process.
        keep_layers: collect every block's layers in the result (False: only the head's; the
            caller keeps them through on_block_done, so host memory holds one block).
    Returns:
        QuantizeResult with full layer names, layers.json extras and per-block metrics.
    """
    device = torch.device(device)
    t_start = time.perf_counter()
    source = as_block_source(model)
    source.model.eval()  # no dropout in the captured inputs, targets or tuning
    plan = plan_quantization(source.model, cfg)
    quantizer = make_quantizer(cfg, progress, comm)
    if device.type == "cuda":
        torch.cuda.init()  # the allocator's stats exist only once CUDA is initialised; a streamed run has not touched it yet
        torch.cuda.reset_peak_memory_stats(device)
    streams = None
    if quantizer.uses_calibration:
        if input_ids is None:
            raise InputError(f"quant.method={cfg.method} needs calibration input_ids")
        ids = input_ids[comm.shard(input_ids.shape[0])]
        streams = capture_streams(source, ids, device, cfg, quantizer.needs_fp_targets)
    layers: dict[str, QuantizedLayer] = {}
    block_metrics: list[dict[str, float]] = []
    done = done or {}
    bar = tqdm(range(len(source.blocks)), desc=f"quantize ({cfg.method})", unit="block", disable=not progress)
    for i in bar:
        block = source.load_block(i, device)
        t0 = time.perf_counter()
        result, tuned = run_block_step(quantizer, block, i, plan, streams, device, cfg, seed,
                                       done[i] if i in done else None, comm)
        seconds = time.perf_counter() - t0
        source.release_block(i)
        if tuned and on_block_done is not None:
            on_block_done(i, result, seconds)
        block_metrics.append({"block": i, "seconds": seconds, "resumed": not tuned, **result.metrics})
        if keep_layers:
            layers.update({f"{plan.blocks_name}.{i}.{n}": l.to("cpu") for n, l in result.layers.items()})
        log(f"block {i}: " + (", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()) if tuned
                              else "finished by an earlier attempt (replayed)"))
    if plan.head is not None:
        layers[plan.head] = rtn_layer(source.head_weight(plan.head, device), plan.schemes[plan.head]).to("cpu")
        source.set_head(plan.head, layers[plan.head].dequantize())
    metrics = {"seconds_total": time.perf_counter() - t_start, "num_layers": float(len(plan.schemes))}
    if device.type == "cuda":
        metrics[PEAK_MEMORY_METRIC] = torch.cuda.max_memory_allocated(device) / 2**30
    meta = {"skipped": plan.skipped, "blocks": plan.blocks_name, "num_blocks": plan.num_blocks, "method": cfg.method}
    return QuantizeResult(layers, meta, block_metrics, metrics)
