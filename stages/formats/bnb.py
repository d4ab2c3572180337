"""bitsandbytes checkpoints: the pack stage for a bnb quantize artifact, and the loader evaluate/benchmark use.

A bitsandbytes model is not a qstate (integer codes + scales + zeros): the quantize stage saved it
with transformers' `save_pretrained` (stages.quant.bnb). `pack_bnb(ctx)` copies that serialisation:
bitsandbytes' tensors as they are, every other floating tensor in the checkpoint dtype (the rule
of every format, stages.formats.artifact.checkpoint_dtype), shards of pack.max_shard_size, config.json (dtype
and NF4 compute dtype set accordingly) and the tokenizer files. (Loading a pre-quantized model and
calling save_pretrained again fails in transformers 5.24: its bitsandbytes load conversion has no
reverse.) Then it checks the result: "exact" for this format means that the checkpoint, reloaded
through transformers as evaluate and benchmark load it, holds every quantized Linear's stored
tensors (packed weight, absmax, quant map, quant state; SCB for int8) bit for bit as the
quantize stage produced them. compat.json has the same keys as for the other formats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from core.context import StageContext, StageResult
from core.errors import InputError
from stages.formats.compat import VLLM_VERSION, summary_lines
from stages.formats.source import SourceModel, read_safetensors_headers
from stages.quant.bnb import (BNB_DIR, BNB_STATE_FILE, cast_unquantized, check_backend, quantized_modules,
                              size_metrics, stored_tensors)

FORMAT = "bitsandbytes"
MAX_LISTED = 5


def bnb_method(quantization_config: dict[str, Any]) -> str:
    """bnb_nf4 | bnb_int8 from a config.json quantization_config (quant_method bitsandbytes)."""
    if quantization_config.get("load_in_8bit"):
        return "bnb_int8"
    if quantization_config.get("load_in_4bit") and quantization_config.get("bnb_4bit_quant_type") == "nf4":
        return "bnb_nf4"
    raise InputError(f"bitsandbytes checkpoint with an unsupported scheme: {quantization_config}; "
                     "this project writes and reads NF4 (load_in_4bit, nf4) and LLM.int8 (load_in_8bit)")


def load_bnb_checkpoint(path: str | Path, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                        trust_remote_code: bool = False) -> torch.nn.Module:
    """A bitsandbytes checkpoint folder through transformers, on `device`, computing in `dtype`.

    Raises:
        ConfigError before loading when bitsandbytes cannot run the checkpoint's scheme on `device`.
    """
    from transformers import AutoModelForCausalLM

    qc = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    dtype = dtype or torch.bfloat16
    check_backend(bnb_method(qc), device, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map={"": device},
                                                 trust_remote_code=trust_remote_code)
    return cast_unquantized(model, dtype).eval()


def _read_tensors(folder: Path, names: set[str]) -> dict[str, torch.Tensor]:
    headers = read_safetensors_headers(folder)
    out = {}
    for name in sorted(names & set(headers)):
        with safe_open(str(folder / headers[name].file), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def verify_reloaded(quantized: Path, checkpoint: Path, layers: dict[str, dict[str, Any]]) -> int:
    """How many quantized Linears, reloaded from `checkpoint` through transformers, store exactly the tensors
    of the quantize artifact `quantized`; InputError naming the first differences otherwise."""
    model = load_bnb_checkpoint(checkpoint, "cpu", torch.float32)
    found = quantized_modules(model)
    keys = {f"{name}.{t}" for name, rec in layers.items() for t in rec["tensors"]}
    expected = _read_tensors(quantized, keys)
    problems = []
    for name, rec in layers.items():
        if name not in found:
            problems.append(f"{name}: not a bitsandbytes Linear after reloading")
            continue
        tensors = stored_tensors(found[name])
        for t in rec["tensors"]:
            want, got = expected.get(f"{name}.{t}"), tensors.get(t)
            if want is None or got is None or want.dtype != got.dtype or not torch.equal(want, got.cpu()):
                problems.append(f"{name}.{t}")
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise InputError(f"the bitsandbytes checkpoint in {checkpoint} does not reload to the quantize stage's "
                         f"tensors: {'; '.join(problems[:MAX_LISTED])}{more}; re-run with run.force=[quantize]")
    return len(layers)


def vllm_report(method: str, model_type: Optional[str], layers: int) -> dict[str, Any]:
    """What vLLM 0.26 does with a pre-quantized bitsandbytes checkpoint (read from its bitsandbytes loader)."""
    eager = "; LLM.int8: eager mode only (vLLM turns CUDA graphs off)" if method == "bnb_int8" else ""
    return {"loads": True, "quantization": "bitsandbytes", "kernels": {f"bitsandbytes {method[4:]}": layers},
            "reason": f"vLLM {VLLM_VERSION} reads quant_method=bitsandbytes and switches to its bitsandbytes loader "
                      f"(pre-quantized NF4 and int8 weights; needs bitsandbytes >= 0.48.1 and an architecture with "
                      f"packed_modules_mapping, as Llama has; model_type {model_type}; no tensor parallelism){eager}"}


def compatibility_report(method: str, model_type: Optional[str], verified: int, layers: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "vllm": {"version": VLLM_VERSION, **vllm_report(method, model_type, layers)},
        "exllama_gptq": {"loads": False, "reason": "not the GPTQ layout (bitsandbytes' own serialisation)"},
        "auto_round_loader": {"version": "0.16.1", "cpu": False, "reason": "not an auto-round checkpoint"},
        "transformers": "quant_method bitsandbytes: from_pretrained with the bitsandbytes package installed; "
                        "stages.formats.qlinear.load_quantized_model hands it to transformers",
        "exact": {"verified_layers": verified, "layers": layers,
                  "meaning": f"{verified} of {layers} quantized Linears, reloaded from the checkpoint through "
                             "transformers, store the quantize stage's bitsandbytes tensors (packed weight, absmax, "
                             "quant map, quant state / SCB) bit for bit"},
    }


def _folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 10**6, 3)


def checkpoint_config(saved: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The saved config.json with the checkpoint dtype (and NF4's compute dtype) set to `dtype`."""
    name = str(dtype).removeprefix("torch.")
    cfg = {**saved, "dtype": name, "torch_dtype": name}  # older readers look at torch_dtype
    qc = dict(cfg["quantization_config"])
    if qc.get("load_in_4bit"):
        qc["bnb_4bit_compute_dtype"] = name
    cfg["quantization_config"] = qc
    return cfg


def write_bnb_checkpoint(saved: Path, out: Path, quantized_keys: set[str], dtype: torch.dtype,
                         max_shard_bytes: int, aux_files: list[Path]) -> list[str]:
    """Copy a save_pretrained bitsandbytes folder into `out`: bitsandbytes' tensors as they are, every other
    floating tensor in `dtype`, shards of at most max_shard_bytes, config.json, tokenizer files.

    Returns:
        The file names written.
    """
    import shutil

    from stages.formats.writer import ShardWriter, _natural_key

    headers = read_safetensors_headers(saved)
    missing = sorted(quantized_keys - set(headers))
    if missing:
        raise InputError(f"{saved} lacks bitsandbytes tensors recorded by the quantize stage, e.g. {missing[:3]}; "
                         "re-run with run.force=[quantize]")
    shutil.rmtree(out, ignore_errors=True)  # a crashed earlier attempt's partial folder
    out.mkdir(parents=True)
    writer = ShardWriter(out, max_shard_bytes)
    for name in sorted(headers, key=_natural_key):
        with safe_open(str(saved / headers[name].file), framework="pt") as f:
            t = f.get_tensor(name)
        writer.add(name, t if name in quantized_keys or not t.is_floating_point() else t.to(dtype))
    writer.finish()
    config = checkpoint_config(json.loads((saved / "config.json").read_text()), dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in [saved / "generation_config.json", *aux_files]:
        if path.is_file() and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)
    return sorted(p.name for p in out.iterdir() if p.is_file())


def pack_bnb(ctx: StageContext) -> StageResult:
    """The pack stage for a bitsandbytes quantize artifact (see module doc)."""
    from stages.formats import parse_size
    from stages.formats.artifact import REPORT_FILE, SIZE_METRIC, checkpoint_dir, checkpoint_dtype

    art = ctx.inputs["quantize"].path
    state = json.loads((art / BNB_STATE_FILE).read_text())
    layers = state["layers"]
    source = SourceModel.open(ctx.model.path, ctx.model.revision)
    dtype = checkpoint_dtype(ctx.cfg.model.dtype, source.dtype())
    out = checkpoint_dir(ctx.workdir)
    check_backend(state["method"], "cpu", torch.float32)  # the exactness check reloads on the CPU
    keys = {f"{name}.{t}" for name, rec in layers.items() for t in rec["tensors"]}
    files = write_bnb_checkpoint(art / BNB_DIR, out, keys, dtype, parse_size(ctx.cfg.pack.max_shard_size),
                                 source.aux_files())
    verified = verify_reloaded(art / BNB_DIR, out, layers)
    report = compatibility_report(state["method"], source.config.get("model_type"), verified, len(layers))
    sizes = size_metrics(layers)
    metrics = {SIZE_METRIC: _folder_mb(out), **sizes,
               "compression_vs_fp16": round(sizes["quantized_fp16_mb"] / sizes["quantized_mb"], 4),
               "vllm_loads": 1.0, "verified_layers": float(verified)}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    record = {"checkpoint": out.name, "files": files, "metrics": metrics, "quantization_config": qc, **report}
    (ctx.workdir / REPORT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    lines = summary_lines(report)
    ctx.log(f"[pack] {FORMAT} ({state['method']}): {metrics['size_mb']} MB on disk, {sizes['bits_per_weight']} bits "
            f"per quantized weight; vLLM {VLLM_VERSION}: {lines['vllm']}; exact: {lines['exact']}")
    summary = {"format": f"{FORMAT} {state['quant_type']}", "size_mb": metrics["size_mb"],
               "vs_fp16": f"{metrics['compression_vs_fp16']}x smaller (quantized layers)", **lines}
    return StageResult(metrics=metrics, summary=summary, artifacts=[REPORT_FILE, f"{out.name}/config.json"])
