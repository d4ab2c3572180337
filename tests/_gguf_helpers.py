"""Write small GGUF files with gguf-py's GGUFWriter: a metadata/tensor zoo and a tiny Llama."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_gguf(path: Path, arch: str, metadata: list[tuple], tensors: dict[str, tuple[np.ndarray, object]],
               alignment: int | None = None) -> Path:
    """metadata: (key, value, GGUFValueType, array item type or None); tensors: name -> (float32 values, ggml type)."""
    from gguf import GGUFWriter
    from gguf.constants import GGMLQuantizationType as T
    from gguf.quants import quantize

    writer = GGUFWriter(path, arch=arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value, vtype, sub_type in metadata:
        writer.add_key_value(key, value, vtype, sub_type)
    for name, (values, qtype) in tensors.items():
        if qtype == T.F32:
            writer.add_tensor(name, values.astype(np.float32))
        elif qtype == T.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(values.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """A GPT-2 style byte-level vocabulary: specials, the 256 byte symbols, a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ s"]
    merged = ["".join(m.split(" ")) for m in merges]
    tokens = specials + list(bytes_to_unicode().values()) + merged
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))  # 3 = control, 1 = normal
    return tokens, types, merges


def write_tiny_llama(path: Path, tied: bool, seed: int = 0, extra: dict | None = None) -> Path:
    """A 2-block Llama GGUF (hidden 64, 4 heads, 2 kv heads) in mixed Q8_0/Q4_0/Q4_1/F16/F32 tensors.

    extra: more tensors (name -> (values, ggml type)) to add, e.g. ones a Llama has no parameter for.
    """
    from gguf.constants import GGMLQuantizationType as T
    from gguf.constants import GGUFValueType as V

    tokens, types, merges = _byte_level_vocab()
    hidden, ffn, heads, kv_heads, blocks = 64, 128, 4, 2, 2
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)
    metadata = [
        ("general.name", "tiny llama", V.STRING, None), ("llama.block_count", blocks, V.UINT32, None),
        ("llama.context_length", 256, V.UINT32, None), ("llama.embedding_length", hidden, V.UINT32, None),
        ("llama.feed_forward_length", ffn, V.UINT32, None), ("llama.attention.head_count", heads, V.UINT32, None),
        ("llama.attention.head_count_kv", kv_heads, V.UINT32, None), ("llama.rope.freq_base", 10000.0, V.FLOAT32, None),
        ("llama.attention.layer_norm_rms_epsilon", 1e-5, V.FLOAT32, None),
        ("llama.rope.dimension_count", head_dim, V.UINT32, None), ("llama.vocab_size", len(tokens), V.UINT32, None),
        ("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", "smollm", V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING), ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING), ("tokenizer.ggml.bos_token_id", 1, V.UINT32, None),
        ("tokenizer.ggml.eos_token_id", 2, V.UINT32, None), ("tokenizer.ggml.unknown_token_id", 0, V.UINT32, None),
        ("tokenizer.ggml.padding_token_id", 2, V.UINT32, None),
        ("tokenizer.chat_template", "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
         V.STRING, None),
    ]

    def draw(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    tensors = {"token_embd.weight": (draw(len(tokens), hidden), T.Q8_0),
               "output_norm.weight": (1 + draw(hidden), T.F32)}
    if not tied:
        tensors["output.weight"] = (draw(len(tokens), hidden), T.F16)
    for b in range(blocks):
        tensors.update({
            f"blk.{b}.attn_q.weight": (draw(hidden, hidden), T.Q4_0),
            f"blk.{b}.attn_k.weight": (draw(kv_heads * head_dim, hidden), T.Q4_1),
            f"blk.{b}.attn_v.weight": (draw(kv_heads * head_dim, hidden), T.Q8_0),
            f"blk.{b}.attn_output.weight": (draw(hidden, hidden), T.F16),
            f"blk.{b}.ffn_gate.weight": (draw(ffn, hidden), T.Q4_1),
            f"blk.{b}.ffn_up.weight": (draw(ffn, hidden), T.Q8_0),
            f"blk.{b}.ffn_down.weight": (draw(hidden, ffn), T.F32),
            f"blk.{b}.attn_norm.weight": (1 + draw(hidden), T.F32),
            f"blk.{b}.ffn_norm.weight": (1 + draw(hidden), T.F32),
        })
    return write_gguf(path, "llama", metadata, {**tensors, **(extra or {})})
