"""Take a loaded Hugging Face Llama-layout model apart for the decode engine.

Plain `nn.Linear`s become `DenseWeight`s; bitsandbytes Linears become `ModuleWeight`s (their own
kernels); quantized Linears (`stages.formats.qlinear.QuantLinear`:
GPTQ-layout `qweight`/`qzeros`/`scales`/`g_idx` with `bits`, `group_size`, `zero_offset`) become
`TritonWeight`s over the very same tensors, so the benchmark runs exactly the loaded packed
checkpoint. q/k/v and gate/up are fused per layer; the HF modules are released as they are
taken so peak memory stays near one model.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from core.errors import InputError
from stages.bench.engine import SUPPORTED_MODEL_TYPES, DecoderSpec
from stages.kernels.linear import DenseWeight, ModuleWeight, Source, fuse_sources
from stages.kernels.tiles import from_gptq
from stages.quant.bnb import is_bnb_module

SEQ_DEPENDENT_ROPE = ("dynamic", "longrope")


def is_quantized_linear(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("qweight", "qzeros", "scales"))


def source_of(module: nn.Module, dtype: torch.dtype) -> tuple[Source, Optional[torch.Tensor]]:
    """(weight source, bias) of one Linear-like module, on the module's device."""
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().to(dtype)
    if is_bnb_module(module):  # bitsandbytes: runs its own kernels; the engine adds the bias
        module.bias = None
        return ModuleWeight([module]), bias
    if is_quantized_linear(module):
        bits, gs = getattr(module, "bits", None), getattr(module, "group_size", None)
        if bits is None or gs is None:
            raise InputError(f"quantized module {type(module).__name__} has no bits/group_size attributes")
        g_idx = getattr(module, "g_idx", None)
        offset = int(getattr(module, "zero_offset", 1))  # stages.formats.qlinear.QuantLinear says; GPTQ v1 is 1
        return from_gptq(module.qweight, module.qzeros, module.scales, g_idx, int(bits), int(gs), offset), bias
    if isinstance(module, nn.Linear):
        return DenseWeight(module.weight.detach().to(dtype)), bias
    raise InputError(f"cannot benchmark a {type(module).__name__} as a Linear layer")


def _fused(modules: list[nn.Module], dtype: torch.dtype) -> tuple[Source, Optional[torch.Tensor]]:
    parts = [source_of(m, dtype) for m in modules]
    biases = [b for _, b in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(s.out_features, dtype=dtype, device=_device(s))
                          for (s, _), b in zip(parts, biases)])
    return fuse_sources([s for s, _ in parts]), bias


def _device(src: Source) -> torch.device:
    if isinstance(src, ModuleWeight):
        return src.modules[0].weight.device
    return src.weight.device if isinstance(src, DenseWeight) else src.qweight.device


def check_supported(config, max_len: int) -> None:
    """Model types the engine reproduces, and a context long enough for the workload."""
    mtype = getattr(config, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"the torch benchmark backend runs Llama-layout models ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                         f"this model is {mtype!r}. Use bench.backend=vllm on a GPU machine")
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and max_len > window:
        raise InputError(f"the workload needs {max_len} positions but the model attends through a sliding window "
                         f"of {window}; shorten bench.input_len/output_len")


def rope_tables(model: nn.Module, max_len: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, head_dim] from the model's own rotary embedding."""
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in SEQ_DEPENDENT_ROPE:
        raise InputError(f"rope_type={rope_type} depends on the sequence length; the torch backend supports static RoPE")
    pos = torch.arange(max_len, device=device)[None]
    dummy = torch.zeros(1, device=device, dtype=dtype)
    cos, sin = rotary(dummy, pos)
    return cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous()


def decoder_from_hf(model: nn.Module, dtype: torch.dtype, max_len: int) -> tuple[DecoderSpec, dict]:
    """Split a loaded model (already on its device) into a DecoderSpec and fused Linear sources.

    Args:
        model: a *ForCausalLM of a supported type; its Linears are consumed (deleted).
        dtype: activation dtype; max_len: positions the workload needs.
    Returns:
        (spec, {"layers.{i}.qkv" | ".o" | ".gate_up" | ".down" | "lm_head": (source, bias)})
    """
    cfg = model.config
    check_supported(cfg, max_len)
    inner = model.model
    device = inner.embed_tokens.weight.device
    sources: dict = {}
    norms = []
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        sources[f"layers.{i}.qkv"] = _fused([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
        sources[f"layers.{i}.o"] = source_of(attn.o_proj, dtype)
        sources[f"layers.{i}.gate_up"] = _fused([mlp.gate_proj, mlp.up_proj], dtype)
        sources[f"layers.{i}.down"] = source_of(mlp.down_proj, dtype)
        for holder, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                delattr(holder, n)
        norms.append((layer.input_layernorm.weight.detach().to(dtype), layer.post_attention_layernorm.weight.detach().to(dtype)))
    sources["lm_head"] = source_of(model.lm_head, dtype)
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    cos, sin = rope_tables(model, max_len, dtype, device)
    spec = DecoderSpec(cfg.num_hidden_layers, n_heads, cfg.num_key_value_heads or n_heads, head_dim,
                       float(cfg.rms_norm_eps), inner.embed_tokens.weight.detach().to(dtype), norms,
                       inner.norm.weight.detach().to(dtype), cos, sin)
    return spec, sources
