"""Choose kernels for every Linear by measuring them (CUDA) and build `KernelLinear`s.

Layers with the same signature (format, bits, group size, shape, zeros, g_idx) share one
decision. For each row count M the benchmark will use (see "Row counts" below), every candidate
kernel is checked against the reference dequantization on one layer, then timed as CUDA-graph
replays over several layers of the group (so the weights do not sit in L2). Policies
(`bench.linear_kernel`):

* auto            one weight format per group (no duplicate copies): the format with the lowest
                  weighted mean of log(time / fastest time) over the planned row counts
                  (every row weighs 1, M = 1 weighs `batch1_weight`: bench.kernel_batch1_weight);
                  then, inside that format, the fastest kernel/tile per M (batch-aware).
                  Candidates: the Triton kernel, tinygemm (4-bit; 2/3-bit widened), int8pack
                  (8-bit per-channel sym), gemlite (2/4/8-bit, 3-bit widened; when installed),
                  and from SCRATCH_MIN_ROWS rows up the scratch route of each format (dequantize
                  into one shared buffer, then cuBLAS; `stages.kernels.scratch`). A group no
                  kernel takes runs the reference dequantization, with the reason logged.
                  CPU: dequant_once.
* triton          the Triton kernel, tile tuned per M.
* tinygemm        PyTorch's int4 kernel.
* int8pack        PyTorch's int8 kernel.
* gemlite         gemlite's kernels, the fastest of them per M.
* tinygemm_triton both formats kept (about twice the memory of one): per M the faster of
                  tinygemm and Triton.
* dequant         reference dequantization + F.linear on every call (correctness path).

A forced policy whose kernel cannot take a quantized group (see `stages.kernels.catalog`), or
whose kernel fails the correctness check on this device, stops with one error naming the
kernels that can take it. Every policy but dequant also times its format's scratch route at
prefill sizes (it reads the same weight copy) and uses it where it is faster.

Row counts: the decode batch sizes, plus the prefill row counts (batch x prompt length) for
every group except the Linears that only ever see the last token (lm_head, `last_token_only`).
Quick tuning (`bench.kernel_tuning=quick`) times fewer Triton tiles, gemlite's own kernel choice
only, and no low-bit kernel at a row count where the scratch route runs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch

from stages.kernels import catalog, gemlite_linear, scratch
from stages.kernels.linear import (DenseWeight, KernelLinear, ModuleWeight, Route, Source, dequantize_weight,
                                   kernel_fn, to_int4, to_int8)
from stages.kernels.scratch import SCRATCH_MIN_ROWS, ScratchConfig, ScratchPool
from stages.kernels.tiles import TileConfig, TritonWeight, values_per_block

POLICIES = ("auto", "triton", "tinygemm", "int8pack", "gemlite", "tinygemm_triton", "dequant")
CUDA_ONLY_POLICIES = ("triton", "tinygemm", "int8pack", "gemlite", "tinygemm_triton")
ROTATE_BYTES = 160 * 2**20  # weights timed per round, > 2x the L2 of an H100/H200
MAX_REL_ERR = 2e-2  # a kernel farther than this from the reference output is rejected (bf16 ~ 4e-3)


@dataclass
class GroupPlan:
    """What was decided for one group of same-signature layers (for the benchmark record)."""

    signature: str
    layers: list[str]
    routes: list[str]
    formats: list[str]
    weight_bytes_per_layer: int = 0
    ms: dict[str, dict[int, float]] = field(default_factory=dict)  # candidate label -> M -> ms per call
    bf16_ms: dict[int, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    note: str = ""


def signature(src: Source) -> tuple:
    if isinstance(src, DenseWeight):
        return ("dense", src.out_features, src.in_features, str(src.weight.dtype))
    if isinstance(src, ModuleWeight):
        return ("module", type(src.modules[0]).__name__, src.out_features, src.in_features)
    return ("gptq", src.bits, src.group_size, src.out_features, src.in_features, src.zeros is not None,
            src.g_idx is not None)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def _split(m: int, n: int, block_m: int, block_n: int, tiles: int, sms: int, per_sm: int) -> int:
    """Split-K factor giving about `per_sm` programs per SM (more loads in flight for small M)."""
    programs = math.ceil(n / block_n) * math.ceil(m / block_m)
    return max(1, min(16, tiles, _pow2_floor(per_sm * sms / programs)))


def _with_splits(cfg: TileConfig, split: int, quick: bool) -> list[TileConfig]:
    alt = [] if quick or split < 4 else [replace(cfg, split_k=split // 4)]
    return [replace(cfg, split_k=split)] + alt


def candidate_configs(m: int, w: TritonWeight, sms: int, quick: bool = False) -> list[TileConfig]:
    """Tiles worth timing for M rows of `w`.

    M = 1: GEMV tiles (2-D accumulator, 36-40 registers per thread at these sizes on sm_90);
    M = 2..4: one small 3-D GEMV tile and tensor-core tiles; M > 4: tensor-core tiles
    (BLOCK_M >= 16). Split-K (a run-time argument: no extra compilation) gives about 16
    programs per SM for GEMV and 4 for tensor-core tiles, plus a 4x smaller split to compare.
    """
    vpb, n = values_per_block(w.bits), w.out_features
    blocks = w.in_features // vpb
    rows0 = max(1, 128 // vpb)  # 128 input values per step
    gemv: list[tuple[int, int, int, int]] = []  # block_m, block_n, rows, warps
    if m == 1:
        gemv = [(1, 64, rows0, 4), (1, 128, rows0, 8)] if quick else \
            [(1, 64, rows0, 4), (1, 128, rows0, 8), (1, 32, rows0, 4), (1, 64, 2 * rows0, 8)]
    elif m <= 4:
        gemv = [(4 if m > 2 else 2, 32, rows0, 8)]
    out: list[TileConfig] = []
    for bm, bn, rows, warps in gemv:
        split = _split(m, n, bm, bn, math.ceil(blocks / rows), sms, 16)
        out += _with_splits(TileConfig(bm, bn, rows, split, False, warps), split, quick)
    if m <= 16:
        shapes = [(16, 64, 16)] if quick and m <= 4 else [(16, 64, 16), (16, 128, 16)] + ([] if quick else [(16, 64, 32)])
    elif m <= 64:
        shapes = [(32, 64, 16), (64, 128, 16)]
    else:
        shapes = [(64, 128, 16), (128, 128, 16)]
    for bm, bn, rows in shapes:
        warps = 8 if bm * bn >= 128 * 128 else 4
        split = _split(m, n, bm, bn, math.ceil(blocks / rows), sms, 4)
        out += _with_splits(TileConfig(bm, bn, rows, split, True, warps), split, quick)
    return list(dict.fromkeys(out))


def time_graph_ms(fns: list[Callable[[], Any]], iters: int = 24, reps: int = 5) -> float:
    """Median GPU time of one call, from CUDA-graph replays of `iters` calls cycling over `fns`."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    del graph
    return statistics.median(times)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


@dataclass
class _Tuner:
    """Times candidates of one group on CUDA (injectable `timer` for tests)."""

    sample: list[TritonWeight]
    dtype: torch.dtype
    timer: Callable[[list[Callable[[], Any]]], float] = time_graph_ms
    _wref: Optional[torch.Tensor] = None  # reference weight of sample[0], computed once

    def inputs(self, m: int) -> torch.Tensor:
        gen = torch.Generator(device=self.sample[0].qweight.device).manual_seed(m)
        return torch.randn(m, self.sample[0].in_features, device=self.sample[0].qweight.device, dtype=self.dtype,
                           generator=gen)

    def measure(self, kind: str, formats: list[Any], config: Optional[Any], m: int) -> tuple[float, str]:
        """(ms per call, '' or the reason the candidate was rejected)."""
        x = self.inputs(m)
        if kind == "scratch":
            scratch.reserve(formats[0], config)
        fns = [kernel_fn(kind, f, config) for f in formats]
        try:
            y = fns[0](x)
        except Exception as exc:  # a kernel that fails to compile or launch is reported, not fatal
            return math.inf, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if self._wref is None:
            self._wref = dequantize_weight(self.sample[0], torch.float32)
        err = _rel_err(y, x.float() @ self._wref.t())
        if not math.isfinite(err) or err > MAX_REL_ERR:
            return math.inf, f"relative error {err:.3g} vs the reference dequantization"
        try:
            return self.timer([lambda f=f: f(x) for f in fns]), ""
        except Exception as exc:  # e.g. a kernel that cannot be captured in a CUDA graph
            return math.inf, f"timing failed: {type(exc).__name__}: {str(exc)[:200]}"

    def bf16_ms(self, m: int) -> float:
        w0 = self.sample[0]
        copies = max(1, min(4, math.ceil(ROTATE_BYTES / (w0.in_features * w0.out_features * 2))))
        ws = [torch.randn(w0.out_features, w0.in_features, device=w0.qweight.device, dtype=self.dtype)
              for _ in range(copies)]
        x = self.inputs(m)
        return self.timer([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])


def _best(tuner: _Tuner, kind: str, formats: list[Any], rows: list[int], configs: Callable[[int], list],
          plan: GroupPlan) -> dict[int, tuple[float, Route]]:
    """Per M, the fastest correct config of one kernel (an M where none passes is left out)."""
    best: dict[int, tuple[float, Route]] = {}
    for m in rows:
        for cfg in configs(m):
            label = kind if cfg is None else f"{kind}:{cfg.label()}"
            ms, why = tuner.measure(kind, formats, cfg, m)
            plan.ms.setdefault(label, {})[m] = ms
            if why:
                plan.rejected[label] = why
            elif m not in best or ms < best[m][0]:
                best[m] = (ms, Route(m, kind, cfg))
    return best


def routes_from(best: dict[int, tuple[float, Route]]) -> list[Route]:
    """Per-M winners -> routes: M up to each tuned row count takes that count's winner."""
    rows = sorted(best)
    return [Route(m, best[m][1].kind, best[m][1].config) for m in rows]


def pick_single_format(per_format: dict[str, dict[int, tuple[float, Route]]], batch1_weight: float = 1.0) -> str:
    """The format with the lowest weighted mean of log(time / fastest) over the rows (M = 1 weighs
    `batch1_weight`, every other row 1; ties: first)."""
    rows = set.intersection(*(set(v) for v in per_format.values() if v)) if any(per_format.values()) else set()
    usable = {f: v for f, v in per_format.items() if v and rows <= set(v)}
    if not usable:
        raise RuntimeError("no kernel passed the correctness check for this layer group")
    fastest = {m: min(v[m][0] for v in usable.values()) for m in rows}
    weight = {m: batch1_weight if m == 1 else 1.0 for m in rows}

    def score(f: str) -> float:
        return sum(weight[m] * math.log(usable[f][m][0] / fastest[m]) for m in rows)

    return min(usable, key=score)


def _label(sig: tuple) -> str:
    if sig[0] == "dense":
        return f"dense {sig[1]}x{sig[2]} {sig[3].replace('torch.', '')}"
    if sig[0] == "module":
        return f"{sig[1]} {sig[2]}x{sig[3]}"
    _, bits, gs, n, k, zeros, gidx = sig
    return f"w{bits}g{gs} {n}x{k}" + (" asym" if zeros else " sym") + (" act-order" if gidx else "")


class KernelRejected(RuntimeError):
    """A forced policy's kernel failed the correctness check (or to run) on every row count."""


CONVERTERS: dict[str, Callable[[TritonWeight, torch.dtype], Any]] = {
    "gptq": lambda w, dtype: w, "tinygemm": to_int4, "int8pack": to_int8,
    "gemlite": gemlite_linear.from_triton_weight,
}
KIND_OF = {"gptq": "triton", "tinygemm": "tinygemm", "int8pack": "int8pack", "gemlite": "gemlite"}


def _configs_for(fmt: str, w0: TritonWeight, sms: int, quick: bool) -> Callable[[int], list]:
    if fmt == "gptq":
        return lambda m: candidate_configs(m, w0, sms, quick)
    if fmt == "gemlite":
        return lambda m: gemlite_linear.candidate_configs(m)[:1 if quick else None]
    return lambda m: [None]


def _scratch_configs(fmt: str, w0: TritonWeight, pool: Optional[ScratchPool]) -> Callable[[int], list]:
    """Slice widths of the scratch route from SCRATCH_MIN_ROWS rows up (none when it cannot run here)."""
    if pool is None or (fmt != "int8pack" and catalog.triton_reason(str(w0.qweight.device))):
        return lambda m: []
    chunks = scratch.chunk_candidates(w0.in_features, w0.out_features)
    return lambda m: [ScratchConfig(fmt, c, pool) for c in chunks] if m >= SCRATCH_MIN_ROWS else []


def _merge(a: dict[int, tuple[float, Route]], b: dict[int, tuple[float, Route]]) -> dict[int, tuple[float, Route]]:
    """Per M, the faster of two per-M winners."""
    return {m: min((v for v in (a.get(m), b.get(m)) if v), key=lambda t: t[0]) for m in set(a) | set(b)}


def _measure_group(srcs: list[TritonWeight], fmts: list[str], dtype: torch.dtype, rows: list[int], quick: bool,
                   timer: Callable, measure_bf16: bool, plan: GroupPlan,
                   pool: Optional[ScratchPool] = None) -> dict[str, dict[int, tuple[float, Route]]]:
    """Per format in `fmts`: per M, the fastest kernel config that passes the correctness check."""
    per_layer = srcs[0].nbytes()
    sample = srcs[: max(1, min(len(srcs), math.ceil(ROTATE_BYTES / max(per_layer, 1))))]
    tuner = _Tuner(sample, dtype, timer)
    sms = torch.cuda.get_device_properties(sample[0].qweight.device).multi_processor_count
    per_format: dict[str, dict[int, tuple[float, Route]]] = {}
    probe = None if pool is None else ScratchPool(dtype)  # freed after timing: the model's pool holds only the chosen slices
    for fmt in fmts:
        try:
            converted = [CONVERTERS[fmt](s, dtype) for s in sample]
        except Exception as exc:  # a library that fails to convert here is reported, not fatal
            plan.rejected[KIND_OF[fmt]] = f"conversion failed: {type(exc).__name__}: {str(exc)[:200]}"
            per_format[fmt] = {}
            continue
        dense = _best(tuner, "scratch", converted, rows, _scratch_configs(fmt, sample[0], probe), plan)
        # quick: where the scratch route runs, the low-bit kernels (2-3x slower than cuBLAS at prefill sizes) are not timed
        low_rows = [m for m in rows if not (quick and m in dense)]
        per_format[fmt] = _merge(
            _best(tuner, KIND_OF[fmt], converted, low_rows, _configs_for(fmt, sample[0], sms, quick), plan), dense)
        del converted
    if measure_bf16:
        plan.bf16_ms = {m: tuner.bf16_ms(m) for m in rows}
    return per_format


def decide(policy: str, per_format: dict[str, dict[int, tuple[float, Route]]],
           batch1_weight: float = 1.0) -> tuple[list[str], list[Route]]:
    """(formats to keep, routes) from per-format, per-M measurements (see module doc)."""
    if policy == "tinygemm_triton":
        if not all(per_format.get(f) for f in ("tinygemm", "gptq")):
            raise KernelRejected("tinygemm or the Triton kernel failed the correctness check at every row count")
        rows = sorted(set().union(*(v.keys() for v in per_format.values())))
        best = {m: min((v[m] for v in per_format.values() if m in v), key=lambda t: t[0]) for m in rows}
        routes = routes_from(best)
        return sorted({r.format() for r in routes}), routes
    if policy in catalog.POLICY_FORMATS:
        fmt = catalog.POLICY_FORMATS[policy][0]
        if not per_format.get(fmt):
            raise KernelRejected(f"{KIND_OF[fmt]} failed the correctness check (or to run) at every row count")
        return [fmt], routes_from(per_format[fmt])
    fmt = pick_single_format(per_format, batch1_weight)
    return [fmt], routes_from(per_format[fmt])


def _convert(src: Source, fmt: str, dtype: torch.dtype) -> Any:
    if fmt == "dense" and isinstance(src, TritonWeight):  # dequant_once: the checkpoint's weights, dequantized
        return DenseWeight(dequantize_weight(src, dtype))
    if fmt in ("dense", "module"):
        return src
    return CONVERTERS[fmt](src, dtype)


def _formats_to_measure(policy: str, srcs: list[TritonWeight], dtype: torch.dtype, plan: GroupPlan) -> list[str]:
    """The formats a policy measures for this group; a forced policy whose kernel cannot take it is an error."""
    reasons = catalog.format_reasons(srcs[0], dtype, str(srcs[0].qweight.device))
    if policy in catalog.POLICY_FORMATS:
        if any(reasons[f] for f in catalog.POLICY_FORMATS[policy]):
            raise catalog.policy_error(policy, plan.signature, reasons)
        return list(catalog.POLICY_FORMATS[policy])
    skipped = {catalog.FORMAT_KERNEL[f]: r for f, r in reasons.items() if r}
    plan.rejected.update({k: f"not applicable: {r}" for k, r in skipped.items()})
    return [f for f, r in reasons.items() if r is None]


def plan_group(srcs: list[Source], names: list[str], policy: str, dtype: torch.dtype, rows: list[int], quick: bool,
               timer: Callable, measure_bf16: bool, batch1_weight: float = 1.0,
               pool: Optional[ScratchPool] = None) -> tuple[list[str], list[Route], GroupPlan]:
    """Decide formats and routes for one group of same-signature layers."""
    sig = signature(srcs[0])
    plan = GroupPlan(_label(sig), names, [], [], srcs[0].nbytes())
    top = max(rows)
    if sig[0] in ("dense", "module"):  # unquantized, or a library's Linear that brings its own kernels
        formats, routes = [sig[0]], [Route(top, sig[0])]
    elif policy == "dequant":
        formats, routes = ["gptq"], [Route(top, "dequant")]
    elif not srcs[0].qweight.is_cuda:  # no low-bit kernels off CUDA: dequantize once (correctness path)
        formats, routes = ["dense"], [Route(top, "dequant_once")]
    else:
        fmts = _formats_to_measure(policy, srcs, dtype, plan)
        per_format = _measure_group(srcs, fmts, dtype, rows, quick, timer, measure_bf16, plan, pool)
        try:
            formats, routes = decide(policy, per_format, batch1_weight)
            routes = [replace(r, config=replace(r.config, pool=pool)) if r.kind == "scratch" else r for r in routes]
        except KernelRejected as exc:  # the forced kernel exists but does not work here
            why = "; ".join(f"{k}: {v}" for k, v in plan.rejected.items())[:600]
            raise catalog.policy_error(policy, plan.signature, catalog.format_reasons(
                srcs[0], dtype, str(srcs[0].qweight.device)), detail=f"{exc} ({why})") from exc
        except RuntimeError as exc:  # auto: no kernel passed -> the reference path, with the reason logged
            formats, routes = ["gptq"], [Route(top, "dequant")]
            plan.note = (plan.note + "; " if plan.note else "") + f"{exc}: dequant fallback"
    plan.formats, plan.routes = formats, [r.label() for r in routes]
    return formats, routes, plan


def group_rows(names: list[str], rows: Sequence[int], prefill_rows: Sequence[int], last_token_only: Sequence[str]) -> list[int]:
    """The row counts to plan one group for: decode rows, plus prefill rows unless every Linear sees only the last token."""
    extra = () if all(n in last_token_only for n in names) else prefill_rows
    return sorted(set(rows) | set(extra))


def build_kernel_linears(sources: dict[str, tuple[Source, Optional[torch.Tensor]]], policy: str,
                         dtype: torch.dtype, rows: list[int], quick: bool = False,
                         timer: Callable = time_graph_ms, measure_bf16: bool = False,
                         log: Callable[[str], None] = lambda m: None, prefill_rows: Sequence[int] = (),
                         last_token_only: Sequence[str] = ("lm_head",),
                         batch1_weight: float = 1.0) -> tuple[dict[str, KernelLinear], list[GroupPlan]]:
    """Turn every source weight into a `KernelLinear`, group by group (consumes `sources`).

    Args:
        sources: layer name -> (DenseWeight or TritonWeight on the target device, bias or None).
        policy: one of POLICIES; rows: the decode row counts (batch sizes) to tune for.
        quick: fewer Triton tiles per M; measure_bf16: also time a bf16 matmul of each shape.
        prefill_rows: prefill row counts (batch x prompt length), tuned for every group except
            those made only of `last_token_only` Linears (the engine runs lm_head on the last token).
        batch1_weight: weight of M = 1 in auto's choice of one format per group (others weigh 1).
    Returns:
        (name -> KernelLinear, one GroupPlan per group); the scratch routes share one buffer.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown kernel policy {policy!r} (choose from {', '.join(POLICIES)})")
    groups: dict[tuple, list[str]] = {}
    for name, (src, _) in sources.items():
        groups.setdefault(signature(src), []).append(name)
    modules, plans, pool = {}, [], ScratchPool(dtype)
    for sig, names in groups.items():
        formats, routes, plan = plan_group([sources[n][0] for n in names], names, policy, dtype,
                                           group_rows(names, rows, prefill_rows, last_token_only), quick, timer,
                                           measure_bf16, batch1_weight, pool)
        log(f"[kernels] {plan.signature} x{len(names)}: {', '.join(plan.routes)}" + (f" ({plan.note})" if plan.note else ""))
        for name in names:
            src, bias = sources.pop(name)
            modules[name] = KernelLinear({f: _convert(src, f, dtype) for f in formats}, routes, bias)
        plans.append(plan)
    if pool.nbytes():
        log(f"[kernels] scratch buffer for the large-M route: {pool.nbytes() / 2**20:.0f} MiB")
    return modules, plans
