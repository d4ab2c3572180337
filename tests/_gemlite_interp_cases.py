"""gemlite's kernels on our converted layers, under the CPU interpreter, in a fresh process.

Run by tests/test_gemlite.py (python tests/_gemlite_interp_cases.py with TRITON_INTERPRET=1);
prints one line ``RESULTS <json>``: per scheme, the layout check (gemlite's packed W_q vs the
checkpoint's GPTQ qweight), the kernel's own weights read back through an identity input, the scratch route's
dequantization of gemlite's packed tensors,
and per gemlite kernel the relative error against a float64 product with the reference
dequantization. float16 activations (the interpreter's bfloat16 dot is not reliable).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (id, bits, group size, sym)
SCHEMES = [("w4g128s", 4, 128, True), ("w4g64a", 4, 64, False), ("w3g64a", 3, 64, False),
           ("w2g64a", 2, 64, False), ("w8g-1s", 8, -1, True)]
N, K = 32, 256
# GEMV itself indexes a per-GPU table with x.device.index (None on the CPU): checked by the gpu-marked test only.
KERNEL_ROWS = {"GEMV_REVSPLITK": 2, "GEMV_SPLITK": 1, "GEMM_SPLITK": 5, "GEMM": 17}


def _case(bits: int, gs: int, sym: bool) -> dict:
    import torch

    from _kernel_helpers import make_gptq_layer, pack_bitstream_reference
    from stages.kernels import gemlite_linear, scratch
    from stages.kernels.linear import dequantize_weight
    from stages.kernels.tiles import from_gptq

    layer = make_gptq_layer(N, K, bits, gs, sym, seed=bits * 10 + (gs % 7))
    w = from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, gs)
    gw = gemlite_linear.from_triton_weight(w, torch.float16)
    stored = gemlite_linear.STORED_BITS[bits]
    want_wq = layer.qweight if stored == bits else pack_bitstream_reference(layer.codes.t().to(torch.int64), stored)
    ref_w = dequantize_weight(w, torch.float16)
    eye = torch.eye(K, dtype=torch.float16)
    res = {"wq_equals_gptq_layout": bool(torch.equal(gw.layer.W_q, want_wq)), "wq_shape": list(gw.layer.W_q.shape),
           "stored_bits": int(gw.layer.W_nbits), "nbytes": gw.nbytes(),
           "identity_weights_equal": bool(torch.equal(gemlite_linear.matmul(eye, gw, gemlite_linear.GemliteConfig(
               "GEMM")).t(), ref_w)), "rel_err": {}}
    pool = scratch.ScratchPool(torch.float16)  # the large-M route reads gemlite's own packed tensors
    pool.reserve(K * N, "cpu")
    res["scratch_equal"] = bool(torch.equal(scratch.DEQUANTIZERS["gemlite"](gw, pool.view(K, N, "cpu"), 0, N),
                                            ref_w.t()))
    for kind, m in KERNEL_ROWS.items():
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).to(torch.float16)
        ref = x.double() @ ref_w.double().t()
        try:
            y = gemlite_linear.matmul(x, gw, gemlite_linear.GemliteConfig(kind))
            res["rel_err"][kind] = float((y.double() - ref).norm() / ref.norm())
        except Exception as exc:  # reported to the test
            res["rel_err"][kind] = f"{type(exc).__name__}: {str(exc)[:300]}"
    y = gemlite_linear.matmul(x[:3], gw, None)  # gemlite's own choice for 3 rows (a GEMV)
    res["rel_err"]["auto"] = float((y.double() - ref[:3]).norm() / ref[:3].norm())
    return res


def main() -> None:
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    import _gemlite_cpu

    _gemlite_cpu.install()
    import gemlite

    gemlite.set_autotune("default")  # one config per kernel: the interpreter runs every candidate config
    out = {}
    for cid, bits, gs, sym in SCHEMES:
        try:
            out[cid] = _case(bits, gs, sym)
        except Exception as exc:  # reported to the test
            out[cid] = {"error": f"{type(exc).__name__}: {exc}"}
    print("RESULTS " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
