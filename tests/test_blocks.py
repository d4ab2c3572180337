"""Block discovery and input capture on tiny random Llama / Qwen2 / Gemma / Mistral / Gemma-3 models."""

from __future__ import annotations

import pytest
import torch

from stages.quant.blocks import (block_linears, block_outputs, capture_first_inputs, capture_kwargs, find_blocks,
                                 kwargs_to, non_block_modules_to, run_block)

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)


def _build(kind: str):
    import transformers as tf

    if kind == "llama":
        cfg, cls = tf.LlamaConfig(**COMMON), tf.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = tf.Qwen2Config(**COMMON), tf.Qwen2ForCausalLM
    elif kind == "gemma":
        cfg, cls = tf.GemmaConfig(**COMMON, head_dim=8), tf.GemmaForCausalLM
    elif kind == "mistral":
        cfg, cls = tf.MistralConfig(**COMMON, sliding_window=8), tf.MistralForCausalLM
    else:  # gemma3: per-layer-type masks and rotary tables (sliding + full attention)
        cfg = tf.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=6,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        cls = tf.Gemma3ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(cfg).eval()


KINDS = ["llama", "qwen2", "gemma", "mistral", "gemma3"]


@pytest.mark.parametrize("kind", KINDS)
def test_block_by_block_replay_reproduces_the_model(kind):
    model = _build(kind)
    name, blocks = find_blocks(model)
    assert name == "model.layers" and len(blocks) == 3
    assert list(block_linears(blocks[0])) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    ids = torch.randint(0, 97, (5, 16), generator=torch.Generator().manual_seed(1))
    # reference: every block's output in an ordinary forward
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)) for b in blocks]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    kwargs = capture_kwargs(model, blocks, 16, "cpu")
    hidden = capture_first_inputs(model, blocks, ids, "cpu", batch_size=2)
    assert hidden.shape == (5, 16, 32)
    for i, block in enumerate(blocks):
        with torch.no_grad():
            hidden = torch.cat([run_block(block, hidden[j:j + 1], kwargs[i]) for j in range(5)])
        torch.testing.assert_close(hidden, outs[i], rtol=1e-5, atol=1e-5)
    assert "position_embeddings" in kwargs[0]
    assert not any(k in kwargs[0] for k in ("cache", "past_key_values", "use_cache"))


def test_gemma3_blocks_get_their_own_layer_type_kwargs():
    model = _build("gemma3")
    _, blocks = find_blocks(model)
    kw = capture_kwargs(model, blocks, 16, "cpu")
    # sliding and full attention layers get different masks and rotary tables
    assert not torch.equal(kw[0]["position_embeddings"][0], kw[1]["position_embeddings"][0])
    assert kw[0]["position_embeddings"][0] is kw[2]["position_embeddings"][0]


def _first_llama_block():
    """Block 0 of a tiny Llama and its captured kwargs for sequences of 16 tokens."""
    model = _build("llama")
    _, blocks = find_blocks(model)
    return blocks[0], capture_kwargs(model, blocks, 16, "cpu")[0]


def test_captured_kwargs_are_batch_independent():
    block, kw = _first_llama_block()
    x = torch.randn(4, 16, 32)
    with torch.no_grad():
        together = run_block(block, x, kw)
        alone = torch.cat([run_block(block, x[i:i + 1], kw) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_block_outputs_in_place_with_mse():
    block, kw = _first_llama_block()
    x = torch.randn(5, 16, 32)
    with torch.no_grad():
        expected = run_block(block, x, kw)
    target = expected + 0.1
    buf = x.clone()
    out, mse = block_outputs(block, buf, kw, "cpu", batch_size=2, out=buf, targets=target)
    assert out is buf
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert mse == pytest.approx(0.01, rel=1e-4)


def test_non_block_modules_move_and_kwargs_move(tmp_path):
    model = _build("llama")
    name, blocks = find_blocks(model)
    non_block_modules_to(model, name, "meta")
    assert model.model.embed_tokens.weight.device.type == "meta"
    assert model.lm_head.weight.device.type == "meta"
    assert model.model.rotary_emb.inv_freq.device.type == "meta"
    assert blocks[0].self_attn.q_proj.weight.device.type == "cpu"
    cos = torch.ones(2)
    moved = kwargs_to({"position_embeddings": (cos, cos), "flag": True}, "meta")
    assert moved["position_embeddings"][0] is moved["position_embeddings"][1]
    assert moved["position_embeddings"][0].device.type == "meta" and moved["flag"] is True


def test_model_without_blocks_is_a_clear_error():
    from core.errors import InputError

    with pytest.raises(InputError, match="no list of decoder blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
