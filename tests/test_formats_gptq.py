"""GPTQ format: bit layout, round trips, bit-exactness against auto-round's packers, config, sizes, bad input."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from torch import nn

from core.errors import InputError
from stages.formats.compat import compatibility_report
from stages.formats.gptq import (
    dynamic_rules, gptq_layer_bytes, gptq_quantization_config, pack_gptq, pack_gptq_v2, pack_layer_tensors, pack_qweight,
    pack_qzeros, pack_rows, unpack_layer_tensors, unpack_qweight, unpack_qzeros, unpack_rows,
)
from stages.formats.qlinear import load_quantized_model
from stages.quant.base import LayerScheme, QuantizedLayer
from stages.quant.qdq import dequantize, quantize_weight
from _formats_helpers import tiny_model, tiny_once  # noqa: F401  (fixtures)
from _formats_helpers import (
    fake_quantize, logits, make_llama_folder, options, quantize_linears, random_ids, recipe, save_test_qstate, source,
    tensor_bytes_in_file,
)

BITS = (2, 3, 4, 8)


def reference_pack(values: list[int], bits: int) -> list[int]:
    """Plain-Python bit stream: value k at bits [k*bits, (k+1)*bits), cut into signed 32-bit words."""
    stream = sum(v << (bits * k) for k, v in enumerate(values))
    words = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(len(values) * bits // 32)]
    return [w - 2**32 if w >= 2**31 else w for w in words]


@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_matches_a_plain_bit_stream_and_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (96, 5), generator=g)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 5)
    for col in range(5):
        assert packed[:, col].tolist() == reference_pack(values[:, col].tolist(), bits)
    assert torch.equal(unpack_rows(packed, bits), values.to(torch.uint8))


def test_three_bit_values_straddle_words_as_gptq_lays_them_out():
    values = torch.zeros(32, 1, dtype=torch.int64)
    values[10, 0] = 0b111  # bits 30..32: two low bits end word 0, the high bit starts word 1
    values[21, 0] = 0b101  # bits 63..65: the low bit ends word 1, two high bits start word 2
    w = pack_rows(values, 3)[:, 0].tolist()
    assert w == [-(2**31) + 2**30, -(2**31) + 1, 0b10]


def _rtn_layer(out_f, in_f, bits, gs, sym, seed=0):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    codes, qp = quantize_weight(w, bits, gs, sym)
    return QuantizedLayer(codes, qp.scale, qp.zero, LayerScheme(bits, gs, sym))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [-1, 3, 32, 48, 128])
def test_layer_pack_unpack_identity_every_scheme(bits, sym, gs):
    layer = _rtn_layer(64, 384, bits, gs, sym, seed=bits * 7 + gs)
    for offset in (1, 0):  # GPTQ v1 (zero-1) and zeros stored as they are (auto_round, gptq_v2)
        packed = pack_layer_tensors("x", layer, zero_offset=offset)
        back = unpack_layer_tensors({k.split(".")[-1]: v for k, v in packed.items()}, layer.scheme, offset)
        assert torch.equal(back.codes, layer.codes) and torch.equal(back.scale, layer.scale) and back.g_idx is None
        # v1 cannot hold a zero point of 0 (small asym groups do produce it): it reads back as 1
        assert torch.equal(back.zero, layer.zero.clamp(min=offset))
        stored = dataclasses.replace(layer, zero=layer.zero.clamp(min=offset))
        assert torch.equal(back.dequantize(torch.float32), stored.dequantize(torch.float32))


def _auto_round_gptq_pack(layer: QuantizedLayer, raw_zeros: bool):
    """auto-round 0.16.1's own GPTQ packers (zero-1 or zeros as they are), fed the qdq weight."""
    if raw_zeros:
        from auto_round_extension.torch.qlinear_torch import QuantLinear
    else:
        from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
    out_f, in_f = layer.codes.shape
    s = layer.scheme
    lin = nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = layer.dequantize(torch.float32)
    ref = QuantLinear(s.bits, s.group_size, in_f, out_f, False, g_idx=True)
    ref.device = torch.device("cpu")
    ref.pack(lin, layer.scale, int(layer.zero[0, 0]) if s.sym else layer.zero, None, "cpu")
    return ref


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [-1, 32, 64])
def test_bit_exact_with_auto_round_gptq_packer(bits, sym, gs):
    layer = _rtn_layer(96, 256, bits, gs, sym, seed=bits + gs)
    if not sym:  # include the zero point v1 cannot store: both packers must treat it the same way
        layer.zero[0, 0] = 0
        layer.codes[0, :] = layer.codes[0, :].clamp(max=2**bits - 1)
    ref = _auto_round_gptq_pack(layer, raw_zeros=False)
    ours = pack_layer_tensors("x", layer)
    assert torch.equal(ours["x.qweight"], ref.qweight)
    assert torch.equal(ours["x.qzeros"], ref.qzeros)
    assert torch.equal(ours["x.scales"], ref.scales)
    assert torch.equal(ours["x.g_idx"], ref.g_idx)


def test_zero_point_zero_decodes_as_one_under_v1_but_round_trips_with_zeros_as_they_are():
    layer = _rtn_layer(32, 64, 4, 32, False)
    layer.zero[3, 1] = 0
    packed = pack_qzeros(layer.zero, 4)
    back = unpack_qzeros(packed, 4)
    assert int(back[3, 1]) == 1 and torch.equal(back[layer.zero > 0], layer.zero[layer.zero > 0].int())
    assert torch.equal(unpack_qzeros(pack_qzeros(layer.zero, 4, 0), 4, 0), layer.zero.int())


def test_qweight_and_qzeros_shapes_follow_the_gptq_convention():
    layer = _rtn_layer(64, 256, 3, 32, False)
    t = pack_layer_tensors("x", layer)
    assert t["x.qweight"].shape == (256 * 3 // 32, 64) and t["x.qzeros"].shape == (8, 64 * 3 // 32)
    assert t["x.scales"].shape == (8, 64) and t["x.scales"].dtype == torch.float16
    assert t["x.g_idx"].tolist() == [i // 32 for i in range(256)]
    assert torch.equal(unpack_qweight(pack_qweight(layer.codes, 3), 3), layer.codes)


def _overrides(name):
    if name.endswith("mlp.down_proj"):
        return LayerScheme(8, 32, True)
    if name.startswith("model.layers.1.self_attn.") and name[-6:] in ("q_proj", "k_proj", "v_proj"):
        return LayerScheme(8, 64, True)
    if name == "model.layers.0.mlp.up_proj":
        return None
    return LayerScheme(4, 32, True)


def _first_match(rules, name):
    """The GPTQModel/vLLM reading of `dynamic`: the first rule whose regex re.match-es the name."""
    for pat, values in rules.items():
        if re.match(pat[2:], name):
            return False if pat.startswith("-:") else values
    return None


def test_dynamic_rules_reach_every_reader_including_vllm_fused_names(tiny_model, tmp_path):
    model = tiny_model[0]
    layers, skipped = quantize_linears(model, 4, 32, True, _overrides)
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2)
    rules = dynamic_rules(qs, LayerScheme(4, 32, True), False)
    assert list(rules)[0].startswith("-:")  # negative rules first
    assert _first_match(rules, "model.layers.0.mlp.up_proj") is False
    for i in (0, 1):
        assert _first_match(rules, f"model.layers.{i}.mlp.down_proj")["bits"] == 8
        assert _first_match(rules, f"model.layers.{i}.mlp.gate_proj") is None
        assert _first_match(rules, f"model.layers.{i}.self_attn.o_proj") is None
    for leaf in ("q_proj", "k_proj", "v_proj", "qkv_proj"):  # vLLM's fused module is covered too
        assert _first_match(rules, f"model.layers.1.self_attn.{leaf}") == \
            {"bits": 8, "group_size": 64, "sym": True, "desc_act": False}
        assert _first_match(rules, f"model.layers.0.self_attn.{leaf}") is None
    assert _first_match(rules, "model.layers.10.mlp.down_proj") is None  # anchored: no prefix collisions
    assert not any("gate_up_proj" in p for p in rules)  # block 0's gate/up family is split: never fused


def test_quantization_config_is_written_from_the_recipe(tiny_model, tmp_path):
    layers, skipped = quantize_linears(tiny_model[0], 4, 32, True)
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2, method="gptq")
    cfg = gptq_quantization_config(qs, recipe(4, 32, True, method="gptq", damp_percent=0.05, true_sequential=False))
    assert cfg == {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 32, "sym": True,
                   "desc_act": False, "true_sequential": False, "lm_head": False, "damp_percent": 0.05,
                   "static_groups": False}
    static = gptq_quantization_config(qs, recipe(4, 32, True, method="gptq", static_groups=True))
    assert static["static_groups"] is True
    rtn = gptq_quantization_config(qs, recipe(4, 32, True, method="autoround", iters=200))
    assert "damp_percent" not in rtn and "dynamic" not in rtn and "meta" not in rtn


def test_packed_tiny_model_loads_to_the_fake_quantized_logits(tiny_model, tmp_path):
    model, _, handle = tiny_model
    layers, skipped = quantize_linears(model, 3, 32, False)
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2)
    res = pack_gptq_v2(qs, source(handle.path), tmp_path / "ck", options(), recipe(3, 32, False), "id-1")
    assert {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.json", "packing.json"} <= set(res.files)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((tmp_path / "ck" / "quantize_config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["quantization_config"]["checkpoint_format"] == "gptq_v2"
    loaded = load_quantized_model(tmp_path / "ck", "cpu", torch.float32)
    ids = random_ids()
    assert torch.equal(logits(loaded, ids), logits(fake_quantize(model, layers), ids))


def test_sharded_checkpoint_has_an_index_and_loads_the_same(tiny_model, tmp_path):
    model, _, handle = tiny_model
    layers, skipped = quantize_linears(model, 4, 32, True)
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2)
    res = pack_gptq(qs, source(handle.path), tmp_path / "ck", options(shard=5 * 10**6), recipe(4, 32, True), "id")
    shards = [f for f in res.files if f.startswith("model-")]
    assert len(shards) >= 2 and "model.safetensors.index.json" in res.files and "model.safetensors" not in res.files
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(tensor_bytes_in_file(tmp_path / "ck" / s)[0] for s in shards)
    loaded = load_quantized_model(tmp_path / "ck", "cpu", torch.float32)
    ids = random_ids()
    assert torch.equal(logits(loaded, ids), logits(fake_quantize(model, layers), ids))


def test_size_on_disk_formula_matches_a_real_file_and_a_1b_layout_is_3_5x_smaller(tmp_path):
    folder = make_llama_folder(tmp_path / "m", hidden_size=256, intermediate_size=512, vocab_size=64)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    layers, skipped = quantize_linears(model, 4, 128, True)
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2)
    res = pack_gptq(qs, source(folder), tmp_path / "ck", options(), recipe(4, 128, True), "id")
    expected = sum(gptq_layer_bytes(*layer.codes.shape, 4, 128) for layer in layers.values())
    assert res.quantized_bytes == expected
    total, header = tensor_bytes_in_file(tmp_path / "ck" / "model.safetensors")
    assert (tmp_path / "ck" / "model.safetensors").stat().st_size == 8 + header + total
    unquantized = sum(t.numel() * 4 for n, t in model.state_dict().items() if n.rsplit(".", 1)[0] not in layers)
    assert total == expected + unquantized
    # Llama-3.2-1B layout (hidden 2048, intermediate 8192, kv 512, 16 blocks), W4G128, quantized layers only
    shapes = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)]
    packed = 16 * sum(gptq_layer_bytes(o, i, 4, 128) for o, i in shapes)
    fp16 = 16 * sum(2 * o * i for o, i in shapes)
    assert packed == 506_855_424 and 3.5 <= fp16 / packed < 4.0  # 3.84x: 4.25 bits per weight incl. overhead


def test_qstate_from_a_different_model_is_refused_and_nothing_is_written(tiny_model, tmp_path):
    layers, skipped = quantize_linears(tiny_model[0], 4, 32, True)
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2)
    other = make_llama_folder(tmp_path / "other", intermediate_size=96, vocab_size=49152)
    with pytest.raises(InputError, match="does not belong to the model.*mlp.*shape"):
        pack_gptq(qs, source(other), tmp_path / "ck", options(), recipe(4, 32, True), "id")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "q"]


def test_dims_that_are_not_multiples_of_32_cannot_be_packed(tmp_path):
    folder = make_llama_folder(tmp_path / "m", hidden_size=48, intermediate_size=96, num_attention_heads=4,
                               num_key_value_heads=4)
    from transformers import AutoModelForCausalLM

    layers, skipped = quantize_linears(AutoModelForCausalLM.from_pretrained(folder), 4, 16, True)
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2)
    with pytest.raises(InputError, match="multiples of 32.*skip: true"):
        pack_gptq(qs, source(folder), tmp_path / "ck", options(), recipe(4, 16, True), "id")
    assert not (tmp_path / "ck").exists()


def test_existing_folder_with_a_different_checkpoint_is_an_error_the_same_one_is_replaced(tiny_model, tmp_path):
    model, _, handle = tiny_model
    layers, skipped = quantize_linears(model, 4, 32, True)
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2)
    out = tmp_path / "ck"
    pack_gptq(qs, source(handle.path), out, options(), recipe(4, 32, True), "first")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(InputError, match="already holds a different checkpoint"):
        pack_gptq(qs, source(handle.path), out, options(), recipe(4, 32, True), "second")
    assert (out / "model.safetensors").read_bytes() == before
    pack_gptq(qs, source(handle.path), out, options(), recipe(4, 32, True), "first")  # same identity: replaced
    assert json.loads((out / "packing.json").read_text())["identity"] == "first"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="already holds other files"):
        pack_gptq(qs, source(handle.path), stray, options(), recipe(4, 32, True), "first")


def test_corrupt_qstate_fails_mid_pack_without_leaving_files(tiny_model, tmp_path):
    layers, skipped = quantize_linears(tiny_model[0], 2, 32, False)
    layers["model.layers.1.mlp.up_proj"].codes[0, 0] = 9  # not a 2-bit code
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2)
    with pytest.raises(InputError, match="up_proj.*outside \\[0, 3\\]"):
        pack_gptq_v2(qs, source(tiny_model[2].path), tmp_path / "ck", options(), recipe(2, 32, False), "id")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_quantized_lm_head_tied_to_the_embeddings_cannot_be_expressed(tmp_path):
    folder = make_llama_folder(tmp_path / "m", tie_word_embeddings=True)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    layers, skipped = quantize_linears(model, 4, 32, True)
    codes, qp = quantize_weight(model.lm_head.weight.data, 4, 32, True)
    layers["lm_head"] = QuantizedLayer(codes, qp.scale, qp.zero, LayerScheme(4, 32, True))
    from _formats_helpers import write_fake_source

    tensors = {k: v.clone() for k, v in model.state_dict().items()}  # includes the tied lm_head.weight
    src = write_fake_source(tmp_path / "src", tensors, json.loads((folder / "config.json").read_text()))
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2)
    with pytest.raises(InputError, match="tie_word_embeddings.*quantize_lm_head=false"):
        pack_gptq(qs, source(src), tmp_path / "ck", options(), recipe(4, 32, True), "id")


def test_compat_report_for_sym_w4_and_asym_w3(tiny_model, tmp_path):
    model, _, handle = tiny_model
    for bits, sym, loads in ((4, True, True), (3, False, False)):
        layers, skipped = quantize_linears(model, bits, 32, sym)
        qs = save_test_qstate(tmp_path / f"q{bits}", layers, skipped, 2)
        packer = pack_gptq if sym else pack_gptq_v2  # v1 cannot hold asym zeros exactly
        res = packer(qs, source(handle.path), tmp_path / f"ck{bits}", options(), recipe(bits, 32, sym), "id")
        rep = compatibility_report(res)
        assert rep["vllm"]["loads"] is loads and rep["exllama_gptq"]["loads"] is sym  # exllama reads v1 zeros
        if loads:  # hidden 64: no layer is a multiple of 128 wide, so Marlin for all (q/k/v and gate/up fused)
            assert rep["vllm"]["kernels"] == {"Marlin": 8}
        else:
            assert "Unsupported quantization config: bits=3, sym=False" in rep["vllm"]["reason"]
        assert rep["exact"]["verified_layers"] == rep["exact"]["layers"] == 14


def test_dequantize_of_packed_tensors_equals_qdq_with_act_order_g_idx():
    from _formats_helpers import act_order_layer

    layer = act_order_layer(64, 128, 4, 32, False)
    t = {k.split(".")[-1]: v for k, v in pack_layer_tensors("x", layer).items()}
    back = unpack_layer_tensors(t, layer.scheme)
    assert torch.equal(back.g_idx, layer.g_idx)
    assert torch.equal(dequantize(back.codes, back.scale, back.zero, 32, back.g_idx), layer.dequantize())


def _result(records, skipped=(), packing="gptq", bits=4, sym=True):
    from stages.formats.writer import PackResult

    return PackResult(None, [], {"bits": bits, "sym": sym}, records, packing, 0, 0, extras={"skipped": list(skipped)})


def _llama3_8b_block(scheme, overrides=None):
    from stages.formats.writer import LayerRecord

    shapes = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
              "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
              "mlp.down_proj": (4096, 14336)}
    return {f"model.layers.0.{rel}": LayerRecord((overrides or {}).get(rel, scheme), False, shape, 0)
            for rel, shape in shapes.items()}


def test_vllm_kernel_prediction_for_a_llama3_8b_block():
    from stages.formats.compat import vllm_report

    # fused q/k/v [6144, 4096], o, fused gate/up [28672, 4096], down [4096, 14336]
    assert vllm_report(_result(_llama3_8b_block(LayerScheme(4, 128, True))))["kernels"] == {"Machete": 4}
    assert vllm_report(_result(_llama3_8b_block(LayerScheme(8, -1, True))))["kernels"] == {"Machete": 4}
    assert vllm_report(_result(_llama3_8b_block(LayerScheme(4, 32, True))))["kernels"] == {"Marlin": 4}
    refused = vllm_report(_result(_llama3_8b_block(LayerScheme(4, 256, True))))
    assert not refused["loads"] and "Marlin does not support group_size = 256" in refused["reason"]
    mixed = _llama3_8b_block(LayerScheme(4, 128, True), {"self_attn.q_proj": LayerScheme(8, 128, True)})
    assert "qkv_proj fuses" in vllm_report(_result(mixed))["reason"]
    partial = _llama3_8b_block(LayerScheme(4, 128, True))
    del partial["model.layers.0.self_attn.v_proj"]
    report = vllm_report(_result(partial, skipped=["model.layers.0.self_attn.v_proj"]))
    assert not report["loads"] and "some but not all shards are quantized" in report["reason"]
    asym = vllm_report(_result(_llama3_8b_block(LayerScheme(4, 128, False)), sym=False))
    assert not asym["loads"] and "bits=4, sym=False" in asym["reason"]
    awq = vllm_report(_result(_llama3_8b_block(LayerScheme(4, 128, False)), packing="auto_round:auto_awq", sym=False))
    assert awq["loads"] and awq["quantization"] == "inc" and awq["kernels"] == {"Machete": 4}


@pytest.mark.gpu
def test_vllm_0_26_agrees_with_the_compat_rules():
    """On the GPU machine: vLLM's own config classes and kernel chooser give what stages.formats.compat predicts."""
    pytest.importorskip("vllm")
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig, AutoGPTQLinearMethod
    from vllm.model_executor.layers.quantization.inc import INCConfig
    from vllm.scalar_type import scalar_types

    from stages.formats.compat import hopper_kernel, vllm_report

    for bits, gs, sym in [(4, 128, True), (8, -1, True), (4, 32, True), (4, 256, True), (2, 64, True), (4, 128, False)]:
        predicted = vllm_report(_result(_llama3_8b_block(LayerScheme(bits, gs, sym)), bits=bits, sym=sym))["loads"]
        try:
            cfg = AutoGPTQConfig.from_config({"quant_method": "gptq", "bits": bits, "group_size": gs, "sym": sym,
                                              "desc_act": False})
            AutoGPTQLinearMethod(cfg)
            loads = True
        except ValueError:
            loads = False
        assert loads == predicted, (bits, gs, sym)
    with pytest.raises(ValueError, match="Unsupported packing_format"):
        INCConfig.from_config({"quant_method": "auto-round", "bits": 3, "group_size": 32, "sym": False,
                               "packing_format": "auto_round"})
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("kernel choice is predicted for Hopper (SM90)")
    shapes = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (576, 960), (576, 3072), (1536, 576)]
    for (in_f, out_f), gs in [(s, g) for s in shapes for g in (32, 64, 128)]:
        c = MPLinearLayerConfig((in_f, out_f), (in_f, out_f), scalar_types.uint4b8, torch.bfloat16, gs, False, False)
        chosen = choose_mp_linear_kernel(c).__name__.removesuffix("LinearKernel")
        assert chosen == hopper_kernel(LayerScheme(4, gs, True), in_f, out_f), (in_f, out_f, gs)
