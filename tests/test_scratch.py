"""The large-M scratch route: exact dequantization of every kept format into the shared buffer, the
routing and buffer sizing of KernelLinear, and the planner's batch-aware, prefill-aware choice.

The Triton dequantizers run on the CPU under Triton's interpreter in a fresh process
(tests/_scratch_interp_cases.py); gemlite's own packed weights go through the same dequantizer in
tests/_gemlite_interp_cases.py (checked in tests/test_gemlite.py); bfloat16 and aten's real CUDA
int4 packer are checked by the gpu-marked tests at the end.
"""

from __future__ import annotations


import pytest
import torch

from _kernel_helpers import run_interpreted_cases, make_gptq_layer
from _scratch_interp_cases import DTYPES, SCHEMES
from stages.kernels import scratch
from stages.kernels.linear import KernelLinear, Route, dequantize_weight, to_int8
from stages.kernels.planner import decide, group_rows, pick_single_format
from stages.kernels.tiles import from_gptq

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_interpreted_cases("_scratch_interp_cases.py", timeout=600)


@pytest.mark.parametrize("case", [s[0] for s in SCHEMES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gptq_layout_dequantizes_to_the_reference_bit_for_bit(interp, case, dtype):
    """W4 sym/asym, W3G64, W2G64, W8 per channel, act-order: whole layer and a column slice; the route's
    matmul (whole and slice by slice) is within the activation dtype's rounding of the float64 product."""
    res = interp[f"{case}-{dtype}"]
    assert "error" not in res, res.get("error")
    assert res["full_equal"] and res["slice_equal"]
    assert res["has_g_idx"] == case.endswith("act")
    for label, err in res["rel_err"].items():
        assert err < (1e-6 if dtype == "float32" else 1e-3), (label, err)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4pack_layout_dequantizes_to_the_kernel_weights(interp, dtype):
    res = interp[f"int4pack-{dtype}"]
    assert "error" not in res, res.get("error")
    assert res["full_equal"] and res["slice_equal"]


def _int8_weight(n=96, k=128):
    layer = make_gptq_layer(n, k, 8, -1, True, seed=4)
    w = from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 8, -1)
    return w, to_int8(w, torch.float32)


def test_kernel_linear_takes_the_scratch_route_for_large_m_and_sizes_the_shared_buffer():
    w, w8 = _int8_weight()
    pool = scratch.ScratchPool(torch.float32)
    cfg = scratch.ScratchConfig("int8pack", 40, pool)
    mod = KernelLinear({"int8pack": w8}, [Route(16, "int8pack"), Route(256, "scratch", cfg)])
    other = KernelLinear({"int8pack": w8}, [Route(16, "scratch", scratch.ScratchConfig("int8pack", None, pool))])
    assert pool.nbytes() == 128 * 96 * 4  # one buffer, the largest slice (the whole 96-column layer)
    ref = (w8.weight.float() * w8.scales[:, None]).t()
    assert torch.equal(ref, dequantize_weight(w, torch.float32).t())  # int8pack keeps the checkpoint's weights
    for m in (3, 200):
        x = torch.randn(m, 128)
        assert torch.allclose(mod(x), x @ ref, rtol=1e-4, atol=1e-5)
    assert mod.route_for(200) == 1 and torch.allclose(other(x), x @ ref, rtol=1e-4, atol=1e-5)
    assert mod.routes[1].format() == "int8pack" and mod.routes[1].label() == "scratch:int8pack_40"


def test_chunk_candidates_are_whole_layer_then_l2_sized_slices():
    assert scratch.chunk_candidates(4096, 28672) == [None, 1536, 3072]
    assert scratch.chunk_candidates(4096, 1024) == [None]  # a small layer fits: no slices
    assert all(c % 256 == 0 for c in scratch.chunk_candidates(14336, 4096)[1:])


def _row(pairs):
    return {m: (us, Route(m, kind)) for m, us, kind in pairs}


def test_batch1_weight_moves_the_single_format_choice():
    """The measured W4 qkv pattern: tinygemm fastest at M=1, slow at 16; gemlite the reverse; both scratch at 2048."""
    per_format = {"gemlite": _row([(1, 11.1, "gemlite"), (16, 27.3, "gemlite"), (2048, 300.0, "scratch")]),
                  "tinygemm": _row([(1, 9.7, "tinygemm"), (16, 36.2, "tinygemm"), (2048, 301.0, "scratch")])}
    assert pick_single_format(per_format) == "gemlite"
    assert pick_single_format(per_format, batch1_weight=4.0) == "tinygemm"
    formats, routes = decide("auto", per_format, batch1_weight=4.0)
    assert formats == ["tinygemm"] and [r.kind for r in routes] == ["tinygemm", "tinygemm", "scratch"]


def test_prefill_rows_are_planned_for_every_group_but_last_token_ones():
    from stages.bench.engine import prefill_rows
    from stages.bench.workload import Workload

    assert prefill_rows(Workload(2, 2048, 2, (1, 4))) == [2048, 8192]
    assert group_rows(["layers.0.qkv", "layers.1.qkv"], [1, 16], [2048], ("lm_head",)) == [1, 16, 2048]
    assert group_rows(["lm_head"], [1, 16], [2048], ("lm_head",)) == [1, 16]
    assert group_rows(["lm_head", "layers.0.o"], [16, 1], [2048], ("lm_head",)) == [1, 16, 2048]


gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits,gs,sym", [(4, 128, True), (4, 128, False), (3, 64, False), (2, 64, False), (8, -1, True)])
def test_cuda_scratch_matches_reference_in_bfloat16(bits, gs, sym):
    layer = make_gptq_layer(512, 1024, bits, gs, sym, seed=bits)
    w = from_gptq(*(t.cuda() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx)), bits, gs)
    pool = scratch.ScratchPool(torch.bfloat16)
    cfg = scratch.ScratchConfig("gptq", 256, pool)
    scratch.reserve(w, cfg)
    got = scratch.DEQUANTIZERS["gptq"](w, pool.view(1024, 256, "cuda:0"), 0, 256)
    assert torch.equal(got, dequantize_weight(w, torch.bfloat16).t()[:, :256])


@pytest.mark.gpu
@gpu
def test_cuda_scratch_reads_aten_int4_layout():
    from stages.kernels.linear import to_int4

    layer = make_gptq_layer(512, 1024, 4, 128, False, seed=2)
    w = from_gptq(*(t.cuda() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx)), 4, 128)
    packed = to_int4(w, torch.bfloat16)
    pool = scratch.ScratchPool(torch.bfloat16)
    pool.reserve(1024 * 512, "cuda:0")
    got = scratch.DEQUANTIZERS["tinygemm"](packed, pool.view(1024, 512, "cuda:0"), 0, 512)
    eye = torch.eye(1024, device="cuda", dtype=torch.bfloat16)
    kernel_w = torch.ops.aten._weight_int4pack_mm(eye, packed.packed, 128, packed.scales_and_zeros)  # [K, N]
    assert (got.float() - kernel_w.float()).abs().max() <= 1e-2 * kernel_w.float().abs().max()


@pytest.mark.parametrize("quick", [True, False])
def test_planner_times_the_scratch_route_only_at_prefill_sizes(monkeypatch, quick):
    """int8pack runs on the CPU, so the group measurement runs here with a stand-in timer."""
    import types

    from stages.kernels import planner

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(multi_processor_count=4))
    w, _ = _int8_weight()
    plan = planner.GroupPlan("g", ["l0"], [], [])
    calls = []
    per_format = planner._measure_group([w], ["int8pack"], torch.float32, [1, 16, 256], quick,
                                        lambda fns: calls.append(fns) or float(len(calls)), False, plan,
                                        scratch.ScratchPool())  # each timing slower than the last: scratch (first) wins
    best = per_format["int8pack"]
    assert [best[m][1].kind for m in (1, 16)] == ["int8pack", "int8pack"] and best[256][1].kind == "scratch"
    assert set(plan.ms["scratch:int8pack_all"]) == {256} and not plan.rejected
    assert set(plan.ms["int8pack"]) == ({1, 16} if quick else {1, 16, 256})  # quick: no low-bit kernel at 256 rows
