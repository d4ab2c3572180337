"""Which engines and kernels can load a packed checkpoint, predicted from its layers.

The rules are read from the sources of the versions the project targets (docs/formats.md
cites the files): vLLM 0.26.0 (the GPU machine's), Intel auto-round 0.16.1's own loader,
and the classic ExLlama-derived GPTQ GEMM (2/3/4/8-bit, v1 zeros). The report also records
the pack-time exactness check (every layer read back equals the qstate).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from stages.formats.auto_round import AUTO_AWQ, AUTO_GPTQ, AUTO_ROUND
from stages.formats.gptq import FUSED_FAMILIES
from stages.formats.writer import LayerRecord, PackResult
from stages.quant.base import LayerScheme

VLLM_VERSION = "0.26.0"
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MACHETE_GROUP_SIZES = (-1, 64, 128)  # fp16/bf16 activations
MACHETE_BLOCK = (64, 128)  # in_features % 64, out_features % 128
MARLIN_SYM_BITS = (4, 8)  # uint4b8, uint8b128 (no runtime zero points)


def _vllm_units(layers: dict[str, LayerRecord], skipped: list[str]
                ) -> tuple[dict[str, tuple[LayerScheme, bool, int, int]], list[str]]:
    """vLLM's linear layers: q/k/v and gate/up fused into one (in, sum of outs).

    A family mixing schemes, or quantized and unquantized members, is a problem: vLLM gives a
    fused layer one quantization method.
    """
    units: dict[str, tuple[LayerScheme, bool, int, int]] = {}
    problems: list[str] = []
    skipped_set = set(skipped)
    members: dict[str, list[str]] = defaultdict(list)
    leaf_to_family = {leaf: fused for fused, leaves in FUSED_FAMILIES.items() for leaf in leaves}
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        fused = leaf_to_family.get(leaf)
        if fused:
            members[f"{parent}.{fused}"].append(name)
        else:
            r = layers[name]
            units[name] = (r.scheme, r.act_order, r.shape[1], r.shape[0])
    for unit, names in members.items():
        parent, _, fused = unit.rpartition(".")
        left_out = [f"{parent}.{leaf}" for leaf in FUSED_FAMILIES[fused] if f"{parent}.{leaf}" in skipped_set]
        if left_out:
            problems.append(f"{unit}: some but not all shards are quantized ({', '.join(left_out)} left unquantized)")
            continue
        schemes = {(layers[n].scheme, layers[n].act_order) for n in names}
        if len(schemes) > 1:
            problems.append(f"{unit} fuses {', '.join(sorted(names))} with different schemes")
            continue
        s, act = schemes.pop()
        units[unit] = (s, act, layers[names[0]].shape[1], sum(layers[n].shape[0] for n in names))
    return units, problems


def hopper_kernel(scheme: LayerScheme, in_f: int, out_f: int) -> str:
    """Machete when its group sizes and tile shape fit (SM90), else Marlin (zero-padded to its tiles)."""
    if scheme.group_size in MACHETE_GROUP_SIZES and in_f % MACHETE_BLOCK[0] == 0 and out_f % MACHETE_BLOCK[1] == 0:
        return "Machete"
    return "Marlin"


def _marlin_refusal(s: LayerScheme, awq: bool) -> str | None:
    if awq:
        if s.bits != 4:
            return f"AWQ Marlin takes 4-bit weights, not {s.bits}-bit"
    elif not s.sym or s.bits not in MARLIN_SYM_BITS:
        return (f"Unsupported quantization config: bits={s.bits}, sym={s.sym} (vLLM {VLLM_VERSION} serves GPTQ "
                "weights only as sym 4/8-bit through Marlin-family kernels)")
    if s.group_size not in MARLIN_GROUP_SIZES:
        return f"Marlin does not support group_size = {s.group_size} (only {list(MARLIN_GROUP_SIZES)})"
    return None


def vllm_report(result: PackResult) -> dict[str, Any]:
    """What vLLM 0.26 does with this checkpoint on a Hopper GPU (H100/H200)."""
    fmt = result.packing_format
    method = "auto_gptq" if fmt in ("gptq", "gptq_v2") else "inc"
    if fmt == AUTO_ROUND:
        return {"loads": False, "quantization": method, "kernels": {},
                "reason": f"Unsupported packing_format: {AUTO_ROUND} (vLLM's INC config takes only "
                          f"{AUTO_GPTQ} and {AUTO_AWQ}); use pack.packing_format=auto for sym or 4-bit asym"}
    qc = result.quantization_config
    if fmt in ("gptq", "gptq_v2") and (int(qc["bits"]) not in MARLIN_SYM_BITS or not qc["sym"] or fmt == "gptq_v2"):
        return {"loads": False, "quantization": method, "kernels": {},
                "reason": f"Unsupported quantization config: bits={qc['bits']}, sym={qc['sym']} (vLLM {VLLM_VERSION} "
                          "serves GPTQ weights only as sym 4/8-bit through Marlin-family kernels; asym 4-bit: "
                          "pack.format=auto writes auto-round's AWQ layout, which it serves)"}
    units, problems = _vllm_units(result.layers, result.extras.get("skipped", []))
    kernels: dict[str, int] = defaultdict(int)
    for unit, (s, act, in_f, out_f) in sorted(units.items()):
        refusal = _marlin_refusal(s, fmt == AUTO_AWQ)
        if refusal:
            problems.append(f"{unit}: {refusal}")
            continue
        if act and (out_f % 64 or in_f % 128):
            problems.append(f"{unit}: act-order Marlin needs out%64 == 0 and in%128 == 0, got [{out_f}, {in_f}]")
            continue
        kernels[hopper_kernel(s, in_f, out_f)] += 1
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        return {"loads": False, "quantization": method, "kernels": dict(kernels),
                "reason": "; ".join(problems[:3]) + more}
    return {"loads": True, "quantization": method, "kernels": dict(kernels),
            "reason": "Machete needs SM90 (H100/H200), group size -1/64/128, in%64 and out%128; other layers "
                      "and other GPUs use Marlin"}


def exllama_report(result: PackResult) -> dict[str, Any]:
    """The ExLlama-derived GPTQ GEMM (2/3/4/8-bit, sym or asym, reads zero+1): GPTQ layout with v1 zeros."""
    if result.packing_format not in ("gptq", AUTO_GPTQ):  # gptq_v2 keeps zeros as they are
        return {"loads": False, "reason": f"packing_format {result.packing_format} is not the GPTQ v1 layout"}
    bad = sorted({r.scheme.bits for r in result.layers.values()} - {2, 3, 4, 8})
    if bad:
        return {"loads": False, "reason": f"{bad}-bit layers"}
    return {"loads": True, "reason": "GPTQ v1 layout, 2/3/4/8-bit (vLLM <= 0.10 `gptq`, AutoGPTQ/GPTQModel torch/"
                                     "triton/cuda kernels; their exllama v1/v2 kernels take 4-bit only)"}


def auto_round_loader_report(result: PackResult) -> dict[str, Any]:
    """auto-round 0.16.1 loading through transformers' AutoRoundConfig (backend torch), observed on CPU."""
    fmt = result.packing_format
    asym = any(not r.scheme.sym for r in result.layers.values())
    if fmt == AUTO_AWQ or (fmt in ("gptq", AUTO_GPTQ) and asym):
        return {"cpu": False, "reason": "its CPU kernels for zero-point layouts (ark) need the extra package "
                "auto-round-lib; without it the loader falls back to `auto_round:fake`, whose forward crashes "
                "(act_data_type is None: TypeError in get_quant_func). CUDA: gptqmodel/awq kernels needed"}
    if any(r.act_order for r in result.layers.values()):
        return {"cpu": False, "reason": "act-order g_idx: its torch kernels assume natural group order"}
    return {"cpu": True, "reason": "backend torch: auto_round:torch_zp (sym GPTQ layout) or auto_round:torch "
                                   "(zeros as they are)"}


def exactness_report(result: PackResult) -> dict[str, Any]:
    """The pack-time check: every packed layer was unpacked from the written files and equals the qstate."""
    n = int(result.extras.get("verified_layers", 0))
    return {"verified_layers": n, "layers": len(result.layers),
            "meaning": f"{n} of {len(result.layers)} quantized layers read back from the checkpoint equal the "
                       "quantize stage's codes, fp16 scales and zero points bit for bit"}


def compatibility_report(result: PackResult) -> dict[str, Any]:
    """Per engine: can it load this checkpoint, with which kernel, or exactly why not."""
    return {
        "format": result.packing_format,
        "vllm": {"version": VLLM_VERSION, **vllm_report(result)},
        "exllama_gptq": exllama_report(result),
        "auto_round_loader": {"version": "0.16.1", **auto_round_loader_report(result)},
        "transformers": "quant_method gptq needs the gptqmodel package; auto-round needs auto-round; "
                        "stages.formats.qlinear.load_quantized_model needs neither",
        "exact": exactness_report(result),
    }


def summary_lines(report: dict[str, Any]) -> dict[str, str]:
    """Short strings for the stage summary table."""
    v = report["vllm"]
    kernels = ", ".join(f"{k} x{n}" for k, n in sorted(v["kernels"].items())) or "-"
    return {
        "vllm": f"loads ({v['quantization']}: {kernels})" if v["loads"] else f"refuses: {v['reason'][:160]}",
        "exllama_gptq": "loads" if report["exllama_gptq"]["loads"] else "no",
        "auto_round_cpu": "loads" if report["auto_round_loader"]["cpu"] else "no",
        "exact": f"{report['exact']['verified_layers']}/{report['exact']['layers']} layers verified",
    }
