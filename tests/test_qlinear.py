"""QuantLinear and load_quantized_model: exact dequantization, dtype handling, overrides, bias, ties, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from core.errors import InputError
from stages.formats.gptq import pack_gptq
from stages.formats.qlinear import QuantLinear, iter_quant_linears, load_quantized_model
from stages.quant.base import LayerScheme
from _formats_helpers import tiny_model, tiny_once  # noqa: F401  (fixtures)
from _formats_helpers import (
    act_order_layer, fake_quantize, logits, make_llama_folder, options, pack_gptq_layout, quantize_linears, random_ids,
    recipe, save_test_qstate, source,
)


@pytest.mark.parametrize("zero_offset", [0, 1])
def test_quant_linear_unpacks_and_computes_exactly(zero_offset):
    layer = act_order_layer(64, 128, 3, 32, False, seed=3)
    bias = torch.randn(64)
    ql = QuantLinear.from_layer(layer, bias, zero_offset)
    q = ql.unpack()
    assert torch.equal(q.codes, layer.codes) and torch.equal(q.zero, layer.zero) and torch.equal(q.scale, layer.scale)
    assert torch.equal(q.g_idx, layer.g_idx) and not ql.natural_order
    assert (ql.bits, ql.group_size, ql.sym, ql.in_features, ql.out_features) == (3, 32, False, 128, 64)
    w = layer.dequantize(torch.float32)
    assert torch.equal(ql.dequantize(torch.float32), w)
    x = torch.randn(5, 128)
    assert torch.equal(ql(x), F.linear(x, w, bias))


def test_natural_g_idx_is_reported_as_none_and_scales_survive_dtype_casts():
    layer = act_order_layer(32, 64, 4, 32, True)
    layer.g_idx = None
    ql = QuantLinear.from_layer(layer, None, 1)
    assert ql.natural_order and ql.unpack().g_idx is None
    assert ql.group_index().tolist() == [i // 32 for i in range(64)]
    ql.to(torch.bfloat16)
    assert ql.scales.dtype == torch.float16 and ql.qweight.dtype == torch.int32
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(ql(x), F.linear(x, layer.dequantize(torch.bfloat16)))


def _pack_folder(folder, tmp_path, bits=4, gs=32, sym=True, scheme_for=None, name="ck"):
    model = AutoModelForCausalLM.from_pretrained(folder)
    layers, skipped = quantize_linears(model, bits, gs, sym, scheme_for)
    qs = save_test_qstate(tmp_path / f"q-{name}", layers, skipped, model.config.num_hidden_layers)
    pack_gptq_layout(qs, source(folder), tmp_path / name, options(), recipe(bits, gs, sym), name)
    return model, layers, tmp_path / name


def test_biases_overrides_and_skipped_layers_load_exactly(tmp_path):
    folder = make_llama_folder(tmp_path / "m", attention_bias=True, mlp_bias=True)

    def scheme_for(n):
        if n == "model.layers.1.mlp.gate_proj":
            return None
        return LayerScheme(8, 64, False) if n.endswith("o_proj") else LayerScheme(4, 32, True)

    model, layers, ck = _pack_folder(folder, tmp_path, scheme_for=scheme_for)
    cfg = json.loads((ck / "config.json").read_text())["quantization_config"]
    assert any(p.startswith("-:") for p in cfg["dynamic"]) and any(p.startswith("+:") for p in cfg["dynamic"])
    loaded = load_quantized_model(ck, "cpu", torch.float32)
    qls = dict(iter_quant_linears(loaded))
    assert set(qls) == set(layers) and "model.layers.1.mlp.gate_proj" not in qls
    assert type(loaded.model.layers[1].mlp.gate_proj) is torch.nn.Linear
    assert qls["model.layers.0.self_attn.o_proj"].bits == 8 and qls["model.layers.0.self_attn.o_proj"].sym is False
    assert qls["model.layers.0.self_attn.q_proj"].bias is not None
    ids = random_ids(vocab=256)
    assert torch.equal(logits(loaded, ids), logits(fake_quantize(model, layers), ids))


def test_bfloat16_load_equals_the_bfloat16_fake_quantized_model(tiny_model, tmp_path):
    model, _, handle = tiny_model
    layers, skipped = quantize_linears(model, 4, 32, False)
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2)
    pack_gptq_layout(qs, source(handle.path), tmp_path / "ck", options(), recipe(4, 32, False), "i")
    loaded = load_quantized_model(tmp_path / "ck", "cpu", torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.device.type == "cpu"
    # as transformers loads in bfloat16 (rotary inv_freq stays float32), weights = qdq cast to bfloat16
    ref = fake_quantize(AutoModelForCausalLM.from_pretrained(handle.path, dtype=torch.bfloat16), layers)
    ids = random_ids()
    assert torch.equal(logits(loaded, ids), logits(ref, ids))


def test_tied_embeddings_are_tied_after_loading(tmp_path):
    folder = make_llama_folder(tmp_path / "m", tie_word_embeddings=True)
    model, layers, ck = _pack_folder(folder, tmp_path)
    loaded = load_quantized_model(ck)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = random_ids(vocab=256)
    assert torch.equal(logits(loaded, ids), logits(fake_quantize(model, layers), ids))


def test_loader_rejects_what_it_cannot_read(tmp_path):
    folder = make_llama_folder(tmp_path / "m")
    with pytest.raises(InputError, match="no quantization_config"):
        load_quantized_model(folder)
    _, _, ck = _pack_folder(folder, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    for change, message in (({"bits": 8}, "tensors hold 4-bit codes.*declares bits=8"),
                            ({"checkpoint_format": "marlin"}, "checkpoint_format=marlin"),
                            ({"quant_method": "awq"}, "quant_method=awq")):
        bad = dict(cfg, quantization_config={**cfg["quantization_config"], **change})
        (ck / "config.json").write_text(json.dumps(bad))
        with pytest.raises(InputError, match=message):
            load_quantized_model(ck)


@pytest.mark.gpu
def test_cuda_load_matches_cpu(tiny_model, tmp_path):
    model, _, handle = tiny_model
    layers, skipped = quantize_linears(model, 3, 32, False)
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2)
    pack_gptq_layout(qs, source(handle.path), tmp_path / "ck", options(), recipe(3, 32, False), "i")
    ids = random_ids()
    cpu = logits(load_quantized_model(tmp_path / "ck", "cpu", torch.float32), ids)
    gpu_model = load_quantized_model(tmp_path / "ck", "cuda:0", torch.float32)
    assert all(ql.qweight.is_cuda for _, ql in iter_quant_linears(gpu_model))
    torch.testing.assert_close(logits(gpu_model, ids), cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fmt,bits,sym", [("auto_gptq", 4, True), ("auto_round", 4, True), ("auto_round", 3, False),
                                          ("auto_round", 4, False)])
def test_reads_checkpoints_written_by_auto_round_itself(tiny_model, tmp_path, fmt, bits, sym):
    """auto-round 0.16.1 quantizes (RTN) and exports; our loader reads its files.

    Every dequantized weight is within 1.5 quantization steps of the original (half a step of
    rounding, about one step where full-range sym clips the smaller side; a wrong bit or nibble
    order is off by many steps), and where auto-round's own CPU loader works, the
    logits agree within float16 tolerance.
    """
    from auto_round import AutoRound
    from transformers import AutoRoundConfig

    _, tok, handle = tiny_model
    fresh = AutoModelForCausalLM.from_pretrained(handle.path, dtype=torch.float32)
    ar = AutoRound(fresh, tokenizer=tok, bits=bits, group_size=32, sym=sym, iters=0, disable_opt_rtn=True)
    ar.quantize_and_save(str(tmp_path / "ar"), format=fmt)
    folder = next(p.parent for p in (tmp_path / "ar").rglob("config.json"))
    ours = load_quantized_model(folder, "cpu", torch.float32)
    mods = dict(AutoModelForCausalLM.from_pretrained(handle.path, dtype=torch.float32).named_modules())
    assert len(dict(iter_quant_linears(ours))) == 14
    for name, ql in iter_quant_linears(ours):
        q = ql.unpack()
        step = q.scale.abs().repeat_interleave(32, dim=1)
        assert bool(((ql.dequantize(torch.float32) - mods[name].weight).abs() <= 1.5 * step).all()), name
    if sym or fmt == "auto_round" and bits != 4:  # what its CPU loader handles (see test_formats_auto_round)
        theirs = AutoModelForCausalLM.from_pretrained(folder, quantization_config=AutoRoundConfig(backend="torch"))
        ids = random_ids()
        ours16 = load_quantized_model(folder, "cpu", torch.float16)
        torch.testing.assert_close(logits(theirs, ids), logits(ours16, ids), atol=3e-3, rtol=1e-2)
