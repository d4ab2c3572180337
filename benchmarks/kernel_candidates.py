"""Per-shape timing of every low-bit kernel candidate (the kernel part of benchmarks/bench_kernels.py).

For each scheme, layer shape and row count M: random codes/scales/zeros in the checkpoint's
own GPTQ layout (`stages.formats.gptq.pack_layer_tensors`), converted by the project's
adapters into each candidate's format, checked against the reference dequantization
(relative error of ``x @ W^T`` against a float32 product with `dequantize_weight`), then
timed: median of CUDA-graph replays of 24 calls cycling over enough copies of the layer to
exceed the L2 cache (the planner's `time_graph_ms`: launch overhead excluded, as in the
decode engine). Decode row counts (1/16/64) time every low-bit kernel; prefill row counts
(2048) time bf16 and the scratch route (dequantize into one buffer, then cuBLAS), the only
candidates that can reach bf16 there, and skip lm_head (the engine runs it on the last token).
On the CPU (``--small``) a wall-clock loop stands in: it exercises the code paths only.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from stages.kernels import catalog, gemlite_linear, scratch
from stages.kernels.linear import DenseWeight, dequantize_weight, kernel_fn, to_int4, to_int8
from stages.kernels.planner import ROTATE_BYTES, candidate_configs, time_graph_ms
from stages.kernels.scratch import SCRATCH_MIN_ROWS, ScratchConfig, ScratchPool
from stages.kernels.tiles import TritonWeight, from_gptq

SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
             "lm_head": (128256, 4096)}
SHAPES_SMALL = {"qkv": (96, 128), "down": (64, 256)}
SCHEMES = {"w4g128_sym": (4, 128, True), "w4g128_asym": (4, 128, False), "w3g64_asym": (3, 64, False),
           "w2g64_asym": (2, 64, False), "w8_sym": (8, -1, True)}
SCHEMES_SMALL = {"w4g32_sym": (4, 32, True), "w2g32_asym": (2, 32, False), "w8_sym": (8, -1, True)}
LAST_TOKEN_SHAPES = ("lm_head",)  # the engine runs lm_head on the last position only: no prefill rows


@dataclass
class Budget:
    """Seconds left for this part; work past it is recorded as skipped, never silently dropped."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def box(self, share: int) -> "Budget":
        """A sub-budget: an equal share of what is left among `share` remaining units."""
        return Budget(max(0.0, self.left()) / max(1, share))


def random_layer(n: int, k: int, bits: int, gs: int, sym: bool, device: str, seed: int) -> TritonWeight:
    """A random layer in the checkpoint layout pack.format=auto writes (sym: GPTQ v1; asym: zeros as they are)."""
    from stages.formats.gptq import pack_layer_tensors
    from stages.quant.base import LayerScheme, QuantizedLayer

    gen = torch.Generator(device=device).manual_seed(seed)
    groups = 1 if gs == -1 else k // gs
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen, device=device, dtype=torch.uint8)
    scale = (torch.rand(n, groups, generator=gen, device=device) * 0.004 + 0.001).half().float()
    if sym:
        zero = torch.full((n, groups), float(2 ** (bits - 1)), device=device)
    else:
        zero = torch.randint(0, 2 ** bits, (n, groups), generator=gen, device=device).float()
    offset = 1 if sym else 0
    t = pack_layer_tensors("w", QuantizedLayer(codes, scale, zero, LayerScheme(bits, gs, sym)), offset)
    return from_gptq(t["w.qweight"], t["w.qzeros"], t["w.scales"], t["w.g_idx"], bits, gs, offset)


def clone_layer(w: TritonWeight) -> TritonWeight:
    copy = lambda t: None if t is None else t.clone()  # noqa: E731
    return TritonWeight(w.qweight.clone(), w.scales.clone(), copy(w.zeros), copy(w.g_idx), w.bits, w.group_size,
                        w.in_features, w.out_features, w.zero_const)


def time_wall_ms(fns: list[Callable[[], Any]], iters: int = 24, reps: int = 5) -> float:
    """Median wall time of one call launched from Python (the CPU stand-in for graph timing)."""
    for f in fns:
        f()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(iters):
            fns[i % len(fns)]()
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


@dataclass
class Candidate:
    """One kernel candidate: its format converter and the configs to try at M rows."""

    name: str
    kind: str
    convert: Callable[[TritonWeight, torch.dtype], Any]
    configs: Callable[[int], list]


def _decode_only(configs: Callable[[int], list]) -> Callable[[int], list]:
    return lambda m: configs(m) if m < SCRATCH_MIN_ROWS else []


def candidates_for(w: TritonWeight, dtype: torch.dtype, device: str, quick: bool, sms: int) -> tuple[list[Candidate], dict]:
    """Every candidate that can take this layer here, and why the others cannot (see module doc for the rows)."""
    reasons = catalog.format_reasons(w, dtype, device)
    out = [Candidate("bf16", "dense", lambda s, d: DenseWeight(dequantize_weight(s, d)), lambda m: [None])]
    if reasons["gptq"] is None:
        out.append(Candidate("triton", "triton", lambda s, d: s,
                             _decode_only(lambda m: candidate_configs(m, w, sms, quick))))
        pool = ScratchPool(dtype)
        chunks = scratch.chunk_candidates(w.in_features, w.out_features)
        out.append(Candidate("scratch", "scratch", lambda s, d: s, lambda m: [
            ScratchConfig("gptq", c, pool) for c in chunks] if m >= SCRATCH_MIN_ROWS else []))
    if reasons["tinygemm"] is None or (device == "cpu" and w.bits <= 4 and w.group_size in (32, 64, 128, 256)):
        name = "tinygemm" if w.bits == 4 else f"tinygemm_w{w.bits}as4"
        out.append(Candidate(name, "tinygemm", to_int4, _decode_only(lambda m: [None])))
    if reasons["int8pack"] is None:
        out.append(Candidate("int8pack", "int8pack", to_int8, _decode_only(lambda m: [None])))
    if reasons["gemlite"] is None:
        name = "gemlite" if w.bits != 3 else "gemlite_w3as4"
        out.append(Candidate(name, "gemlite", gemlite_linear.from_triton_weight,
                             _decode_only(lambda m: gemlite_linear.candidate_configs(m)[:1 if quick else None])))
    if device == "cpu":
        out.append(Candidate("dequant", "dequant", lambda s, d: s, lambda m: [None]))
    skipped = {catalog.FORMAT_KERNEL[f]: r for f, r in reasons.items() if r}
    return out, skipped


def _nbytes(fmt: Any) -> int:
    return fmt.nbytes()


def measure_candidate(cand: Candidate, copies: list[TritonWeight], dtype: torch.dtype, rows: list[int],
                      ref_w: torch.Tensor, bandwidth: Optional[float], budget: Budget) -> dict:
    """{config label: {M: {us, rel_err, roofline_pct} | {error}}} for one candidate on one layer."""
    cuda = copies[0].qweight.is_cuda
    try:
        fmts = [cand.convert(c, dtype) for c in copies]
    except Exception as exc:  # recorded, the sweep goes on
        return {"error": f"conversion: {type(exc).__name__}: {str(exc)[:300]}"}
    out: dict = {"bytes": _nbytes(fmts[0])}
    k, n = copies[0].in_features, copies[0].out_features
    for m in rows:
        x = torch.randn(m, k, device=copies[0].qweight.device, generator=torch.Generator(
            device=copies[0].qweight.device).manual_seed(m)).to(dtype)
        ref = x.float() @ ref_w.t()
        for cfg in cand.configs(m):
            label = "-" if cfg is None else cfg.label()
            cell = out.setdefault(label, {})
            if budget.left() <= 0:
                cell[str(m)] = {"skipped": "time budget spent"}
                continue
            try:
                if cand.kind == "scratch":
                    scratch.reserve(fmts[0], cfg)
                fns = [kernel_fn(cand.kind, f, cfg) for f in fmts]
                y = fns[0](x)
                err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))
                calls = [lambda f=f: f(x) for f in fns]
                ms = time_graph_ms(calls) if cuda else time_wall_ms(calls)
            except Exception as exc:  # e.g. out of shared memory, capture failure: recorded
                cell[str(m)] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
                continue
            moved = out["bytes"] + (m * k + m * n) * x.element_size()
            cell[str(m)] = {"us": ms * 1e3, "rel_err": err,
                       "roofline_pct": None if not bandwidth else 100.0 * moved / bandwidth / (ms * 1e-3)}
    return out


def copy_bandwidth(device: str) -> Optional[float]:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the roofline's denominator."""
    if not device.startswith("cuda"):
        return None
    a = torch.empty(2**30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = time_graph_ms([lambda: b.copy_(a)], iters=8, reps=5)
    del a, b
    return 2 * 2**30 / (ms * 1e-3)


def sweep(schemes: dict, shapes: dict, rows: list[int], device: str, dtype: torch.dtype, quick: bool,
          budget: Budget, log: Callable[[str], None], bandwidth: Optional[float], prefill_rows: tuple = (),
          on_unit: Callable[[dict], None] = lambda res: None) -> dict:
    """scheme -> shape -> candidate -> config -> M -> numbers (plus what was not applicable and why).

    Each scheme gets an equal share of the budget left (a time box: what does not fit is recorded as
    skipped); `on_unit` sees the results after every shape (the caller saves them).
    """
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device.startswith("cuda") else 1
    out: dict = {}
    for si, (scheme, (bits, gs, sym)) in enumerate(schemes.items()):
        box = budget.box(len(schemes) - si)
        for shape, (n, k) in shapes.items():
            shape_rows = rows + ([] if shape in LAST_TOKEN_SHAPES else [r for r in prefill_rows if r not in rows])
            cell = out.setdefault(scheme, {})[shape] = {"n": n, "k": k, "rows": shape_rows, "candidates": {}}
            if box.left() <= 0:
                cell["skipped"] = "time budget spent"
                continue
            w = random_layer(n, k, bits, gs, sym, device, seed=si * 10 + len(out[scheme]))
            copies = [w] + [clone_layer(w) for _ in range(min(48, math.ceil(ROTATE_BYTES / max(1, w.nbytes()))) - 1)]
            ref_w = dequantize_weight(w, dtype).float()
            cands, cell["not_applicable"] = candidates_for(w, dtype, device, quick, sms)
            for cand in cands:
                n_copies = copies if cand.name != "bf16" else copies[: max(1, math.ceil(ROTATE_BYTES / (2 * n * k)))]
                cell["candidates"][cand.name] = measure_candidate(cand, n_copies, dtype, shape_rows, ref_w, bandwidth,
                                                                  box)
            log(f"{scheme} {shape} {n}x{k}: {len(cands)} candidates ({box.left():.0f} s left for {scheme})")
            del copies, ref_w, w
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            on_unit(out)
    return out


def best_of(cand: dict, m: int) -> Optional[tuple[float, str, float]]:
    """(us, config label, rel_err) of a candidate's fastest correct config at M rows, or None."""
    best = None
    for label, cells in cand.items():
        if not isinstance(cells, dict):
            continue
        c = cells.get(str(m), {})
        if "us" in c and c["rel_err"] < 2e-2 and (best is None or c["us"] < best[0]):
            best = (c["us"], label, c["rel_err"])
    return best
