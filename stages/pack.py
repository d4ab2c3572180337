"""Pack stage: the quantize stage's codes/scales/zeros -> a loadable checkpoint folder + compatibility report.

Artifact layout (under the stage's store folder):
  checkpoint/    the Hugging Face folder (config.json with quantization_config, safetensors,
                 tokenizer, quantize_config.json or quantization_config.json, packing.json)
  compat.json    which engines/kernels load it (vLLM 0.26, ExLlama-style GPTQ, auto-round),
                 the pack-time exactness check (every layer read back equals the qstate), and the sizes
Downstream stages find the folder with `stages.formats.artifact.checkpoint_dir(ctx.inputs["pack"].path)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Optional

from core.context import StageContext, StageResult
from core.errors import ConfigError
from core.schema import GPTQConfig, PipelineConfig, quant_config_from_record
from core.store import fingerprint
from stages.formats import parse_size
from stages.formats.artifact import CHECKPOINT_DIR, REPORT_FILE, SIZE_METRIC, checkpoint_dir, checkpoint_dtype

MB = 10**6


def _qstate_digest(manifest: dict) -> Optional[str]:
    shas = {o["path"]: o["sha256"] for o in manifest.get("outputs", [])}
    if "qstate.safetensors" in shas and "layers.json" in shas:
        return fingerprint([shas["qstate.safetensors"], shas["layers.json"]])
    return None


def size_metrics(result: Any) -> dict[str, float]:
    """Sizes on disk and the quantized layers' bytes against their float16 size."""
    quant, fp16 = result.quantized_bytes, result.fp16_bytes
    return {
        SIZE_METRIC: round(result.size_on_disk / MB, 3),
        "quantized_mb": round(quant / MB, 3),
        "quantized_fp16_mb": round(fp16 / MB, 3),
        "compression_vs_fp16": round(fp16 / quant, 4) if quant else 0.0,
        "bits_per_weight": round(8 * quant / (fp16 / 2), 4) if fp16 else 0.0,
        "layers": float(len(result.layers)),
    }


def run(ctx: StageContext) -> StageResult:
    """Pack ctx.inputs["quantize"] for ctx.model into checkpoint/ and write compat.json."""
    from stages.formats.compat import compatibility_report, summary_lines
    from stages.formats.source import QStateReader, SourceModel
    from stages.formats.writer import PackOptions
    from stages.recover import attach_adapter, qstate_input
    from stages.registry import PACK_FORMATS, resolve

    from stages.formats.bnb import pack_bnb
    from stages.quant.bnb import BNB_STATE_FILE

    cfg = ctx.cfg.pack
    quantize = ctx.inputs["quantize"]
    if (quantize.path / BNB_STATE_FILE).is_file():  # a bitsandbytes model, not a qstate: its own serialisation
        return pack_bnb(ctx)
    qstate_art = qstate_input(ctx.inputs)  # the recovered qstate when recover.mode=scales ran
    qstate = QStateReader.open(qstate_art.path)
    source = SourceModel.open(ctx.model.path, ctx.model.revision)
    recorded = quantize.manifest.get("config", {}).get("quant")
    recipe = quant_config_from_record(recorded) if recorded else ctx.cfg.quant
    options = PackOptions(checkpoint_dtype(ctx.cfg.model.dtype, source.dtype()), parse_size(cfg.max_shard_size),
                          cfg.packing_format)
    identity = fingerprint({"qstate": _qstate_digest(qstate_art.manifest) or qstate.digest(),
                            "model": source.identity(), "pack": asdict(cfg), "dtype": str(options.dtype)})
    packer = resolve(PACK_FORMATS, "pack.format", cfg.format)
    result = packer(qstate, source, checkpoint_dir(ctx.workdir), options, recipe, identity, ctx.log)
    attach_adapter(ctx.inputs, ctx.workdir)  # recover.mode=lora: the PEFT adapter beside checkpoint/
    report = compatibility_report(result)
    metrics = size_metrics(result)
    record = {"checkpoint": CHECKPOINT_DIR, "identity": identity, "files": result.files, "metrics": metrics,
              "quantization_config": result.quantization_config, **report}
    (ctx.workdir / REPORT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    lines = summary_lines(report)
    ctx.log(f"[pack] {result.packing_format}: {metrics['size_mb']} MB on disk; vLLM 0.26: {lines['vllm']}; "
            f"exact: {lines['exact']}")
    metrics.update({"vllm_loads": float(report["vllm"]["loads"]),
                    "verified_layers": float(report["exact"]["verified_layers"])})
    summary = {"format": result.packing_format, "size_mb": metrics["size_mb"],
               "vs_fp16": f"{metrics['compression_vs_fp16']}x smaller (quantized layers)", **lines}
    return StageResult(metrics=metrics, summary=summary, artifacts=[REPORT_FILE, f"{CHECKPOINT_DIR}/config.json"])


def run_sym_flags(q: Any) -> list[bool]:
    """The sym flag of every scheme the quant config can produce (the run's and each override's)."""
    return [q.sym] + [o.sym for o in q.overrides if o.sym is not None and not o.skip]


def check_exact(p: Any, q: Any) -> None:
    """A GPTQ v1 layout (pack.format=gptq, or auto_round with auto_round:auto_gptq) cannot hold asym zeros."""
    if all(run_sym_flags(q)):
        return
    if p.format == "gptq":
        raise ConfigError("pack.format", "gptq", "auto, gptq_v2 or auto_round for a run with asym layers: GPTQ v1 "
                          "stores zero-1 and cannot hold an asym zero point of 0",
                          "use pack.format=auto (exact for every scheme; asym 4-bit becomes auto-round's AWQ layout, "
                          "which vLLM serves), pack.format=gptq_v2, or quant.sym=true")
    if p.format == "auto_round" and p.packing_format == "auto_round:auto_gptq":
        raise ConfigError("pack.packing_format", p.packing_format, "auto, auto_round:auto_awq or auto_round for a "
                          "run with asym layers (auto_gptq stores zero-1 and cannot hold a zero point of 0)",
                          "e.g. pack.packing_format=auto")


def preflight(cfg: PipelineConfig, model: Any, spec: Any) -> None:
    """Config combinations the chosen format cannot express, before any stage runs."""
    p, q = cfg.pack, cfg.quant
    parse_size(p.max_shard_size)
    check_exact(p, q)
    if p.format != "auto_round" and p.packing_format != "auto":
        raise ConfigError("pack.packing_format", p.packing_format, f"auto with pack.format={p.format}",
                          "pack.packing_format applies to pack.format=auto_round; e.g. pack.packing_format=auto")
    # GPTQ's act_order permutes groups (g_idx) unless static_groups keeps them in natural order.
    if p.format == "auto_round" and isinstance(q, GPTQConfig) and q.act_order and not q.static_groups:
        raise ConfigError("pack.format", p.format, "gptq when quant.act_order=true (auto-round's format has no g_idx)",
                          "e.g. pack.format=gptq, quant.static_groups=true or quant.act_order=false")
    if p.packing_format == "auto_round:auto_awq":
        widths = {q.bits} | {o.bits for o in q.overrides if o.bits is not None and not o.skip}
        if widths != {4}:
            raise ConfigError("pack.packing_format", p.packing_format,
                              f"4-bit layers only (the run has {sorted(widths)}-bit layers)",
                              "e.g. pack.packing_format=auto_round (any width) or pack.format=gptq")
    if q.quantize_lm_head and model is not None:
        from core.models import load_config

        if getattr(load_config(model), "tie_word_embeddings", False):
            raise ConfigError("quant.quantize_lm_head", True, "false for this model (its lm_head is tied to the "
                              "input embeddings; a packed checkpoint cannot quantize a tied head)",
                              "e.g. quant.quantize_lm_head=false")
