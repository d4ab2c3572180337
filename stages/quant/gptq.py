"""GPTQ: per-Linear quantization with Hessian-based error feedback, true-sequential per block.

Per Linear W [rows, cols] with calibration inputs X [N tokens, cols]: H = 2/N · XᵀX in float32
(accumulated batch by batch by forward pre-hooks). Dead inputs (H_ii = 0) get H_ii = 1 and a
zero weight column (as the reference); inputs with NaN/inf activations are decoupled (no error
feedback, weights kept). λ = damp_percent · mean(diag H) dampens H; a failed Cholesky is retried
with 10x λ up to mean(diag H), then the layer falls back to RTN (logged and counted). Columns are
rounded one at a time (descending diag(H) with act_order), each error pushed onto the columns
not rounded yet through U = chol((H + λI)⁻¹)ᵀ; updates are lazy per batch of columns, and a
batch ends every block_columns and at every group start, so a group's scale/zero
(qdq.compute_qparams) come from its fully updated weights (static_groups: from the original
weights, natural groups). act_order writes g_idx[i] = group of original column i.

Per block, a one-sample probe finds the Linears' call order and which read the same input
tensor (q/k/v, gate/up): a family shares one Hessian and is solved as one stacked matrix (rows
are independent in GPTQ). Families are quantized in call order (true_sequential), each on
inputs from the block with the earlier families already quantized; the Hessian passes stop as
soon as the family has seen its inputs. See docs/gptq.md (also for the block metrics).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from core.errors import InputError
from core.schema import GPTQConfig
from stages.quant.base import BlockInputs, BlockResult, LayerScheme, QuantizedLayer
from stages.quant.blocks import batches, run_block
from stages.quant.distributed import LOCAL, Comm
from stages.quant.qdq import QParams, compute_qparams, group_index
from stages.quant.rtn import rtn_layer

log = logging.getLogger(__name__)

DAMP_GROWTH = 10.0  # a failed Cholesky is retried with this many times the dampening ...
MAX_DAMP = 1.0  # ... up to mean(diag H); past that the layer falls back to RTN
_HALF = (torch.bfloat16, torch.float16)


@dataclass
class GPTQOutcome:
    """One weight's result; row errors are mean squared output errors per row (via H)."""

    layer: QuantizedLayer
    row_err: torch.Tensor  # [rows] GPTQ
    row_err_rtn: torch.Tensor  # [rows] RTN of the same weight, same inputs
    damp_percent: float
    retries: int
    dead: int
    nonfinite: int
    fallback: bool


# ----------------------------------------------------------------------------- Hessian


class Hessian:
    """Running XᵀX in float32 over the inputs of one family of Linears."""

    def __init__(self, cols: int, device: torch.device):
        self.sum: Optional[torch.Tensor] = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.tokens = 0
        self._half_mm = True  # float32-output half matmul (torch >= 2.8 on CUDA)

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of x [..., cols] (one row per token)."""
        x = x.detach().reshape(-1, x.shape[-1])
        self.tokens += x.shape[0]
        if self._half_mm and x.is_cuda and x.dtype in _HALF:
            try:
                self.sum.add_(torch.mm(x.t(), x, out_dtype=torch.float32))
                return
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, TypeError, NotImplementedError):
                self._half_mm = False  # this torch has no fp32-output half matmul: use fp32 inputs
        xf = x.float()
        self.sum.addmm_(xf.t(), xf)

    def matrix(self, consume: bool = False) -> torch.Tensor:
        """H = 2/N · XᵀX (a new tensor; with consume the running sum is scaled in place and released)."""
        scale = 2.0 / self.tokens
        if not consume:
            return self.sum * scale
        h, self.sum = self.sum, None
        return h.mul_(scale)


def clean_hessian(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decouple non-finite inputs and mark dead ones, in place.

    Returns:
        (h, dead, nonfinite): boolean [cols] masks. Non-finite rows/columns are zeroed; both
        kinds get H_ii = 1. The caller zeroes W's dead columns (not the non-finite ones).
    """
    # A NaN/inf activation of input i makes H_ii non-finite (and row/column i with it).
    nonfinite = ~torch.isfinite(h.diagonal())
    for _ in range(2):  # the second pass catches what is left (e.g. overflowed products)
        if not bool(nonfinite.any()):
            break
        h[nonfinite] = 0.0
        h[:, nonfinite] = 0.0
        nonfinite = nonfinite | ~torch.isfinite(h).all(dim=1)
    diag = h.diagonal()
    zero = diag == 0
    diag.masked_fill_(zero, 1.0)
    return h, zero & ~nonfinite, nonfinite


def inverse_factor(h: torch.Tensor, damp_percent: float) -> tuple[Optional[torch.Tensor], float, int]:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H), retrying with more dampening.

    Returns:
        (U or None when even damp = MAX_DAMP fails, the damp fraction used, number of retries).
    """
    mean_diag = h.diagonal().mean()
    damp, retries = damp_percent, 0
    while True:
        damped = h.clone()
        damped.diagonal().add_(mean_diag * damp)
        low, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp, retries
        if damp >= MAX_DAMP:
            return None, damp, retries
        retries += 1
        damp = min(damp * DAMP_GROWTH, MAX_DAMP)


# ----------------------------------------------------------------------------- one weight


def batch_bounds(cols: int, group_size: int, block_columns: int, static_groups: bool) -> list[tuple[int, int]]:
    """Lazy-batch column ranges: cut every block_columns and (unless static) at every group start."""
    cuts = set(range(0, cols, block_columns))
    if group_size > 0 and not static_groups:
        cuts |= set(range(0, cols, group_size))
    edges = sorted(cuts) + [cols]
    return list(zip(edges[:-1], edges[1:]))


def quantize_columns(wb: torch.Tensor, un: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     err: torch.Tensor, k: torch.Tensor) -> None:
    """GPTQ's inner loop over one batch of columns (transposed layout: a column is a row), in place.

    Args:
        wb: [B, rows] the batch's current weights (updated by the in-batch error feedback).
        un: [B, B] U_ij / U_ii for the batch's columns.
        scale, lo, hi: [B, rows] per column: scale and the code range minus the zero point
            (lo = -zero, hi = maxq - zero); broadcast views are fine.
        err: [B, rows] receives each column's rounding error w - scale * k.
        k: [B, rows] receives code - zero per column (integers): the rounded value is scale * k,
            exact in float32 (fp16 scale times a small integer), so err is exact too.
    """
    n = wb.shape[0]
    for i in range(n):
        w = wb[i]
        torch.round(torch.div(w, scale[i]), out=k[i])
        k[i].clamp_(lo[i], hi[i])
        torch.addcmul(w, k[i], scale[i], value=-1.0, out=err[i])
        if i + 1 < n:
            wb[i + 1:].addr_(un[i, i + 1:], err[i], alpha=-1.0)


@dataclass
class _GroupParams:
    """Scale / zero per group and the group of each column, in processing order."""

    scheme: LayerScheme
    static: Optional[QParams]  # natural-order params (static_groups)
    static_cols: Optional[torch.Tensor]  # group of each processing position (static_groups)
    scales: list[torch.Tensor] = field(default_factory=list)  # per processing-order group, [rows]
    zeros: list[torch.Tensor] = field(default_factory=list)

    def for_batch(self, wt: torch.Tensor, i1: int, i2: int, gs: int) -> tuple[torch.Tensor, ...]:
        """[B, rows] scale, lo, hi for columns [i1, i2) (a new group's params are computed here)."""
        maxq = 2 ** self.scheme.bits - 1
        if self.static is not None:
            idx = self.static_cols[i1:i2]
            s, z = self.static.scale[:, idx].t(), self.static.zero[:, idx].t()
            return s, -z, maxq - z
        if i1 % gs == 0:  # a group starts: its params from the current (error-updated) weights
            qp = compute_qparams(wt[i1:i1 + gs].t(), self.scheme.bits, -1, self.scheme.sym)
            self.scales.append(qp.scale[:, 0])
            self.zeros.append(qp.zero[:, 0])
        shape = (i2 - i1, wt.shape[1])
        s, z = self.scales[-1], self.zeros[-1]
        return s.expand(shape), (-z).expand(shape), (maxq - z).expand(shape)

    def tables(self, cols: int, gs: int) -> tuple[QParams, torch.Tensor]:
        """(scale/zero [rows, groups] as exported, group of each processing position)."""
        if self.static is not None:
            return self.static, self.static_cols
        qp = QParams(torch.stack(self.scales, 1), torch.stack(self.zeros, 1))
        return qp, torch.arange(cols, device=qp.scale.device) // gs


def _solve(w: torch.Tensor, upper: torch.Tensor, perm: Optional[torch.Tensor], scheme: LayerScheme,
           opts: GPTQConfig) -> Optional[QuantizedLayer]:
    """The lazy-batch GPTQ sweep over W (dead columns zeroed) given U; None if it went non-finite."""
    rows, cols = w.shape
    gs = cols if scheme.group_size == -1 else scheme.group_size
    wt = (w if perm is None else w[:, perm]).t().contiguous()  # [cols, rows], processing order
    un = upper / upper.diagonal().unsqueeze(1)
    static = static_cols = None
    if opts.static_groups:
        static = compute_qparams(w, scheme.bits, scheme.group_size, scheme.sym)
        static_cols = group_index(cols, scheme.group_size, w.device).long()
        static_cols = static_cols if perm is None else static_cols[perm]
    params = _GroupParams(scheme, static, static_cols)
    width = min(opts.block_columns, cols)
    err, k = (torch.empty(width, rows, dtype=torch.float32, device=w.device) for _ in range(2))
    for i1, i2 in batch_bounds(cols, scheme.group_size, opts.block_columns, opts.static_groups):
        s, lo, hi = params.for_batch(wt, i1, i2, gs)
        n = i2 - i1
        quantize_columns(wt[i1:i2], un[i1:i2, i1:i2], s, lo, hi, err[:n], k[:n])
        if i2 < cols:
            wt[i2:].addmm_(un[i1:i2, i2:].t(), err[:n], alpha=-1.0)
        wt[i1:i2].copy_(k[:n])  # from here on wt holds code - zero for the finished columns
    if not bool(torch.isfinite(wt).all()):
        return None
    return _export(wt, params, perm, scheme)


def _export(kt: torch.Tensor, params: _GroupParams, perm: Optional[torch.Tensor],
            scheme: LayerScheme) -> QuantizedLayer:
    """The layer from code - zero per column ([cols, rows], processing order) in natural column order."""
    cols = kt.shape[0]
    gs = cols if scheme.group_size == -1 else scheme.group_size
    qp, groups = params.tables(cols, gs)
    codes = (kt.t() + qp.zero[:, groups]).to(torch.uint8)
    if perm is None:
        return QuantizedLayer(codes, qp.scale, qp.zero, scheme)
    inv = torch.argsort(perm)
    g_idx = None
    if params.static is None:
        natural = group_index(cols, scheme.group_size, kt.device)
        g_idx = None if torch.equal(natural[inv], natural) else natural[inv]
    return QuantizedLayer(codes[:, inv].contiguous(), qp.scale, qp.zero, scheme, g_idx)


def _row_errors(w0: torch.Tensor, hats: list[torch.Tensor], h: torch.Tensor, perm: Optional[torch.Tensor],
                excluded: torch.Tensor) -> list[torch.Tensor]:
    """Mean squared output error per row, ΔW H ΔWᵀ / 2 (H = 2/N XᵀX), for each candidate W_hat."""
    d = torch.cat([w0 - hat for hat in hats])
    d[:, excluded] = 0.0  # dead inputs contribute nothing; non-finite ones are unknowable
    if perm is not None:
        d = d[:, perm]
    err = ((d @ h) * d).sum(dim=1) / 2
    return list(err.split(w0.shape[0]))


def gptq_quantize(weight: torch.Tensor, h: torch.Tensor, scheme: LayerScheme, opts: GPTQConfig) -> GPTQOutcome:
    """GPTQ for one weight [rows, cols] given its inputs' Hessian h = 2/N·XᵀX [cols, cols].

    Args:
        weight: any float dtype (computed in float32).
        h: float32; consumed (modified in place).
        scheme: bits, group size (dividing cols, or -1), sym.
        opts: dampening, act_order, static_groups, lazy batch width.
    Returns:
        GPTQOutcome; its layer dequantizes (qdq.dequantize) exactly to the values GPTQ chose.
    """
    w0 = weight.detach().float()
    h, dead, nonfinite = clean_hessian(h)
    w = w0.clone()
    w[:, dead] = 0.0
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if opts.act_order else None
    if perm is not None:
        h = h.index_select(0, perm).index_select(1, perm)
    upper, damp, retries = inverse_factor(h, opts.damp_percent)
    rtn = rtn_layer(w0, scheme)
    layer, fallback = rtn, True
    if upper is not None:
        solved = _solve(w, upper, perm, scheme, opts)
        del upper
        layer, fallback = (rtn, True) if solved is None else (solved, False)
    err, err_rtn = _row_errors(w0, [layer.dequantize(), rtn.dequantize()], h, perm, dead | nonfinite)
    return GPTQOutcome(layer, err, err_rtn, damp, retries, int(dead.sum()), int(nonfinite.sum()), fallback)


# ----------------------------------------------------------------------------- one block


class _StopBlock(Exception):
    """Raised by a hook once every Linear of the current stage has seen its input."""


@dataclass
class Family:
    """Linears that read the same input tensor (one Hessian), in call order."""

    names: list[str]


def _autocast(device: torch.device, amp: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)


def probe_families(block: nn.Module, names: list[str], inputs: BlockInputs, device: torch.device,
                   amp: Optional[torch.dtype]) -> tuple[list[Family], set[str]]:
    """Run one sample through the block to find the Linears' call order and shared inputs.

    Returns:
        (families in call order, then one per Linear that was not called; names called more than once).
    """
    calls: list[tuple[str, torch.Tensor]] = []

    def recorder(name: str):
        return lambda module, args: calls.append((name, args[0]))

    handles = [block.get_submodule(n).register_forward_pre_hook(recorder(n)) for n in names]
    try:
        with torch.no_grad(), _autocast(device, amp):
            run_block(block, inputs.hidden[:1].to(device), inputs.kwargs)
    finally:
        for hd in handles:
            hd.remove()
    families: list[tuple[torch.Tensor, Family]] = []
    seen: dict[str, int] = defaultdict(int)
    for name, x in calls:
        seen[name] += 1
        if seen[name] > 1:
            continue
        fam = next((f for t, f in families if t is x), None)
        if fam is None:
            families.append((x, Family([name])))
        else:
            fam.names.append(name)
    out = [f for _, f in families] + [Family([n]) for n in names if n not in seen]
    return out, {n for n, c in seen.items() if c > 1}


class _Collector:
    """Forward pre-hooks adding each family's inputs to its Hessian (once per distinct tensor)."""

    def __init__(self, stage: list[Family], stop_early: bool):
        self.leader = {n: fam.names[0] for fam in stage for n in fam.names}
        self.hessians: dict[str, Hessian] = {}
        self.stop_early = stop_early
        self.added: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.pending: set[str] = set()

    def start_batch(self) -> None:
        self.added.clear()
        self.pending = set(self.leader)

    def hook(self, name: str) -> Callable[..., None]:
        def on_input(module: nn.Module, args: tuple) -> None:
            x, key = args[0], self.leader[name]
            if not any(t is x for t in self.added[key]):
                if key not in self.hessians:
                    self.hessians[key] = Hessian(x.shape[-1], x.device)
                self.hessians[key].add(x)
                self.added[key].append(x)
            self.pending.discard(name)
            if self.stop_early and not self.pending:
                raise _StopBlock

        return on_input


def collect_hessians(block: nn.Module, stage: list[Family], inputs: BlockInputs, device: torch.device,
                     batch_size: int, amp: Optional[torch.dtype], stop_early: bool) -> dict[str, Hessian]:
    """Run the block over every sample and accumulate the Hessian of each family (keyed by its first name)."""
    collector = _Collector(stage, stop_early)
    handles = [block.get_submodule(n).register_forward_pre_hook(collector.hook(n)) for n in collector.leader]
    try:
        with torch.no_grad(), _autocast(device, amp):
            for sl in batches(inputs.hidden.shape[0], batch_size):
                collector.start_batch()
                try:
                    run_block(block, inputs.hidden[sl].to(device, non_blocking=True), inputs.kwargs)
                except _StopBlock:
                    pass
    finally:
        for hd in handles:
            hd.remove()
    return collector.hessians


def share_hessians(hessians: dict[str, Hessian], keys: list[str], comm: Comm) -> None:
    """Sum each family's XᵀX and token count over the ranks (each rank saw its own samples)."""
    if comm.world_size == 1:
        return
    for key in keys:  # the same order on every rank: the families' call order
        h = hessians.get(key)
        if h is None:  # a Linear the block never calls: the same on every rank
            continue
        tokens = torch.tensor([float(h.tokens)], dtype=torch.float64, device=h.sum.device)
        comm.sum_([h.sum, tokens])
        h.tokens = int(tokens.item())


def layer_tensors_of(layer: QuantizedLayer) -> list[torch.Tensor]:
    """The tensors that define a quantized layer (for a broadcast from rank 0)."""
    return [t for t in (layer.codes, layer.scale, layer.zero, layer.g_idx) if t is not None]


@dataclass
class _BlockStats:
    mse_gptq: float = 0.0
    mse_rtn: float = 0.0
    retries: int = 0
    dead: int = 0
    nonfinite: int = 0
    fallbacks: int = 0
    hessian_seconds: float = 0.0
    solve_seconds: float = 0.0
    layer_mse: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {"layer_mse_gptq": self.mse_gptq, "layer_mse_rtn": self.mse_rtn, "damp_retries": float(self.retries),
                "dead_columns": float(self.dead), "nonfinite_columns": float(self.nonfinite),
                "rtn_fallbacks": float(self.fallbacks), "hessian_seconds": self.hessian_seconds,
                "solve_seconds": self.solve_seconds}


def _split_rows(outcome: GPTQOutcome, names: list[str], sizes: list[int]
                ) -> dict[str, tuple[QuantizedLayer, float, float]]:
    """Per member of a stacked weight: (its QuantizedLayer, its GPTQ output MSE, its RTN output MSE)."""
    out, r0, lay = {}, 0, outcome.layer
    for name, rows in zip(names, sizes):
        sl = slice(r0, r0 + rows)
        g_idx = None if lay.g_idx is None else lay.g_idx.clone()  # own storage: safetensors refuses shared tensors
        layer = QuantizedLayer(lay.codes[sl].clone(), lay.scale[sl].clone(), lay.zero[sl].clone(), lay.scheme, g_idx)
        out[name] = (layer, float(outcome.row_err[sl].mean()), float(outcome.row_err_rtn[sl].mean()))
        r0 += rows
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GPTQQuantizer:
    """BlockQuantizer for GPTQ (registered as quant.method=gptq)."""

    uses_calibration = True
    needs_fp_targets = False

    def __init__(self, cfg: GPTQConfig, progress: bool = False, comm: Comm = LOCAL):
        self.cfg, self.progress, self.comm = cfg, progress, comm
        self.options = cfg

    def quantize_block(self, block: nn.Module, schemes: dict[str, LayerScheme], inputs: Optional[BlockInputs],
                       fp_targets: Optional[torch.Tensor], device: torch.device,
                       on_step: Optional[Callable[[int, float], None]] = None) -> BlockResult:
        """Quantize the block's Linears family by family (see the module docstring)."""
        if inputs is None:
            raise InputError("quant.method=gptq needs the calibration inputs of every block")
        device = torch.device(device)
        amp = torch.bfloat16 if self.cfg.amp and device.type == "cuda" else None
        families, repeated = probe_families(block, list(schemes), inputs, device, amp)
        stages = [[f] for f in families] if self.cfg.true_sequential else [families]
        stats, layers = _BlockStats(), {}
        for stage in tqdm(stages, desc="gptq block", leave=False, disable=not self.progress):
            t0 = time.perf_counter()
            stop_early = not any(n in repeated for f in stage for n in f.names)
            hessians = collect_hessians(block, stage, inputs, device, self.cfg.batch_size, amp, stop_early)
            share_hessians(hessians, [f.names[0] for f in stage], self.comm)
            _sync(device)
            t1 = time.perf_counter()
            for fam in stage:
                layers.update(self._quantize_family(block, fam, schemes, hessians.pop(fam.names[0], None), stats))
            _sync(device)
            stats.hessian_seconds += t1 - t0
            stats.solve_seconds += time.perf_counter() - t1
        if on_step is not None:
            for i, mse in enumerate(stats.layer_mse):
                on_step(i, mse)
        return BlockResult(layers=layers, metrics=stats.metrics())

    def _quantize_family(self, block: nn.Module, fam: Family, schemes: dict[str, LayerScheme],
                         hessian: Optional[Hessian], stats: _BlockStats) -> dict[str, QuantizedLayer]:
        """GPTQ on the family's stacked weights (one stack per scheme); writes the dequantized weights back."""
        by_scheme: dict[LayerScheme, list[str]] = defaultdict(list)
        for name in fam.names:
            by_scheme[schemes[name]].append(name)
        out: dict[str, QuantizedLayer] = {}
        for k, (scheme, names) in enumerate(by_scheme.items()):
            weights = [block.get_submodule(n).weight for n in names]
            if hessian is None or hessian.tokens == 0:
                log.warning("gptq: %s received no calibration tokens; quantized by RTN", ", ".join(names))
                stats.fallbacks += len(names)
                out.update({n: rtn_layer(w, scheme) for n, w in zip(names, weights)})
                continue
            h = hessian.matrix(consume=k == len(by_scheme) - 1)
            outcome = gptq_quantize(torch.cat([w.detach() for w in weights]), h, scheme, self.options)
            self._record(outcome, names, stats)
            for name, (layer, mse, mse_rtn) in _split_rows(outcome, names, [w.shape[0] for w in weights]).items():
                out[name] = layer
                stats.mse_gptq += mse
                stats.mse_rtn += mse_rtn
                stats.layer_mse.append(mse)
        self.comm.broadcast_([t for layer in out.values() for t in layer_tensors_of(layer)])
        with torch.no_grad():
            for name, layer in out.items():
                w = block.get_submodule(name).weight
                w.data.copy_(layer.dequantize(w.dtype))
        return out

    @staticmethod
    def _record(outcome: GPTQOutcome, names: list[str], stats: _BlockStats) -> None:
        shown = ", ".join(names)
        if outcome.retries:
            log.warning("gptq: %s: Cholesky failed %d time(s); used damp_percent=%g", shown, outcome.retries,
                        outcome.damp_percent)
        if outcome.fallback:
            log.warning("gptq: %s: no finite GPTQ solution (Cholesky still failing at damp_percent=%g, or "
                        "non-finite values); quantized by RTN", shown, outcome.damp_percent)
            stats.fallbacks += len(names)
        if outcome.dead or outcome.nonfinite:
            log.warning("gptq: %s: %d dead input column(s) (weights zeroed), %d with non-finite activations "
                        "(quantized without error feedback)", shown, outcome.dead, outcome.nonfinite)
        stats.retries += outcome.retries
        stats.dead += outcome.dead
        stats.nonfinite += outcome.nonfinite

