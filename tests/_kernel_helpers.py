"""Test helpers for the kernel tests: an independent reference GPTQ packer and layer factory.

The packer below is written from the format description (LSB-first bit stream per column,
qzeros store zero - 1), with plain Python integers, so it shares no code with the unpacker
under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from stages.quant.qdq import group_index, quantize_weight


def pack_bitstream_reference(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [count, C] with values in [0, 2^bits) -> int32 [ceil(count*bits/32), C], column-wise bit streams."""
    count, cols = values.shape
    words = -(-count * bits // 32)
    vals = values.to(torch.int64).numpy()
    out = np.zeros((words, cols), dtype=np.uint32)
    for c in range(cols):
        stream = 0
        for i in range(count):
            stream |= int(vals[i, c]) << (bits * i)
        for w in range(words):
            out[w, c] = (stream >> (32 * w)) & 0xFFFFFFFF
    return torch.from_numpy(out.view(np.int32).copy())


@dataclass
class GPTQLayer:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor  # float16 [G, out]
    g_idx: torch.Tensor
    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # float32 [out, G]
    zero: torch.Tensor  # float32 [out, G]
    bits: int
    group_size: int
    weight: torch.Tensor  # the float32 weight that was quantized


def make_gptq_layer(out_f: int, in_f: int, bits: int, group_size: int, sym: bool, seed: int = 0,
                    bf16_scales: bool = False, act_order: bool = False, zero_max: Optional[int] = None) -> GPTQLayer:
    """Quantize a random weight with RTN and pack it with the reference packer.

    bf16_scales: round the scales to bfloat16-representable float16 values first (what makes
    the int4 kernel's conversion exact). act_order: a shuffled g_idx (GPTQ desc_act).
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    codes, qp = quantize_weight(w, bits, group_size, sym)
    scale, zero = qp.scale, qp.zero
    if bf16_scales:
        scale = scale.to(torch.bfloat16).float()
        scale = torch.where(scale.abs() < 1e-5, torch.full_like(scale, 2 ** -16), scale)
    if zero_max is not None:
        zero = zero.clamp(max=zero_max)
    zero = zero.clamp(min=1)  # GPTQ v1 stores zero - 1: a zero of 0 is not representable
    g_idx = group_index(in_f, group_size)
    if act_order:
        perm = torch.randperm(in_f, generator=gen)
        g_idx = g_idx[perm]
    gs = in_f if group_size == -1 else group_size
    groups = in_f // gs
    qweight = pack_bitstream_reference(codes.t().to(torch.int64), bits)
    stored = (zero.t().to(torch.int64) - 1) & ((1 << bits) - 1)
    qzeros = pack_bitstream_reference(stored.t(), bits).t().contiguous()
    assert qzeros.shape == (groups, -(-out_f * bits // 32))
    return GPTQLayer(qweight, qzeros, scale.t().to(torch.float16).contiguous(), g_idx, codes, scale, zero,
                     bits, group_size, w)


def patch_triton_interpreter_for_numpy2() -> None:
    """Triton 3.6's interpreter turns scalar tensors into loop bounds with int(ndarray), which
    NumPy >= 2.4 rejects for 1-element arrays; read the element instead (test-only shim)."""
    import triton.runtime.interpreter as itp

    orig = itp._patch_lang_tensor
    if getattr(orig, "_numpy2_shim", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._numpy2_shim = True
    itp._patch_lang_tensor = patched


def run_interpreted_cases(script: str, timeout: int) -> dict:
    """Run tests/<script> in a fresh process under Triton's interpreter (TRITON_INTERPRET=1 must be set before
    triton is imported) and return the JSON it prints on its `RESULTS ` line."""
    here = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, str(here / script)], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=here.parent, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])
