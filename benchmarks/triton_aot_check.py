#!/usr/bin/env python
"""Compile every Triton tile the planner may choose for Llama-3-8B shapes, for sm_90, without a GPU.

Uses Triton's ahead-of-time path (ASTSource + GPUTarget("cuda", 90, 32)) with the divisibility
hints the JIT adds at run time (16-byte aligned pointers, strides and sizes divisible by 16), then
reads registers, stack and spills from the cubin (cuobjdump -res-usage) and counts the SASS
instructions that matter (HMMA tensor-core ops, 128-bit global loads, cp.async, local-memory
traffic). A cheap check, before spending GPU time, that the kernels compile and stay in registers.

The scratch route's dequantizers (`stages/kernels/triton_dequant.py`) are compiled too: their
stores should be 128-bit (STG.E.128), the point of their column-view arguments and tile widths.

  python benchmarks/triton_aot_check.py [--bits 4,8,3,2] [--rows 1,16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from stages.kernels import triton_gemm  # noqa: E402
from stages.kernels.planner import candidate_configs  # noqa: E402
from stages.kernels.tiles import TritonWeight, group_tile_ok  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ARGS = ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "g_ptr", "out_ptr", "M", "N", "K", "stride_xm", "stride_qw", "stride_s",
        "stride_z", "stride_om", "stride_os", "group_size", "zero_const", "tiles_per_split")
TYPES = ("*bf16", "*i32", "*fp16", "*u8", "*i32", "*bf16") + ("i32",) * 10 + ("fp32", "i32")
DIVISIBLE = (0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


DEQUANT_ARGS = {"gptq": (("qw_ptr", "*i32"), ("s_ptr", "*fp16"), ("z_ptr", "*u8"), ("g_ptr", "*i32"),
                          ("out_ptr", "*bf16")) + tuple((a, "i32") for a in (
                              "K", "N", "stride_qw", "stride_s", "stride_z", "stride_o", "group_size")) + (
                                  ("zero_const", "fp32"),),
                 "int4pack": (("p_ptr", "*i32"), ("sz_ptr", "*bf16"), ("out_ptr", "*bf16")) + tuple(
                     (a, "i32") for a in ("K", "N", "stride_g", "stride_o", "group_size"))}


def compile_tile(w: TritonWeight, cfg, has_zeros: bool) -> dict:
    consts = {"BITS": w.bits, "HAS_ZEROS": has_zeros, "HAS_GIDX": False, "GROUP_TILE": group_tile_ok(w, cfg),
              "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "ROWS": cfg.rows, "USE_DOT": cfg.use_dot}
    return compile_kernel(triton_gemm._wq_matmul_kernel, dict(zip(ARGS, TYPES)), consts, DIVISIBLE,
                          {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def compile_dequant(bits: int) -> dict:
    """The scratch route's dequantizer for `bits` (0: the int4pack layout) as `dequant_*_into` launches it."""
    from stages.kernels import triton_dequant as td

    if bits == 0:
        consts = {"IKT": 8, "BLOCK_K": 32, "BLOCK_N": td.BLOCK_N}
        return compile_kernel(td._dequant_int4pack_kernel, dict(DEQUANT_ARGS["int4pack"]), consts, range(8),
                              {"num_warps": 4})
    blocks = max(1, 64 // (32 if bits == 3 else 32 // bits))
    consts = {"BITS": bits, "HAS_ZEROS": True, "HAS_GIDX": False, "GROUP_TILE": True, "BLOCKS": blocks,
              "BLOCK_N": td.BLOCK_N * max(1, 8 // blocks)}
    return compile_kernel(td._dequant_gptq_kernel, dict(DEQUANT_ARGS["gptq"]), consts, range(12), {"num_warps": 4})


def compile_kernel(fn, sig: dict, consts: dict, divisible, options: dict) -> dict:
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        res = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    usage = next((ln.strip() for ln in res.splitlines() if "REG:" in ln), "")
    fields = dict(p.split(":") for p in usage.split() if ":" in p)
    return {"regs": int(fields.get("REG", -1)), "stack": int(fields.get("STACK", -1)),
            **{op: sass.count(op) for op in ("HMMA", "LDG.E.128", "LDGSTS", "STG.E.128", "LDL", "STL")}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4,8,3,2")
    ap.add_argument("--rows", default="1,16")
    args = ap.parse_args()
    seen, bad = set(), 0
    for bits in map(int, args.bits.split(",")):
        for name, (n, k) in SHAPES.items():
            w = TritonWeight(torch.empty(0), torch.empty(0), None, None, bits, 128, k, n, 2.0 ** (bits - 1))
            for m in map(int, args.rows.split(",")):
                for cfg in candidate_configs(m, w, sms=132):
                    key = (bits, cfg.block_m, cfg.block_n, cfg.rows, cfg.use_dot, cfg.num_warps, group_tile_ok(w, cfg))
                    if key in seen:
                        continue
                    seen.add(key)
                    try:
                        r = compile_tile(w, cfg, has_zeros=False)
                        flag = "SPILLS" if r["LDL"] or r["STL"] else ""
                        print(f"w{bits} {name:8s} M={m:<3d} {cfg.label():28s} {r} {flag}", flush=True)
                    except Exception as exc:  # reported: this tile would be rejected on the GPU too
                        bad += 1
                        print(f"w{bits} {name:8s} M={m:<3d} {cfg.label():28s} FAILED {type(exc).__name__}: {exc}")
    for bits in (4, 8, 3, 2, 0):
        try:
            r = compile_dequant(bits)
            print(f"dequant {'int4pack' if bits == 0 else f'w{bits}'}: {r}", flush=True)
        except Exception as exc:  # reported: the scratch route would fail on the GPU too
            bad += 1
            print(f"dequant w{bits} FAILED {type(exc).__name__}: {exc}")
    print(f"{len(seen)} distinct tiles + 5 dequantizers compiled for sm_90, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
