"""Name -> implementation registries for every configurable choice of the stages.

Values are "module:attribute" strings imported on first use, so listing the allowed values
(for config validation and error messages) never imports torch or a heavy backend.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from core.errors import one_of

# calib.source -> loader of raw documents: (CalibConfig) -> list[Document]
CALIB_SOURCES: dict[str, str] = {
    "austen": "stages.calib_sources:load_austen_documents",
    "hub": "stages.calib_sources:load_hub_documents",
    "text": "stages.calib_sources:load_text_documents",
    "jsonl": "stages.calib_sources:load_jsonl_documents",
}

# calib.text_split -> how a text file becomes documents: (str) -> list[str]
CALIB_TEXT_SPLITS: dict[str, str] = {
    "chapter": "stages.calib_sources:split_chapters",
    "paragraph": "stages.calib_sources:split_paragraphs",
    "file": "stages.calib_sources:split_file",
}

# calib.mode -> sampler: (texts, encode, bos_id, CalibConfig) -> CalibSample
CALIB_MODES: dict[str, str] = {
    "doc_prefix": "stages.calibrate:sample_doc_prefix",
    "random_window": "stages.calibrate:sample_random_window",
}

# quant.method -> quantizer over the whole model (see stages.quantize); each method's config class is
# core.schema.QUANT_CONFIGS[method] (tests check that both name the same methods)
QUANT_METHODS: dict[str, str] = {
    "rtn": "stages.quant.rtn:RTNQuantizer",
    "gptq": "stages.quant.gptq:GPTQQuantizer",
    "autoround": "stages.quant.autoround:AutoRoundQuantizer",
    # bitsandbytes: quantized at load time by transformers, whole stage (stages.quant.bnb); no block driver
    "bnb_nf4": "stages.quant.bnb:BnbMethod",
    "bnb_int8": "stages.quant.bnb:BnbMethod",
}

# quant.method -> its own config rules, (PipelineConfig) -> None raising ConfigError (torch-free; run by
# pipeline.validate before any work). Methods without an entry follow the common rules there.
QUANT_CONFIG_CHECKS: dict[str, str] = {
    "bnb_nf4": "stages.quant.bnb_options:check_bnb_config",
    "bnb_int8": "stages.quant.bnb_options:check_bnb_config",
}

# recover.mode -> recovery mode class (constructed as cls(RecoverConfig)); "none" skips the stage
RECOVER_MODES: dict[str, str] = {
    "scales": "stages.recovery.modes:ScalesMode",
    "lora": "stages.recovery.modes:LoraMode",
    "scales_lora": "stages.recovery.modes:ScalesLoraMode",
}

# recover.loss -> target factory: (RecoverConfig, TargetInputs) -> TargetSource
RECOVER_LOSSES: dict[str, str] = {
    "kl": "stages.recovery.targets:distillation_targets",
    "lm": "stages.recovery.targets:lm_targets",
}

# recover.teacher (recover.loss=kl): where the teacher's distribution comes from
RECOVER_TEACHERS: tuple[str, ...] = ("topk", "online")

# recover.schedule -> learning-rate factor (step, total) -> float
RECOVER_SCHEDULES: dict[str, str] = {
    "constant": "stages.recovery.trainer:constant_schedule",
    "linear": "stages.recovery.trainer:linear_schedule",
    "cosine": "stages.recovery.trainer:cosine_schedule",
}

# recover.lora_init: how the adapters start (stages.recovery.modes.LoraMode)
LORA_INITS: tuple[str, ...] = ("peft", "svd")

# pack.format -> packer (auto: the exact layout for the qstate, see stages.formats.choice)
PACK_FORMATS: dict[str, str] = {
    "auto": "stages.formats.choice:pack_auto",
    "gptq": "stages.formats.gptq:pack_gptq",
    "gptq_v2": "stages.formats.gptq:pack_gptq_v2",
    "auto_round": "stages.formats.auto_round:pack_auto_round",
}

# config.json quantization_config.quant_method -> loader of a checkpoint that is not a GPTQ/auto-round layout:
# (path, device, dtype, trust_remote_code) -> model (stages.formats.qlinear.load_quantized_model dispatches)
CHECKPOINT_LOADERS: dict[str, str] = {
    "bitsandbytes": "stages.formats.bnb:load_bnb_checkpoint",
}

# pack.packing_format (auto_round format only): tensor layouts auto-round writes
PACKING_FORMATS: tuple[str, ...] = ("auto", "auto_round:auto_gptq", "auto_round:auto_awq", "auto_round")

# eval.backend -> lm-eval model builder: (EvalTarget, EvalConfig) -> lm_eval LM
EVAL_BACKENDS: dict[str, str] = {
    "hf": "stages.eval.harness:build_hf_lm",
    "vllm": "stages.eval.harness:build_vllm_lm",
}

# eval.task_source -> lm-eval TaskManager builder: () -> TaskManager
EVAL_TASK_SOURCES: dict[str, str] = {
    "local": "stages.eval.tasks:local_task_manager",
    "hub": "stages.eval.tasks:hub_task_manager",
}

# bench.backend -> benchmark backend class ("auto" resolves to one of these; see stages.benchmark)
BENCH_BACKENDS: dict[str, str] = {
    "torch": "stages.bench.torch_backend:TorchBackend",
    "vllm": "stages.bench.vllm_backend:VLLMBackend",
}

# bench.linear_kernel -> how the torch backend computes quantized Linears: every policy is one
# mode of the planner (auto | triton | tinygemm | int8pack | gemlite | tinygemm_triton | dequant; see its docstring)
BENCH_LINEAR_KERNELS: dict[str, str] = {
    name: "stages.kernels.planner:build_kernel_linears"
    for name in ("auto", "triton", "tinygemm", "int8pack", "gemlite", "tinygemm_triton", "dequant")
}


def resolve(registry: Mapping[str, str], key: str, name: str) -> Any:
    """Import and return the implementation registered under `name`.

    Args:
        registry: one of the dicts above.
        key: the config key that chose `name` (for the error message).
        name: the chosen option.
    """
    one_of(key, name, registry)
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)

