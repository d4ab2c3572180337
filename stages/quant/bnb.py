"""bitsandbytes baselines (NF4, LLM.int8): quantized at load time by transformers, no calibration.

Core (no files, MLflow or Hydra):
* `check_backend(method, device, dtype)`: one clear ConfigError, before any work, when the
  bitsandbytes package is missing or has no kernel for the scheme on the device (it runs a
  64x64 layer of the scheme there);
* `quantize_at_load(path, method, options, device, dtype)`: `from_pretrained` with a
  `BitsAndBytesConfig` built from the method's config (stages.quant.bnb_options);
* `layer_records` / `size_metrics`: what bitsandbytes stores per Linear (the packed weight and its
  quantization state, exactly the tensors `save_pretrained` writes) and the bits per weight;
* `cast_unquantized(model, dtype)`: every tensor except bitsandbytes' own in `dtype` (and the NF4
  compute dtype), since transformers keeps a pre-quantized checkpoint's stored dtype at load.

`BnbMethod` is what stages.registry.QUANT_METHODS names for bnb_nf4 / bnb_int8: the quantize stage
hands it the whole stage (`run_stage`), as there is no block-by-block work.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.errors import ConfigError
from core.schema import BnbConfig
from stages.quant.bnb_options import BNB_SCHEMES

if TYPE_CHECKING:
    from core.context import StageContext, StageResult
    from core.schema import PipelineConfig

BNB_DIR = "bnb"  # the quantize artifact's save_pretrained folder
BNB_STATE_FILE = "bnb_layers.json"  # the quantize artifact's record (what pack reads first)
INSTALL_HINT = "pip install bitsandbytes==0.50.2 (the project's `bnb` extra)"
PROBE_FEATURES = 64


def bitsandbytes_version(method: str) -> str:
    """The installed bitsandbytes version, or a ConfigError naming quant.method with the install hint."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("quant.method", method, "rtn, gptq or autoround without the bitsandbytes package",
                          INSTALL_HINT, problem="needs the bitsandbytes package, which is not installed")
    from importlib.metadata import version

    return version("bitsandbytes")


def is_bnb_module(module: nn.Module) -> bool:
    """A bitsandbytes Linear (Linear4bit, Linear8bitLt, ...), told apart without importing bitsandbytes."""
    return isinstance(module, nn.Linear) and type(module).__module__.startswith("bitsandbytes")


def _probe_layer(method: str, dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    if BNB_SCHEMES[method].quant_type == "int8":
        return bnb.nn.Linear8bitLt(PROBE_FEATURES, PROBE_FEATURES, bias=False, has_fp16_weights=False)
    return bnb.nn.Linear4bit(PROBE_FEATURES, PROBE_FEATURES, bias=False, quant_type="nf4", compute_dtype=dtype)


def check_backend(method: str, device: str, dtype: torch.dtype) -> str:
    """Quantize and run one small layer of the method's scheme on `device`; returns the bitsandbytes version.

    Raises:
        ConfigError naming quant.method when the package is missing or cannot run the scheme there.
    """
    version = bitsandbytes_version(method)
    try:
        with torch.no_grad():
            layer = _probe_layer(method, dtype).to(device)
            out = layer(torch.randn(2, PROBE_FEATURES, dtype=dtype, device=device))
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError("the probe layer returned non-finite outputs")
    except Exception as exc:  # any failure of the library here means: no usable backend for this scheme
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        raise ConfigError("quant.method", method, f"a scheme that bitsandbytes {version} runs on {device}",
                          "run it on a CUDA machine (run.device=cuda), upgrade bitsandbytes, or use quant=rtn|gptq|autoround",
                          problem=f"cannot run here: bitsandbytes {version} has no {device.split(':')[0]} backend for "
                                  f"{BNB_SCHEMES[method].quant_type} ({msg})") from None
    return version


def quantization_config(method: str, options: "BnbConfig", compute_dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for a bitsandbytes method and its option (quant.double_quant | int8_threshold)."""
    from transformers import BitsAndBytesConfig

    if BNB_SCHEMES[method].quant_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(options.int8_threshold))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=options.double_quant)


def quantize_at_load(path: str, method: str, options: "BnbConfig", device: str, dtype: torch.dtype,
                     revision: Any = None, trust_remote_code: bool = False) -> nn.Module:
    """The model at `path` loaded with bitsandbytes quantization on `device` (unquantized tensors in `dtype`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype, device_map={"": device},
                                                 quantization_config=quantization_config(method, options, dtype),
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_bnb_module(m)}


def stored_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """What bitsandbytes serialises for one Linear (weight and quantization state), bias excluded."""
    return {k: v for k, v in module.state_dict().items() if k != "bias"}


def layer_records(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantized Linear: [out, in], stored bytes and tensor names (what save_pretrained writes)."""
    out = {}
    for name, m in quantized_modules(model).items():
        tensors = stored_tensors(m)
        out[name] = {"shape": [m.out_features, m.in_features], "tensors": sorted(tensors),
                     "bytes": int(sum(t.numel() * t.element_size() for t in tensors.values()))}
    return out


def size_metrics(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Stored bytes of the quantized Linears against their float16 size, and the bits per weight."""
    stored = sum(r["bytes"] for r in records.values())
    weights = sum(r["shape"][0] * r["shape"][1] for r in records.values())
    return {"quantized_mb": round(stored / 10**6, 3), "quantized_fp16_mb": round(2 * weights / 10**6, 3),
            "bits_per_weight": round(8 * stored / weights, 4) if weights else 0.0, "layers": float(len(records))}


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every floating parameter outside bitsandbytes' packed weights in `dtype`; NF4 computes in `dtype` too."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and not (is_bnb_module(module) and name == "weight"):
                p.data = p.data.to(dtype)
        if is_bnb_module(module) and hasattr(module, "compute_dtype"):
            module.compute_dtype = dtype
    model.config.dtype = dtype
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and getattr(qc, "load_in_4bit", False):
        qc.bnb_4bit_compute_dtype = dtype
    return model


def skipped_linears(model: nn.Module) -> list[str]:
    """Linears bitsandbytes left unquantized (transformers keeps the output head in 16-bit)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_bnb_module(m)]


class BnbMethod:
    """quant.method=bnb_nf4 | bnb_int8 (see module doc): the whole quantize stage, no block driver."""

    uses_calibration = False
    needs_fp_targets = False

    @staticmethod
    def preflight(cfg: "PipelineConfig", model: Any) -> None:
        """Before any stage runs: bitsandbytes is installed and runs this scheme on the run's device."""
        from core.device import resolve_device

        device = resolve_device(cfg.run.device)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        check_backend(cfg.quant.method, device, dtype)

    @staticmethod
    def run_stage(ctx: "StageContext") -> "StageResult":
        """Load the model quantized, save it (bnb/) and record its layers (bnb_layers.json)."""
        from core.context import StageResult

        q = ctx.cfg.quant
        version = check_backend(q.method, ctx.device, ctx.torch_dtype())
        t0 = time.perf_counter()
        model = quantize_at_load(ctx.model.path, q.method, q, ctx.device, ctx.torch_dtype(), ctx.model.revision,
                                 ctx.model.trust_remote_code)
        seconds = time.perf_counter() - t0
        records = layer_records(model)
        metrics = {**size_metrics(records), "seconds_total": seconds, "num_layers": float(len(records)),
                   "memory_footprint_mb": round(model.get_memory_footprint() / 10**6, 3)}
        model.save_pretrained(ctx.workdir / BNB_DIR)
        scheme = BNB_SCHEMES[q.method]
        state = {"method": q.method, "quant_type": scheme.quant_type, "bits": scheme.bits,
                 "group_size": scheme.group_size, "bitsandbytes": version, "dtype": ctx.dtype,
                 "options": {k: v for k, v in asdict(q).items() if k not in asdict(BnbConfig())},
                 "quantization_config": model.config.quantization_config.to_dict(),
                 "skipped": skipped_linears(model), "layers": records}
        (ctx.workdir / BNB_STATE_FILE).write_text(json.dumps(state, indent=2, default=str) + "\n")
        ctx.log(f"[quantize] {scheme.title}: {len(records)} Linears, {metrics['bits_per_weight']} bits per weight "
                f"stored, model footprint {metrics['memory_footprint_mb']} MB (bitsandbytes {version})")
        summary = {"method": q.method, "bits": scheme.bits, "group_size": scheme.group_size, "sym": True,
                   "layers": len(records), "skipped": len(state["skipped"]), "bits_per_weight": metrics["bits_per_weight"]}
        return StageResult(metrics=metrics, summary=summary, artifacts=[BNB_STATE_FILE])
