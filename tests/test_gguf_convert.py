"""GGUF -> Hugging Face folder: the single-read fast path gives exactly what transformers' loader gives."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline import models
from pipeline.gguf_convert import convert_to_folder, llama_hf_name, plan_conversion, unpermute_rows
from pipeline.gguf_reader import read_gguf
from core.schema import ModelConfig
from tests._gguf_helpers import SMOLLM2_GGUF, write_gguf, write_tiny_llama

REPO = Path(__file__).resolve().parents[1]
# written by from_pretrained(gguf_file=...) only: where the files were loaded from, not what they are
LOAD_LOCATION_KEYS = {"is_local", "local_files_only"}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_same_folder(fast: Path, reference: Path) -> None:
    """Bit-identical weights, equal config/generation config, identical tokenizer files."""
    import torch
    from safetensors.torch import load_file

    ours, theirs = load_file(fast / "model.safetensors"), load_file(reference / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == torch.float32, name
        assert torch.equal(ours[name], theirs[name]), name
    for name in ("config.json", "generation_config.json"):
        assert _json(fast / name) == _json(reference / name), name
    ours_tok, theirs_tok = _json(fast / "tokenizer_config.json"), _json(reference / "tokenizer_config.json")
    assert ours_tok == {k: v for k, v in theirs_tok.items() if k not in LOAD_LOCATION_KEYS}
    assert (fast / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
    assert (fast / "chat_template.jinja").read_text() == (reference / "chat_template.jinja").read_text()


def test_unpermute_rows_inverts_llama_cpp_permute():
    """llama.cpp's convert script interleaves each head's rows as (2, dim) -> (dim, 2); the reverse undoes it."""
    n_head, dim, cols = 3, 4, 5
    weights = np.arange(n_head * 2 * dim * cols, dtype=np.float32).reshape(n_head * 2 * dim, cols)
    permuted = weights.reshape(n_head, 2, dim, cols).swapaxes(1, 2).reshape(weights.shape)  # llama.cpp's permute
    np.testing.assert_array_equal(unpermute_rows(permuted, n_head), weights)
    assert not np.array_equal(permuted, weights)


@pytest.mark.parametrize(("gguf_name", "hf_name"), [
    ("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"), ("blk.12.attn_q.weight", "model.layers.12.self_attn.q_proj.weight"),
    ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight"),
    ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
    ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"), ("rope_freqs.weight", None),
    ("blk.0.attn_q.bias", None), ("blk.0.attn_q_norm.weight", None),
])
def test_llama_tensor_names(gguf_name, hf_name):
    assert llama_hf_name(gguf_name) == hf_name


@pytest.mark.parametrize("tied", [True, False], ids=["tied-embeddings", "separate-lm-head"])
def test_tiny_llama_fast_path_matches_transformers(tmp_path, tied):
    gguf = write_tiny_llama(tmp_path / "tiny.gguf", tied=tied)
    assert convert_to_folder(read_gguf(gguf), tmp_path / "fast", progress=False) is None
    models._materialise_gguf_transformers(gguf, tmp_path / "reference")
    assert_same_folder(tmp_path / "fast", tmp_path / "reference")
    assert _json(tmp_path / "fast" / "config.json")["tie_word_embeddings"] is tied


def _odd_files(tmp_path: Path) -> dict[str, Path]:
    """GGUF files the fast path does not cover, and why."""
    from gguf.constants import GGMLQuantizationType as T

    extra = write_tiny_llama(tmp_path / "extra.gguf", tied=True,
                             extra={"rope_freqs.weight": (np.ones(8, np.float32), T.F32)})
    other = write_gguf(tmp_path / "phi.gguf", "phi3", [], {"token_embd.weight": (np.ones((4, 32), np.float32), T.F32)})
    return {"tensor rope_freqs.weight has no Llama-layout name": extra, "architecture 'phi3'": other}


def test_uncovered_files_fall_back_to_transformers_with_one_log_line(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "_materialise_gguf_transformers", lambda gguf, out: calls.append((gguf, out)))
    for reason, path in _odd_files(tmp_path).items():
        converter, why = plan_conversion(read_gguf(path))
        assert converter is None and reason in why
        out = tmp_path / f"out-{path.stem}"
        cfg = replace(ModelConfig(), source="gguf", gguf_file=str(path), gguf_package=None)
        note = models._materialise_gguf(cfg, out)
        assert calls[-1] == (path, out) and not out.exists()
        assert reason in note and note.endswith("used transformers' GGUF loader") and "\n" not in note
    assert len(calls) == 2


def test_covered_file_needs_no_log_line(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf", tied=True)
    cfg = replace(ModelConfig(), source="gguf", gguf_file=str(path), gguf_package=None)
    assert models._materialise_gguf(cfg, tmp_path / "out") is None
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def _austen_paragraphs(count: int = 4) -> list[str]:
    text = (REPO / "stages" / "data" / "austen" / "emma.txt").read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if len(p) > 400][:count]


@pytest.mark.slow
def test_smollm2_fast_path_matches_transformers(tmp_path):
    """The real SmolLM2-135M Q4_1 file both ways: every tensor, the config and the tokenizer agree."""
    from transformers import AutoTokenizer

    gguf = models.find_gguf(ModelConfig())
    assert gguf.name == SMOLLM2_GGUF
    assert convert_to_folder(read_gguf(gguf), tmp_path / "fast", progress=False) is None
    models._materialise_gguf_transformers(gguf, tmp_path / "reference")
    assert_same_folder(tmp_path / "fast", tmp_path / "reference")

    config = _json(tmp_path / "fast" / "config.json")
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert config["tie_word_embeddings"] is True and config["rope_parameters"]["rope_theta"] == 100000.0
    ours, theirs = (AutoTokenizer.from_pretrained(tmp_path / d) for d in ("fast", "reference"))
    paragraphs = _austen_paragraphs()
    assert len(paragraphs) == 4
    assert ours(paragraphs)["input_ids"] == theirs(paragraphs)["input_ids"]
    assert ours.all_special_tokens == theirs.all_special_tokens and ours.eos_token == "<|im_end|>"
    chat = [{"role": "user", "content": paragraphs[0][:200]}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
