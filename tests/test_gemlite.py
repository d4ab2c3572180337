"""gemlite adapter, widened tinygemm, the kernel catalog and the forced-policy errors.

gemlite's own kernels run on the CPU under Triton's interpreter in a fresh process
(tests/_gemlite_interp_cases.py; shims in tests/_gemlite_cpu.py); the GPU path is checked by
the gpu-marked test at the end.
"""

from __future__ import annotations

import math

import pytest
import torch

from _kernel_helpers import run_interpreted_cases, make_gptq_layer
from core.errors import ConfigError
from stages.kernels import catalog, gemlite_linear
from stages.kernels.linear import Route, dequantize_weight, to_int4
from stages.kernels.planner import KernelRejected, decide
from stages.kernels.tiles import from_gptq
from stages.quant.qdq import dequantize

CUDA = torch.cuda.is_available()


def _weight(bits, gs, sym, out_f=32, in_f=256, seed=0, act=False):
    layer = make_gptq_layer(out_f, in_f, bits, gs, sym, seed=seed, act_order=act)
    return layer, from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, gs)


# -- gemlite under the interpreter --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemlite_cpu() -> dict:
    return run_interpreted_cases("_gemlite_interp_cases.py", timeout=900)


SCHEMES = ["w4g128s", "w4g64a", "w3g64a", "w2g64a", "w8g-1s"]


@pytest.mark.parametrize("case", SCHEMES)
def test_gemlite_layout_is_the_gptq_qweight(gemlite_cpu, case):
    """gemlite's packer writes our checkpoint's qweight bit for bit (3-bit: the 4-bit packing of the same codes)."""
    res = gemlite_cpu[case]
    assert "error" not in res, res.get("error")
    bits = {"w4g128s": 4, "w4g64a": 4, "w3g64a": 4, "w2g64a": 2, "w8g-1s": 8}[case]
    assert res["wq_equals_gptq_layout"] and res["stored_bits"] == bits
    assert res["wq_shape"] == [256 * bits // 32, 32]


@pytest.mark.parametrize("case", SCHEMES)
def test_gemlite_kernels_reproduce_the_reference_weights(gemlite_cpu, case):
    """float16: the kernel's own weights (identity input) equal qdq.dequantize bit for bit; every kernel that
    gemlite picks itself is within float16 rounding of the float64 product."""
    res = gemlite_cpu[case]
    assert res["identity_weights_equal"]
    assert res["scratch_equal"]  # the large-M route dequantizes gemlite's packed tensors to the same weights
    errs = res["rel_err"]
    for kind in ("GEMV_REVSPLITK", "GEMM_SPLITK", "GEMM", "auto"):
        assert isinstance(errs[kind], float) and errs[kind] < 2e-3, (kind, errs[kind])
    if case in ("w4g128s", "w8g-1s"):  # GEMV_SPLITK's default tile spans more than a 64-wide group
        assert errs["GEMV_SPLITK"] < 2e-3


# -- conversion rules (no kernels) -------------------------------------------------------------------------
def test_gemlite_refuses_what_it_cannot_take():
    _, w = _weight(4, 32, False, act=True)
    assert "act-order" in gemlite_linear.unsupported_reason(w, torch.bfloat16)
    _, w = _weight(4, 64, True)
    assert gemlite_linear.unsupported_reason(w, torch.bfloat16) is None
    assert "float16 and bfloat16" in gemlite_linear.unsupported_reason(w, torch.float32)
    _, w8 = _weight(8, -1, True)
    assert gemlite_linear.unsupported_reason(w8, torch.float16) is None
    with pytest.raises(ValueError, match="gemlite cannot take this layer: activation dtype"):
        gemlite_linear.from_triton_weight(w, torch.float32)


def test_gemlite_inputs_are_the_checkpoint_numbers():
    layer, w = _weight(3, 64, False, seed=4)
    codes, scales, zeros = gemlite_linear.gemlite_inputs(w, torch.float16)
    assert torch.equal(codes, layer.codes) and codes.dtype == torch.uint8
    assert torch.equal(scales, layer.scale.to(torch.float16)) and torch.equal(zeros.float(), layer.zero)
    _, ws = _weight(4, 128, True)
    assert gemlite_linear.gemlite_inputs(ws, torch.bfloat16)[2] == 8  # sym: one integer zero


def test_gemlite_candidates_follow_the_row_count():
    labels = lambda m: [c.label() for c in gemlite_linear.candidate_configs(m)]  # noqa: E731
    assert labels(1) == ["auto", "gemv", "gemv_revsplitk", "gemv_splitk"]
    assert labels(3) == ["auto", "gemv", "gemv_revsplitk", "gemv_splitk", "gemm_splitk", "gemm"]
    assert labels(16) == ["auto", "gemm_splitk", "gemm"]


def test_widened_int4_gives_the_reference_weights_for_2_and_3_bits():
    """2/3-bit codes in tinygemm's 4-bit fields: the same weights as the 4-bit case (within its bf16 bound)."""
    for bits in (2, 3):
        layer, w = _weight(bits, 64, False, out_f=64, seed=bits)
        packed = to_int4(w, torch.bfloat16)
        eye = torch.eye(256, dtype=torch.bfloat16)
        from stages.kernels import int4

        got = int4.matmul(eye, packed).t().float()
        ref = dequantize(layer.codes, layer.scale, layer.zero, 64, None, torch.float32)
        bound = 2.0**-9 * (got.abs() + 16 * layer.scale.repeat_interleave(64, 1).abs()) + 2.0**-8 * ref.abs()
        assert bool(((got - ref).abs() <= bound).all())
        assert packed.nbytes() > w.nbytes()  # widened: 4-bit memory


# -- catalog and forced-policy errors ----------------------------------------------------------------------
def test_catalog_says_which_kernels_take_a_layer():
    _, w8 = _weight(8, -1, True)
    reasons = catalog.format_reasons(w8, torch.bfloat16, "cuda:0")
    assert reasons["int8pack"] is None and "4-bit kernel" in reasons["tinygemm"]
    _, w2 = _weight(2, 64, False)
    reasons = catalog.format_reasons(w2, torch.bfloat16, "cuda:0")
    assert reasons["tinygemm"] is None and "bits=2" in reasons["int8pack"]
    off = catalog.format_reasons(w2, torch.bfloat16, "cpu")
    assert all(r for r in off.values())


def test_forced_policy_on_a_layer_it_cannot_take_names_the_alternatives():
    _, w2 = _weight(2, 64, False)
    reasons = catalog.format_reasons(w2, torch.bfloat16, "cuda:0")
    err = catalog.policy_error("int8pack", "w2g64 32x256 asym", reasons)
    msg = str(err)
    assert isinstance(err, ConfigError) and msg.startswith("bench.linear_kernel=int8pack cannot run w2g64 32x256 asym")
    assert "bits=2" in msg and "tinygemm" in msg and "dequant" in msg and "bench.linear_kernel=auto" in msg


def test_forced_policy_whose_kernel_failed_everywhere_is_an_error():
    ok = {1: (1.0, Route(1, "triton"))}
    with pytest.raises(KernelRejected, match="gemlite failed"):
        decide("gemlite", {"gemlite": {}, "gptq": ok})
    assert decide("gemlite", {"gemlite": {1: (2.0, Route(1, "gemlite"))}, "gptq": ok})[0] == ["gemlite"]
    assert decide("auto", {"gemlite": {1: (2.0, Route(1, "gemlite"))}, "gptq": ok})[0] == ["gptq"]
    with pytest.raises(KernelRejected):
        decide("tinygemm_triton", {"tinygemm": {}, "gptq": ok})


def test_missing_gemlite_package_is_reported_before_work(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gemlite" else real(name, *a))
    assert "pip install gemlite==" in catalog.package_problem("gemlite")
    assert catalog.package_problem("auto") is None
    assert "not installed" in gemlite_linear.available()


# -- CUDA (run with -m gpu on the GPU machine) -------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("bits,gs,sym", [(4, 128, True), (4, 128, False), (3, 64, False), (2, 64, False), (8, -1, True)])
def test_cuda_gemlite_kernels_match_reference(bits, gs, sym):
    layer = make_gptq_layer(1024, 2048, bits, gs, sym, seed=bits)
    w = from_gptq(*(t.cuda() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx)), bits, gs)
    gw = gemlite_linear.from_triton_weight(w, torch.bfloat16)
    ref_w = dequantize_weight(w, torch.bfloat16).double()
    for m in (1, 3, 16, 64):
        x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ ref_w.t()
        for cfg in gemlite_linear.candidate_configs(m):
            if cfg.matmul_type == "GEMV_SPLITK" and gs != -1:
                continue  # gemlite picks it for per-channel 8-bit only (its tile may span several groups)
            err = float((gemlite_linear.matmul(x, gw, cfg).double() - ref).norm() / ref.norm())
            assert math.isfinite(err) and err < 1e-2, (cfg.label(), m, err)
