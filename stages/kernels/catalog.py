"""Which low-bit kernel can take which layer, and the errors for a policy that names one that cannot.

A forced policy (`bench.linear_kernel=triton|tinygemm|int8pack|gemlite|tinygemm_triton`)
needs its kernel for every quantized layer group; where the kernel cannot take a group
(bits, group size, act-order, dtype, device, package missing) the benchmark stops with one
error naming the group, the reason and the kernels that can take it. `auto` never errors:
it uses what is available, and a group no kernel takes runs the reference dequantization
with the reason logged (`stages.kernels.planner`).
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from core.errors import ConfigError
from stages.kernels import gemlite_linear, int4
from stages.kernels.linear import int8_reason
from stages.kernels.tiles import TritonWeight

# forced policy -> the weight formats it needs (format names as in stages.kernels.linear.FORMAT_OF)
POLICY_FORMATS: dict[str, tuple[str, ...]] = {
    "triton": ("gptq",),
    "tinygemm": ("tinygemm",),
    "int8pack": ("int8pack",),
    "gemlite": ("gemlite",),
    "tinygemm_triton": ("tinygemm", "gptq"),
}
FORMAT_KERNEL = {"gptq": "triton", "tinygemm": "tinygemm", "int8pack": "int8pack", "gemlite": "gemlite"}


def triton_reason(device: str) -> Optional[str]:
    if not str(device).startswith("cuda"):
        return "the Triton kernel runs on CUDA devices"
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    return None


def format_reasons(w: TritonWeight, dtype: torch.dtype, device: str) -> dict[str, Optional[str]]:
    """Weight format -> None when its kernel can take this layer here, else why not."""
    cuda = str(device).startswith("cuda")
    tiny = int4.unsupported_reason(w.bits, w.group_size, w.in_features, w.out_features, w.g_idx is None, dtype,
                                   str(device))
    eight = int8_reason(w)
    glite = gemlite_linear.available() or gemlite_linear.unsupported_reason(w, dtype)
    off_cuda = None if cuda else "needs a CUDA device"
    return {"gptq": triton_reason(device), "tinygemm": off_cuda or tiny, "int8pack": off_cuda or eight,
            "gemlite": glite}


def policy_error(policy: str, group: str, reasons: dict[str, Optional[str]], detail: str = "") -> ConfigError:
    """The one error for a forced policy whose kernel cannot serve a layer group."""
    usable = [FORMAT_KERNEL[f] for f, r in reasons.items() if r is None] + ["dequant"]
    missing = [f"{FORMAT_KERNEL[f]}: {reasons[f] or detail}" for f in POLICY_FORMATS[policy] if reasons[f] or detail]
    return ConfigError("bench.linear_kernel", policy, f"the kernels that can take {group} here: {', '.join(usable)}",
                       "use bench.linear_kernel=auto (picks among them by measurement) or one of those",
                       problem=f"cannot run {group} ({'; '.join(missing)})")


def package_problem(policy: str) -> Optional[str]:
    """Why a forced policy cannot run at all on this installation (checked before any work), or None."""
    if policy == "gemlite" and importlib.util.find_spec("gemlite") is None:
        return f"the gemlite package is not installed ({gemlite_linear.INSTALL_HINT})"
    if policy in ("triton", "tinygemm_triton") and importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    return None
