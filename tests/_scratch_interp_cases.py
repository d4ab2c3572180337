"""The scratch route's dequantizers under Triton's CPU interpreter, in a fresh process.

Run by tests/test_scratch.py (python tests/_scratch_interp_cases.py with TRITON_INTERPRET=1);
prints one line ``RESULTS <json>``. Per scheme (W4 sym / asym, W3G64 asym, W2G64 asym, W8 per
channel, act-order): whether the dequantized W^T, whole and in column slices, equals the
reference dequantization bit for bit, and the relative error of the route's matmul against a
float64 product. tinygemm: a reference packer written from aten's CUDA layout description
(independent of the kernel's index arithmetic) feeds the int4 dequantizer.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# (id, bits, group size, sym, act-order)
SCHEMES = [("w4g128s", 4, 128, True, False), ("w4g128a", 4, 128, False, False), ("w3g64a", 3, 64, False, False),
           ("w2g64a", 2, 64, False, False), ("w8g-1s", 8, -1, True, False), ("w4g64a-act", 4, 64, False, True),
           ("w4g32a", 4, 32, False, False)]  # groups smaller than a 64-value tile: per-row scales
N, K, M = 96, 256, 5
DTYPES = ("float16", "float32")  # the interpreter rounds bfloat16 differently: checked by the gpu test


def pack_int4_cuda_reference(codes_nk, inner_k_tiles: int = 8):
    """aten's CUDA int4 layout, element by element: lane t of (n tile, k super-tile, inner pair i2) holds
    bytes b = k0/2 + t%4 + 4j (j = 0..3) of row 8*nTile + t//4, high nibbles in bits 0-15, low in 16-31."""
    import torch

    n, k = codes_nk.shape
    kt = k // (16 * inner_k_tiles)
    out = torch.zeros(n // 8, kt, 32, inner_k_tiles // 2, dtype=torch.int64)
    c = codes_nk.to(torch.int64)
    for nt in range(n // 8):
        for ko in range(kt):
            for t in range(32):
                row = nt * 8 + t // 4
                for i2 in range(inner_k_tiles // 2):
                    k0 = (ko * inner_k_tiles + 2 * i2) * 16
                    word = 0
                    for j in range(4):
                        kk = k0 + 2 * (t % 4 + 4 * j)
                        word |= int(c[row, kk]) << (4 * j) | int(c[row, kk + 1]) << (16 + 4 * j)
                    out[nt, ko, t, i2] = word
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # the same 32 bits as int32


def _gptq_case(bits, gs, sym, act, dtype) -> dict:
    import torch

    from _kernel_helpers import make_gptq_layer
    from stages.kernels import scratch
    from stages.kernels.linear import dequantize_weight
    from stages.kernels.tiles import from_gptq

    layer = make_gptq_layer(N, K, bits, gs, sym, seed=bits * 7 + (gs % 5), act_order=act)
    w = from_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, gs)
    ref = dequantize_weight(w, dtype).t()
    pool = scratch.ScratchPool(dtype)
    whole = scratch.ScratchConfig("gptq", None, pool)
    sliced = scratch.ScratchConfig("gptq", 40, pool)  # 40, 40, 16 columns: a ragged last slice
    for cfg in (whole, sliced):
        scratch.reserve(w, cfg)
    buf = pool.view(K, N, "cpu")
    full_equal = bool(torch.equal(scratch.DEQUANTIZERS["gptq"](w, buf, 0, N), ref))
    part = pool.view(K, 48, "cpu")
    slice_equal = bool(torch.equal(scratch.DEQUANTIZERS["gptq"](w, part, 40, 88), ref[:, 40:88]))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    exact = x.double() @ ref.double()
    errs = {c.label(): float((scratch.matmul(x, w, c).double() - exact).norm() / exact.norm()) for c in (whole, sliced)}
    return {"full_equal": full_equal, "slice_equal": slice_equal, "rel_err": errs, "has_g_idx": w.g_idx is not None}


def _int4_case(dtype) -> dict:
    import torch

    from stages.kernels import int4, scratch

    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (N, K), generator=gen)
    gs = 64
    scale = torch.rand(K // gs, N, generator=gen) * 0.01 + 0.001
    zero = torch.randint(0, 16, (K // gs, N), generator=gen).float()
    sz = int4.scales_and_zeros(scale, zero, dtype)
    w = int4.Int4Packed(pack_int4_cuda_reference(codes), sz, gs, K, N)
    g = torch.arange(K) // gs
    ref = ((codes.t().float() - 8) * sz[g, :, 0].float() + sz[g, :, 1].float()).to(dtype)  # [K, N]
    pool = scratch.ScratchPool(dtype)
    pool.reserve(K * N, "cpu")
    full_equal = bool(torch.equal(scratch.DEQUANTIZERS["tinygemm"](w, pool.view(K, N, "cpu"), 0, N), ref))
    got_slice = scratch.DEQUANTIZERS["tinygemm"](w, pool.view(K, 40, "cpu"), 56, 96)  # the buffer is reused
    return {"full_equal": full_equal, "slice_equal": bool(torch.equal(got_slice, ref[:, 56:96]))}


def run_cases() -> dict:
    import torch

    from _kernel_helpers import patch_triton_interpreter_for_numpy2

    patch_triton_interpreter_for_numpy2()
    out = {}
    for dt in DTYPES:
        dtype = getattr(torch, dt)
        for cid, bits, gs, sym, act in SCHEMES:
            try:
                out[f"{cid}-{dt}"] = _gptq_case(bits, gs, sym, act, dtype)
            except Exception as exc:  # reported to the test
                out[f"{cid}-{dt}"] = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            out[f"int4pack-{dt}"] = _int4_case(dtype)
        except Exception as exc:  # reported to the test
            out[f"int4pack-{dt}"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    print("RESULTS " + json.dumps(run_cases()))
