"""Low-bit kernels: GPTQ unpacking, tinygemm / int8 conversions (exact where stated), the Triton
kernel (CPU interpreter here, CUDA under -m gpu) and the batch-aware planner."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from _kernel_helpers import run_interpreted_cases, make_gptq_layer, pack_bitstream_reference
from _triton_interp_cases import CASES, DTYPES
from stages.kernels import int4, int8
from stages.kernels.gptq_unpack import dequantize_gptq, is_trivial_g_idx, unpack_bitstream, unpack_qweight, unpack_qzeros
from stages.kernels.linear import DenseWeight, KernelLinear, Route, dequantize_weight, fuse_sources
from stages.kernels.planner import (POLICIES, build_kernel_linears, candidate_configs, decide, pick_single_format,
                                    routes_from)
from stages.kernels.tiles import concat_out, from_gptq
from stages.quant.qdq import dequantize

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()


def _bits_of(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16) if x.dtype in (torch.bfloat16, torch.float16) else x.view(torch.int32)


def _same_values(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal values with identical bits, except that the kernels write +0.0 where the reference has -0.0
    (a negative scale times a zero code difference; the kernels add a +0 zero term)."""
    nonzero = ref != 0
    return torch.equal(got, ref) and torch.equal(_bits_of(got)[nonzero], _bits_of(ref)[nonzero])


# -- GPTQ unpacking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [32, 64, 96])
def test_unpack_inverts_reference_packer(bits, count):
    gen = torch.Generator().manual_seed(bits * 100 + count)
    values = torch.randint(0, 2**bits, (count, 5), generator=gen)
    packed = pack_bitstream_reference(values, bits)
    assert torch.equal(unpack_bitstream(packed, bits, count), values.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_matches_the_project_packer(bits):
    from stages.formats import gptq

    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (40, 64), generator=gen, dtype=torch.uint8)
    qweight = gptq.pack_qweight(codes, bits)
    assert torch.equal(unpack_qweight(qweight, bits, 64).t(), codes.to(torch.int32))
    zero = torch.randint(1, 2**bits, (64, 2), generator=gen)
    assert torch.equal(unpack_qzeros(gptq.pack_qzeros(zero, bits), bits, 64).t(), zero.to(torch.int32))


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, True), (4, False), (8, True)])
def test_dequantize_gptq_is_the_reference_dequantization(bits, sym):
    layer = make_gptq_layer(64, 256, bits, 64, sym, seed=bits)
    got = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, 64, torch.bfloat16)
    ref = dequantize(layer.codes, layer.scales.t().float(), layer.zero, 64, None, torch.bfloat16)
    assert torch.equal(_bits_of(got), _bits_of(ref))


def test_trivial_g_idx():
    assert is_trivial_g_idx(None, 32, 64)
    assert is_trivial_g_idx(torch.arange(64) // 32, 32, 64)
    assert not is_trivial_g_idx(torch.arange(64).flip(0) // 32, 32, 64)


# -- tinygemm (int4) ---------------------------------------------------------------------------------
def _tinygemm_weights(packed: int4.Int4Packed) -> torch.Tensor:
    """The kernel's own dequantized weight W [out, in], read out with an identity input."""
    eye = torch.eye(packed.in_features, dtype=torch.bfloat16, device=packed.packed.device)
    return int4.matmul(eye, packed).t()


def _int4_from(layer, device="cpu"):
    return int4.from_gptq(layer.qweight.to(device), layer.qzeros.to(device), layer.scales.to(device),
                          layer.g_idx.to(device), layer.group_size, torch.bfloat16)


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_conversion_exact_for_sym_bf16_scales(group_size):
    layer = make_gptq_layer(64, 256, 4, group_size, True, seed=group_size, bf16_scales=True)
    assert int4.exactness(layer.scale, layer.zero) == {"sym": True, "scales_bf16_representable": True, "exact": True}
    ref = dequantize(layer.codes, layer.scale, layer.zero, group_size, None, torch.bfloat16)
    got = _tinygemm_weights(_int4_from(layer))
    assert _same_values(got, ref)


@pytest.mark.parametrize("sym", [True, False])
def test_int4_conversion_rounded_within_bound(sym):
    """fp16 scales (and asym zero terms) are rounded to bf16: not exact, but within the documented bound."""
    layer = make_gptq_layer(64, 256, 4, 64, sym, seed=7)
    assert not int4.exactness(layer.scale, layer.zero)["exact"]
    ref = dequantize(layer.codes, layer.scale, layer.zero, 64, None, torch.float32)
    got = _tinygemm_weights(_int4_from(layer)).float()
    scale_per_weight = layer.scale.repeat_interleave(64, dim=1).abs()
    bound = 2.0**-9 * (got.abs() + 16 * scale_per_weight) + 2.0**-8 * ref.abs()
    diff = (got - ref).abs()
    assert float(diff.max()) > 0
    assert bool((diff <= bound).all()), float((diff - bound).max())


def test_int4_matmul_close_to_reference():
    layer = make_gptq_layer(48, 256, 4, 128, False, seed=3)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ref = x.double() @ dequantize(layer.codes, layer.scale, layer.zero, 128).double().t()
    y = int4.matmul(x, _int4_from(layer)).double()
    assert float((y - ref).norm() / ref.norm()) < 1e-2


def test_int4_refuses_what_it_cannot_take():
    assert "widened to 4 bits" in int4.unsupported_reason(8, 128, 256, 64, True, torch.bfloat16, "cuda")
    assert int4.unsupported_reason(3, 128, 256, 64, True, torch.bfloat16, "cuda") is None  # 3-bit codes widened
    assert "group size 48" in int4.unsupported_reason(4, 48, 240, 64, True, torch.bfloat16, "cuda")
    assert "act-order" in int4.unsupported_reason(4, 128, 256, 64, False, torch.bfloat16, "cuda")
    assert "multiple of 8" in int4.unsupported_reason(4, 128, 256, 60, True, torch.bfloat16, "cuda")
    assert "bfloat16" in int4.unsupported_reason(4, 128, 256, 64, True, torch.float16, "cuda:0")
    assert int4.unsupported_reason(4, -1, 256, 64, True, torch.bfloat16, "cuda") is None


# -- int8 ---------------------------------------------------------------------------------------------
def test_int8_conversion_exact_for_per_channel_sym_bf16_scales():
    layer = make_gptq_layer(32, 128, 8, -1, True, seed=5, bf16_scales=True)
    packed = int8.from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, -1, torch.bfloat16)
    got = int8.matmul(torch.eye(128, dtype=torch.bfloat16), packed).t()
    ref = dequantize(layer.codes, layer.scale, layer.zero, -1, None, torch.bfloat16)
    assert _same_values(got, ref)


def test_int8_refuses_grouped_and_asym():
    grouped = make_gptq_layer(32, 128, 8, 64, True)
    with pytest.raises(ValueError, match="one scale per output channel"):
        int8.from_gptq(grouped.qweight, grouped.qzeros, grouped.scales, grouped.g_idx, 64, torch.bfloat16)
    asym = make_gptq_layer(32, 128, 8, -1, False)
    with pytest.raises(ValueError, match="asym"):
        int8.from_gptq(asym.qweight, asym.qzeros, asym.scales, asym.g_idx, -1, torch.bfloat16)


# -- the Triton kernel's format --------------------------------------------------------------------------
def test_triton_format_keeps_checkpoint_tensors_and_drops_sym_zeros():
    sym = make_gptq_layer(32, 128, 4, 32, True)
    w = from_gptq(sym.qweight, sym.qzeros, sym.scales, sym.g_idx, 4, 32)
    assert w.zeros is None and w.zero_const == 8 and w.g_idx is None
    assert w.qweight.data_ptr() == sym.qweight.data_ptr()
    asym = make_gptq_layer(32, 128, 4, 32, False)
    wa = from_gptq(asym.qweight, asym.qzeros, asym.scales, asym.g_idx, 4, 32)
    assert torch.equal(wa.zeros.t().float(), asym.zero)


def test_fusing_along_out_equals_concatenated_dequantization():
    parts = [make_gptq_layer(n, 128, 3, 32, s, seed=n) for n, s in ((32, True), (64, False), (32, True))]
    ws = [from_gptq(p.qweight, p.qzeros, p.scales, p.g_idx, 3, 32) for p in parts]
    fused = concat_out(ws)
    want = torch.cat([dequantize_weight(w, torch.float32) for w in ws], 0)
    assert torch.equal(dequantize_weight(fused, torch.float32), want)
    dense = fuse_sources([DenseWeight(torch.ones(2, 4)), DenseWeight(torch.zeros(3, 4))])
    assert dense.weight.shape == (5, 4) and float(dense.weight.sum()) == 8
    with pytest.raises(ValueError, match="cannot fuse"):
        fuse_sources([DenseWeight(torch.ones(2, 128)), ws[0]])


# -- the Triton kernel under the CPU interpreter (in a fresh process: see tests/_triton_interp_cases.py) -------
@pytest.fixture(scope="module")
def interp_results() -> dict:
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install triton==3.6.0)")
    return run_interpreted_cases("_triton_interp_cases.py", timeout=600)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernel_interpreted_matches_reference(interp_results, case, dtype):
    """GEMV and tensor-core tiles, split-K, sym/asym, act-order, 2/3/4/8 bits, 1 to 130 rows."""
    spec = next(c for c in CASES if c[0] == case)
    res = interp_results[f"{case}-{dtype}"]
    assert "error" not in res, res.get("error")
    assert res["finite"] and res["shape"] == [spec[5], spec[7]] and res["dtype"] == dtype
    assert res["has_g_idx"] == spec[4]
    assert res["rel_err"] < (1e-6 if dtype == "float32" else 2e-3), res["rel_err"]


# -- planner ---------------------------------------------------------------------------------------------
def test_policies_match_the_registry():
    from stages import registry

    assert tuple(registry.BENCH_LINEAR_KERNELS) == POLICIES


def test_candidate_configs_are_valid_and_batch_aware():
    layer = make_gptq_layer(64, 512, 4, 128, True)
    w = from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, 128)
    small, mid, big = (candidate_configs(m, w, sms=132) for m in (1, 16, 128))
    assert any(not c.use_dot for c in small) and all(c.use_dot for c in mid + big)
    assert all(c.block_m >= 16 and c.rows >= 16 for c in mid + big if c.use_dot)
    assert min(c.block_m for c in big) >= 64 and max(c.split_k for c in small) > 1
    assert len(candidate_configs(1, w, 132, quick=True)) < len(small)


def _row(pairs):
    return {m: (ms, Route(m, kind)) for m, ms, kind in pairs}


def test_single_format_choice_minimises_worst_case_and_keeps_batch_awareness():
    per_format = {"gptq": _row([(1, 10.0, "triton"), (16, 11.0, "triton")]),
                  "tinygemm": _row([(1, 8.0, "tinygemm"), (16, 30.0, "tinygemm")])}
    assert pick_single_format(per_format) == "gptq"  # worst ratio 1.25 vs 2.7
    formats, routes = decide("auto", per_format)
    assert formats == ["gptq"] and [r.max_rows for r in routes] == [1, 16]
    formats, routes = decide("tinygemm_triton", per_format)
    assert formats == ["gptq", "tinygemm"] and [r.kind for r in routes] == ["tinygemm", "triton"]
    assert decide("tinygemm", per_format)[0] == ["tinygemm"]
    with pytest.raises(RuntimeError, match="no kernel passed"):
        pick_single_format({"gptq": {}})


def test_tuner_rejects_wrong_kernels_and_times_right_ones():
    from stages.kernels.planner import _Tuner

    layer = make_gptq_layer(32, 128, 4, 32, False, seed=9)
    w = from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, 32)
    tuner = _Tuner([w], torch.float32, timer=lambda fns: 1.25 * len(fns))
    assert tuner.measure("dequant", [w], None, 3) == (1.25, "")
    broken = from_gptq(layer.qweight, layer.qzeros, layer.scales * 2, layer.g_idx, 4, 32)
    ms, why = tuner.measure("dequant", [broken], None, 3)
    assert ms == math.inf and "relative error" in why
    ms, why = tuner.measure("tinygemm", [w], None, 3)  # a TritonWeight is not tinygemm's format
    assert ms == math.inf and "Error" in why


def test_kernel_linear_routes_by_row_count():
    w = DenseWeight(torch.randn(6, 4))
    mod = KernelLinear({"dense": w}, [Route(16, "dense"), Route(1, "dense")], bias=torch.ones(6))
    assert [r.max_rows for r in mod.routes] == [1, 16]
    assert (mod.route_for(1), mod.route_for(2), mod.route_for(16), mod.route_for(500)) == (0, 1, 1, 1)
    x = torch.randn(3, 2, 4)
    assert torch.allclose(mod(x), x @ w.weight.t() + 1)
    assert routes_from({4: (1.0, Route(4, "triton")), 1: (2.0, Route(1, "tinygemm"))})[0].kind == "tinygemm"


def test_cpu_build_dequantizes_and_reproduces_reference():
    layers = {f"l{i}": make_gptq_layer(32, 128, b, 32, s, seed=i) for i, (b, s) in enumerate([(4, True), (2, False)])}
    sources = {n: (from_gptq(l.qweight, l.qzeros, l.scales, l.g_idx, l.bits, 32), None) for n, l in layers.items()}
    sources["dense"] = (DenseWeight(torch.randn(8, 128)), torch.zeros(8))
    mods, plans = build_kernel_linears(sources, "auto", torch.float32, [1, 4])
    assert not sources  # consumed
    assert {p.routes[0] for p in plans} == {"dequant_once", "dense"}
    x = torch.randn(4, 128)
    for name, layer in layers.items():
        ref = torch.nn.functional.linear(x, dequantize(layer.codes, layer.scale, layer.zero, 32))
        assert torch.equal(mods[name](x), ref)


# -- CUDA (run with -m gpu on the GPU machine) -------------------------------------------------------------
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("group_size", [32, 128])
def test_cuda_int4_conversion_exact_for_sym_bf16_scales(group_size):
    layer = make_gptq_layer(256, 512, 4, group_size, True, seed=1, bf16_scales=True)
    got = _tinygemm_weights(_int4_from(layer, "cuda")).cpu()
    ref = dequantize(layer.codes, layer.scale, layer.zero, group_size, None, torch.bfloat16)
    assert _same_values(got, ref)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits,sym,act", [(4, True, False), (4, False, False), (3, True, False), (2, False, False),
                                          (8, True, False), (4, False, True)])
@pytest.mark.parametrize("m", [1, 3, 16, 33, 128, 257])
def test_cuda_triton_kernel_matches_reference(bits, sym, act, m):
    from stages.kernels import triton_gemm

    layer = make_gptq_layer(1024, 2048, bits, 128, sym, seed=m, act_order=act)
    w = from_gptq(*(t.cuda() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx)), bits, 128)
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ dequantize_weight(w, torch.bfloat16).double().t()
    launched = 0
    for cfg in candidate_configs(m, w, torch.cuda.get_device_properties(0).multi_processor_count):
        try:
            y = triton_gemm.matmul(x, w, cfg)
        except Exception as exc:  # a tile over the card's shared memory: the planner rejects it the same way
            assert "OutOfResources" in type(exc).__name__, (cfg.label(), exc)
            continue
        launched += 1
        err = float((y.double() - ref).norm() / ref.norm())
        assert math.isfinite(err) and err < 1e-2, (cfg.label(), err)
    assert launched > 0  # at least one candidate tile runs for every shape


@pytest.mark.gpu
@gpu
def test_cuda_planner_builds_working_layers():
    layers = [make_gptq_layer(512, 1024, 4, 128, True, seed=i) for i in range(3)]
    sources = {f"l{i}": (from_gptq(*(t.cuda() for t in (l.qweight, l.qzeros, l.scales, l.g_idx)), 4, 128), None)
               for i, l in enumerate(layers)}
    mods, plans = build_kernel_linears(sources, "auto", torch.bfloat16, [1, 16], measure_bf16=True)
    assert len(plans) == 1 and plans[0].bf16_ms and plans[0].routes
    for i, layer in enumerate(layers):
        for m in (1, 16, 40):
            x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ dequantize(layer.codes, layer.scale, layer.zero, 128).cuda().double().t()
            err = float((mods[f"l{i}"](x).double() - ref).norm() / ref.norm())
            assert err < 1e-2
