"""Convert a parsed GGUF file into a Hugging Face config, float32 state dict and tokenizer.

The fast path behind model.source=gguf: the file is read once (`pipeline.gguf_reader`), tensors
are dequantized by gguf-py and renamed to Hugging Face names here, and the tokenizer is built by
transformers' own GGUF tokenizer converter. It produces exactly what
`from_pretrained(gguf_file=...)` produces (a test checks every tensor bit for bit) at a fraction of
the cost. `plan_conversion` returns the reason a file is not covered, and the caller then uses
transformers' loader instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from pipeline.gguf_reader import GGUFFile, dequantizable_types, ggml_type_name

if TYPE_CHECKING:
    import torch

# llama.cpp tensor name (without ".weight") -> Hugging Face parameter name, Llama layout
_LLAMA_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def llama_hf_name(gguf_name: str) -> Optional[str]:
    """The Hugging Face name of a llama.cpp tensor, or None when the Llama layout has none."""
    if (m := _BLOCK_NAME.fullmatch(gguf_name)) and m[2] in _LLAMA_BLOCK:
        return f"model.layers.{m[1]}.{_LLAMA_BLOCK[m[2]]}.weight"
    stem = gguf_name.removesuffix(".weight")
    return f"{_LLAMA_GLOBAL[stem]}.weight" if gguf_name.endswith(".weight") and stem in _LLAMA_GLOBAL else None


def unpermute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row interleave of a Q or K projection (rows grouped per head)."""
    dim = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


def _transformers_gguf(name: str) -> Any:
    """One of transformers' GGUF tables/functions: `integrations.gguf` in newer releases, `integrations.ggml`
    (re-exported by `integrations`) in older ones such as 5.17."""
    import importlib

    for module in ("transformers.integrations.gguf", "transformers.integrations.ggml"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"transformers has no GGUF helper {name!r} in integrations.gguf or integrations.ggml")


def _llama_config(gguf: GGUFFile) -> dict[str, Any]:
    """The config dict transformers' GGUF loader builds for a llama file, from its own key table."""
    GGUF_CONFIG_MAPPING = _transformers_gguf("GGUF_CONFIG_MAPPING")
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in gguf.tensors}
    for key, value in gguf.metadata.items():
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)  # general.*, llama.*, tokenizer.* ids
        if renamed is None or renamed == -1:
            continue
        config[renamed] = value[0] if isinstance(value, list) and len(value) == 1 else value
    if "vocab_size" not in config:  # older files: the vocabulary size is the token count
        config["vocab_size"] = len(gguf.metadata.get("tokenizer.ggml.tokens", []))
    return config


def _llama_tensor(gguf: GGUFFile, name: str, config: dict[str, Any]) -> np.ndarray:
    weights = gguf.dequantize(name)
    if ".attn_q." in name:
        return unpermute_rows(weights, config["num_attention_heads"])
    if ".attn_k." in name:
        return unpermute_rows(weights, config["num_key_value_heads"])
    return weights


def _llama_unsupported(gguf: GGUFFile) -> Optional[str]:
    if "mistral" in str(gguf.metadata.get("general.name", "")).lower():
        return "a Mistral model stored as llama (transformers maps it to the mistral architecture)"
    for key in ("llama.attention.head_count", "llama.attention.head_count_kv"):
        if key not in gguf.metadata:
            return f"metadata key {key} is missing"
    for name in gguf.tensors:
        if llama_hf_name(name) is None:
            return f"tensor {name} has no Llama-layout name"
    return None


@dataclass(frozen=True)
class ArchConverter:
    """How one llama.cpp architecture becomes a Hugging Face model."""

    unsupported: Callable[[GGUFFile], Optional[str]]  # reason the file is not covered, or None
    config: Callable[[GGUFFile], dict[str, Any]]
    hf_name: Callable[[str], Optional[str]]
    tensor: Callable[[GGUFFile, str, dict[str, Any]], np.ndarray]


GGUF_ARCHITECTURES: dict[str, ArchConverter] = {
    "llama": ArchConverter(_llama_unsupported, _llama_config, llama_hf_name, _llama_tensor),
}


def plan_conversion(gguf: GGUFFile) -> tuple[Optional[ArchConverter], str]:
    """(converter, "") when the fast path covers this file, else (None, the reason it does not)."""
    arch = gguf.metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        return None, f"architecture {arch!r} (covered: {', '.join(GGUF_ARCHITECTURES)})"
    unknown = sorted({info.ggml_type for info in gguf.tensors.values()} - dequantizable_types())
    if unknown:
        return None, f"ggml tensor types {[ggml_type_name(t) for t in unknown]} are not dequantized here"
    reason = GGUF_ARCHITECTURES[arch].unsupported(gguf)
    return (None, reason) if reason else (GGUF_ARCHITECTURES[arch], "")


def convert_state_dict(gguf: GGUFFile, converter: ArchConverter, config: dict[str, Any],
                       progress: bool = True) -> dict[str, "torch.Tensor"]:
    """Every tensor dequantized to float32 under its Hugging Face name."""
    import torch
    from tqdm.auto import tqdm

    tensors = {}
    for name in tqdm(gguf.tensors, desc="dequantizing GGUF tensors", disable=not progress):
        # np.array copies: F32 tensors are read-only views into the file
        tensors[converter.hf_name(name)] = torch.from_numpy(np.array(converter.tensor(gguf, name, config)))
    return tensors


def tokenizer_inputs(gguf: GGUFFile) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_dict, tokenizer_config) shaped as transformers' GGUF tokenizer path builds them."""
    GGUF_TOKENIZER_MAPPING = _transformers_gguf("GGUF_TOKENIZER_MAPPING")
    meta = gguf.metadata
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to a sentencepiece vocab unless told
        tokenizer_config.setdefault("add_bos_token", True)
    special = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}
    for name, key in special.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return tokenizer, tokenizer_config


def build_tokenizer(gguf: GGUFFile):
    """The tokenizer `AutoTokenizer.from_pretrained(gguf_file=...)` builds, from the parsed metadata."""
    from transformers import TokenizersBackend

    convert_gguf_tokenizer = _transformers_gguf("convert_gguf_tokenizer")
    tokenizer_dict, tokenizer_config = tokenizer_inputs(gguf)
    backend, extra = convert_gguf_tokenizer(gguf.metadata["general.architecture"], tokenizer_dict)
    return TokenizersBackend(tokenizer_object=backend, **{**tokenizer_config, **extra})  # as transformers merges them


def convert_to_folder(gguf: GGUFFile, out: Path, progress: bool = True) -> Optional[str]:
    """Write config, float32 safetensors weights and tokenizer of `gguf` into `out`.

    Returns:
        None when written, else the reason the fast path does not cover this file (nothing written).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    converter, reason = plan_conversion(gguf)
    if converter is None:
        return reason
    config_dict = converter.config(gguf)
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    names = {converter.hf_name(name) for name in gguf.tensors}
    if names != expected:
        missing, extra = sorted(expected - names)[:3], sorted(names - expected)[:3]
        return f"its tensors do not match the model's parameters (missing {missing}, extra {extra})"
    tensors = convert_state_dict(gguf, converter, config_dict, progress)
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, assign=True, strict=True)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(gguf).save_pretrained(out)
    return None
