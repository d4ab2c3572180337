"""The Triton kernel's CPU-interpreter cases, run in a fresh process (python tests/_triton_interp_cases.py).

Triton's interpreter needs TRITON_INTERPRET=1 before triton is first imported (its standard
library is decorated at import time), which a pytest process that already imported
transformers/torch cannot guarantee; tests/test_kernels.py runs this file in a subprocess and
checks the JSON it prints: per case the relative error against a float64 reference of the
reference dequantization (`dequantize_weight` = qdq.dequantize cast to the activation dtype).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# (id, bits, group, sym, act_order, M, (block_m, block_n, rows, split_k, use_dot), N, K)
CASES = [
    ("w4g32s-gemv-m1", 4, 32, True, False, 1, (1, 16, 8, 1, False), 32, 256),
    ("w4g64a-gemv-m3-split3", 4, 64, False, False, 3, (4, 16, 8, 3, False), 32, 256),
    ("w4g128s-dot-m16-split2", 4, 128, True, False, 16, (16, 16, 16, 2, True), 32, 256),
    ("w4g32a-act-dot-m2", 4, 32, False, True, 2, (16, 32, 16, 1, True), 32, 256),
    ("w8g-1s-gemv-m1-split2", 8, -1, True, False, 1, (1, 32, 16, 2, False), 32, 256),
    ("w8g64a-dot-m17", 8, 64, False, False, 17, (16, 16, 16, 1, True), 32, 256),
    ("w3g64s-gemv-m1-split2", 3, 64, True, False, 1, (1, 16, 2, 2, False), 32, 256),
    ("w3g32a-dot-m5", 3, 32, False, False, 5, (16, 16, 16, 1, True), 32, 256),
    ("w2g64a-gemv-m2", 2, 64, False, False, 2, (2, 16, 4, 1, False), 32, 256),
    ("w2g128s-act-dot-m4", 2, 128, True, True, 4, (16, 16, 16, 1, True), 32, 256),
    ("w4g32a-dot-m130-3mblocks", 4, 32, False, False, 130, (64, 16, 16, 1, True), 16, 128),
]
DTYPES = ("float32", "float16")


def run_cases() -> dict:
    import torch

    from _kernel_helpers import make_gptq_layer, patch_triton_interpreter_for_numpy2

    patch_triton_interpreter_for_numpy2()
    from stages.kernels import triton_gemm
    from stages.kernels.linear import dequantize_weight
    from stages.kernels.tiles import TileConfig, from_gptq

    out = {}
    for cid, bits, gs, sym, act, m, cfg, n, k in CASES:
        layer = make_gptq_layer(n, k, bits, gs, sym, seed=bits + m, act_order=act)
        w = from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, gs)
        for dt in DTYPES:
            dtype = getattr(torch, dt)
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
            ref = x.double() @ dequantize_weight(w, dtype).double().t()
            try:
                y = triton_gemm.matmul(x, w, TileConfig(*cfg))
                out[f"{cid}-{dt}"] = {"rel_err": float((y.double() - ref).norm() / ref.norm()),
                                      "finite": bool(torch.isfinite(y).all()), "shape": list(y.shape),
                                      "dtype": str(y.dtype).replace("torch.", ""), "has_g_idx": w.g_idx is not None}
            except Exception as exc:  # reported to the test
                out[f"{cid}-{dt}"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    print("RESULTS " + json.dumps(run_cases()))
