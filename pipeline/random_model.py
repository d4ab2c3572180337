"""Seeded random Llama-layout weights, drawn one tensor at a time (never a whole model in memory).

Every tensor has a generator of its own, seeded from the model seed and the tensor's name, so a
tensor can be drawn alone, in any order, on any device: `write_random_model` writes a model
folder shard by shard (at most one shard in memory), and a benchmark can stream decoder blocks
straight from the seed (`RandomTensors` as the tensor source of stages.quant.stream) without
writing the model anywhere. Initialisation follows transformers' Llama: Linear and Embedding
weights N(0, initializer_range), norm weights 1, biases 0, drawn directly in the model's dtype.
Draws depend on the generator's device type (the CPU and CUDA generators differ); the folder
is always drawn on the CPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from core.schema import ModelConfig, RandomModelConfig

GENERATOR_VERSION = "per-tensor-1"  # part of a random model's identity: other draws are another model
SHARD_BYTES = 10**9  # shard size of a written random model (bounds the writer's memory)


def llama_config(r: "RandomModelConfig", dtype: "torch.dtype") -> Any:
    """The transformers LlamaConfig of a random model's dimensions."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=r.hidden_size, intermediate_size=r.intermediate_size, num_hidden_layers=r.num_hidden_layers,
        num_attention_heads=r.num_attention_heads, num_key_value_heads=r.num_key_value_heads,
        vocab_size=r.vocab_size, max_position_embeddings=r.max_position_embeddings,
        rope_theta=r.rope_theta, tie_word_embeddings=r.tie_word_embeddings, bos_token_id=1, eos_token_id=2,
    )
    config.dtype = dtype
    return config


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one tensor: a hash of the model seed and the tensor's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


class RandomTensors:
    """The tensors of a random Llama: names and shapes from a meta skeleton, values drawn on demand."""

    def __init__(self, config: Any, seed: int, dtype: "torch.dtype"):
        from torch import nn

        from stages.quant.stream import meta_skeleton

        self.seed, self.dtype, self.std = seed, dtype, float(config.initializer_range)
        model = meta_skeleton(config)
        self.kinds: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, param in model.named_parameters():  # tied weights appear once, under their first name
            owner = model.get_submodule(name.rpartition(".")[0])
            leaf = name.rpartition(".")[2]
            normal = leaf == "weight" and isinstance(owner, (nn.Linear, nn.Embedding))
            self.kinds[name] = "normal" if normal else ("zeros" if leaf == "bias" else "ones")
            self.shapes[name] = tuple(param.shape)

    def names(self) -> list[str]:
        return list(self.shapes)

    def load(self, name: str, device: Any = "cpu") -> "torch.Tensor":
        """Draw tensor `name` on `device` in the model's dtype (the same values on every call)."""
        import torch

        out = torch.empty(self.shapes[name], dtype=self.dtype, device=device)
        kind = self.kinds[name]
        if kind == "normal":
            gen = torch.Generator(device=out.device).manual_seed(tensor_seed(self.seed, name))
            return out.normal_(0.0, self.std, generator=gen)
        return out.zero_() if kind == "zeros" else out.fill_(1.0)

    def load_group(self, names: list[str], device: Any = "cpu") -> dict[str, "torch.Tensor"]:
        """Several tensors (the tensor-source interface of stages.quant.stream)."""
        return {name: self.load(name, device) for name in names}


def _natural_key(name: str) -> list:
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def write_random_model(cfg: "ModelConfig", out: Path, dtype: "torch.dtype", shard_bytes: int = SHARD_BYTES) -> None:
    """Write a random model's config and weights into `out`, one tensor drawn at a time.

    Args:
        cfg: the model config (cfg.random gives the dimensions and the seed).
        out: an existing empty folder.
        dtype: the dtype the weights are drawn and stored in.
        shard_bytes: safetensors shard size; the writer holds at most one shard (or one larger tensor).
    """
    from transformers import GenerationConfig

    from stages.formats.writer import ShardWriter

    config = llama_config(cfg.random, dtype)
    tensors = RandomTensors(config, cfg.random.seed, dtype)
    writer = ShardWriter(Path(out), shard_bytes)
    for name in sorted(tensors.names(), key=_natural_key):  # embeddings, block 0, 1, ..., norm, head
        writer.add(name, tensors.load(name))
    writer.finish()
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
