"""auto-round native format: AWQ layout, packing_format choice, config, bit-exactness and auto-round's own loader."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from core.errors import InputError
from stages.formats.auto_round import (
    AUTO_AWQ, AUTO_GPTQ, AUTO_ROUND, auto_round_quantization_config, choose_packing_format, pack_auto_round, pack_awq,
    pack_awq_layer, unpack_auto_round_layer, unpack_awq,
)
from stages.formats.compat import compatibility_report
from stages.formats.gptq import pack_gptq, pack_layer_tensors
from stages.formats.qlinear import load_quantized_model
from stages.quant.base import LayerScheme, QuantizedLayer
from stages.quant.qdq import quantize_weight
from _formats_helpers import tiny_model, tiny_once  # noqa: F401  (fixtures)
from _formats_helpers import (
    act_order_layer, fake_quantize, logits, options, quantize_linears, random_ids, recipe, save_test_qstate, source,
)


def _layer(out_f, in_f, bits, gs, sym, seed=0):
    codes, qp = quantize_weight(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)), bits, gs, sym)
    return QuantizedLayer(codes, qp.scale, qp.zero, LayerScheme(bits, gs, sym))


def test_awq_word_holds_columns_in_the_interleaved_order():
    values = torch.arange(8).reshape(1, 8)  # column c holds the value c
    word = int(pack_awq(values)[0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * p)) & 0xF for p in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]
    v = torch.randint(0, 16, (24, 64), generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack_awq(pack_awq(v)), v.to(torch.uint8))


@pytest.mark.parametrize("gs", [-1, 32, 64])
def test_bit_exact_with_auto_round_awq_packer(gs):
    from auto_round.export.export_to_awq.utils import WQLinear_GEMM

    layer = _layer(96, 128, 4, gs, False, seed=gs)
    layer.zero[0, 0] = 0  # stored as it is in AWQ
    lin = nn.Linear(128, 96, bias=False)
    lin.weight.data = layer.dequantize(torch.float32)
    ref = WQLinear_GEMM.from_linear(lin, 4, gs, scales=layer.scale.t().contiguous(), zeros=layer.zero.t().contiguous())
    ours = pack_awq_layer("x", layer)
    assert torch.equal(ours["x.qweight"], ref.qweight) and torch.equal(ours["x.qzeros"], ref.qzeros)
    assert torch.equal(ours["x.scales"], ref.scales)
    back = unpack_auto_round_layer({k.split(".")[-1]: v for k, v in ours.items()}, layer.scheme, AUTO_AWQ)
    assert torch.equal(back.codes, layer.codes) and torch.equal(back.zero, layer.zero)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_exact_with_auto_round_raw_zero_packer(bits):
    from auto_round_extension.torch.qlinear_torch import QuantLinear

    layer = _layer(64, 128, bits, 32, False, seed=bits)
    layer.zero[1, 2] = 0  # storable here: zeros are kept as they are
    lin = nn.Linear(128, 64, bias=False)
    lin.weight.data = layer.dequantize(torch.float32)
    ref = QuantLinear(bits, 32, 128, 64, False)
    ref.device = torch.device("cpu")
    ref.pack(lin, layer.scale, layer.zero, None, "cpu")
    ours = pack_layer_tensors("x", layer, zero_offset=0, with_g_idx=False)
    assert set(ours) == {"x.qweight", "x.qzeros", "x.scales"}
    assert torch.equal(ours["x.qweight"], ref.qweight) and torch.equal(ours["x.qzeros"], ref.qzeros)
    back = unpack_auto_round_layer({k.split(".")[-1]: v for k, v in ours.items()}, layer.scheme, AUTO_ROUND)
    assert torch.equal(back.dequantize(), layer.dequantize())


def _qstate(tmp_path, model, bits, sym, name="q", scheme_for=None):
    layers, skipped = quantize_linears(model, bits, 32, sym, scheme_for)
    return save_test_qstate(tmp_path / name, layers, skipped, 2), layers


def test_packing_format_auto_follows_auto_round_and_explicit_choices_are_checked(tiny_model, tmp_path):
    model = tiny_model[0]
    cases = [(4, True, AUTO_GPTQ), (3, True, AUTO_GPTQ), (4, False, AUTO_AWQ), (3, False, AUTO_ROUND), (8, False, AUTO_ROUND)]
    for bits, sym, expected in cases:
        qs, _ = _qstate(tmp_path, model, bits, sym, f"q{bits}{sym}")
        assert choose_packing_format(qs, "auto") == expected
    mixed, _ = _qstate(tmp_path, model, 4, False, "mixed",
                       lambda n: LayerScheme(8 if n.endswith("down_proj") else 4, 32, False))
    assert choose_packing_format(mixed, "auto") == AUTO_ROUND
    # a sym run with one asym override: every layer decides, so never auto_gptq's zero-1 layout
    one_asym, _ = _qstate(tmp_path, model, 4, True, "one_asym",
                          lambda n: LayerScheme(4, 32, not n.endswith("down_proj")))
    assert choose_packing_format(one_asym, "auto") == AUTO_AWQ
    with pytest.raises(InputError, match="auto_round:auto_gptq stores zero-1.*pack.format=auto"):
        choose_packing_format(one_asym, AUTO_GPTQ)
    three, _ = _qstate(tmp_path, model, 3, False, "three")
    with pytest.raises(InputError, match="auto_round:auto_awq stores 4-bit weights only.*3-bit"):
        choose_packing_format(three, AUTO_AWQ)


def test_quantization_config_has_auto_rounds_keys_and_extra_config(tiny_model, tmp_path):
    def scheme_for(n):
        if n == "model.layers.0.mlp.up_proj":
            return None
        return LayerScheme(8, 32, True) if n.endswith("down_proj") else LayerScheme(4, 32, True)

    qs, _ = _qstate(tmp_path, tiny_model[0], 4, True, scheme_for=scheme_for)
    cfg = auto_round_quantization_config(qs, recipe(4, 32, True, method="autoround", iters=200), AUTO_GPTQ)
    assert cfg == {
        "quant_method": "auto-round", "packing_format": AUTO_GPTQ, "bits": 4, "group_size": 32, "sym": True,
        "data_type": "int", "block_name_to_quantize": "model.layers", "iters": 200,
        "extra_config": {
            "model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 32, "sym": True, "data_type": "int"},
            "model.layers.1.mlp.down_proj": {"bits": 8, "group_size": 32, "sym": True, "data_type": "int"},
            "model.layers.0.mlp.up_proj": {"bits": 16, "data_type": "float"},
        },
    }


@pytest.mark.parametrize("bits,sym,packing", [(4, False, "auto"), (3, False, "auto"), (2, True, "auto"),
                                              (8, False, AUTO_ROUND)])
def test_packed_checkpoint_loads_to_the_fake_quantized_logits(tiny_model, tmp_path, bits, sym, packing):
    model, _, handle = tiny_model
    qs, layers = _qstate(tmp_path, model, bits, sym)
    res = pack_auto_round(qs, source(handle.path), tmp_path / "ck", options(packing_format=packing),
                          recipe(bits, 32, sym), "id")
    assert "quantization_config.json" in res.files and "g_idx" not in json.dumps(res.files)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert cfg["packing_format"] == res.packing_format
    loaded = load_quantized_model(tmp_path / "ck", "cpu", torch.float32)
    ids = random_ids()
    assert torch.equal(logits(loaded, ids), logits(fake_quantize(model, layers), ids))


def test_act_order_layers_need_the_gptq_format(tiny_model, tmp_path):
    model, _, handle = tiny_model
    layers, skipped = quantize_linears(model, 4, 32, True)
    layers["model.layers.0.mlp.up_proj"] = act_order_layer(128, 64, 4, 32, True)
    qs = save_test_qstate(tmp_path / "q", layers, skipped, 2)
    with pytest.raises(InputError, match="no g_idx.*act-order.*pack.format=gptq"):
        pack_auto_round(qs, source(handle.path), tmp_path / "ck", options(), recipe(4, 32, True), "id")
    assert not (tmp_path / "ck").exists()


def test_compat_report_names_vllm_kernels_and_refusals(tiny_model, tmp_path):
    model, _, handle = tiny_model
    expect = {(4, False, "auto"): (AUTO_AWQ, True), (4, True, "auto"): (AUTO_GPTQ, True),
              (3, False, "auto"): (AUTO_ROUND, False)}
    for (bits, sym, packing), (fmt, loads) in expect.items():
        qs, _ = _qstate(tmp_path, model, bits, sym, f"q{bits}{sym}")
        res = pack_auto_round(qs, source(handle.path), tmp_path / f"ck{bits}{sym}", options(packing_format=packing),
                              recipe(bits, 32, sym), "id")
        rep = compatibility_report(res)
        assert res.packing_format == fmt and rep["vllm"]["loads"] is loads and rep["vllm"]["quantization"] == "inc"
        if not loads:
            assert "Unsupported packing_format: auto_round" in rep["vllm"]["reason"]
        assert rep["auto_round_loader"]["cpu"] is (fmt != AUTO_AWQ)


# --- auto-round 0.16.1's own loader (transformers + AutoRoundConfig) as a third-party consumer -------------------

def _auto_round_logits(path, ids):
    from transformers import AutoModelForCausalLM, AutoRoundConfig

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=AutoRoundConfig(backend="torch"))
    return logits(model, ids), model.dtype


def _pack(fmt, tiny_model, tmp_path, bits, sym, packing="auto"):
    model, _, handle = tiny_model
    qs, _ = _qstate(tmp_path, model, bits, sym)
    packer = pack_gptq if fmt == "gptq" else pack_auto_round
    res = packer(qs, source(handle.path), tmp_path / "ck", options(packing_format=packing), recipe(bits, 32, sym), "i")
    return res


CPU_CASES = [("gptq", b, True, "auto") for b in (2, 3, 4, 8)] + [("auto_round", b, False, AUTO_ROUND) for b in (2, 3, 4, 8)]
FAST_CASES = {("gptq", 4, True, "auto"), ("auto_round", 3, False, AUTO_ROUND)}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fmt,bits,sym,packing", [
    pytest.param(*c, marks=() if c in FAST_CASES else pytest.mark.slow) for c in CPU_CASES])
def test_auto_round_loader_on_cpu_matches_our_loader(tiny_model, tmp_path, fmt, bits, sym, packing):
    res = _pack(fmt, tiny_model, tmp_path, bits, sym, packing)
    assert compatibility_report(res)["auto_round_loader"]["cpu"] is True
    ids = random_ids()
    theirs, dtype = _auto_round_logits(res.path, ids)
    assert dtype == torch.float16  # auto-round forces float16 on CPU
    ours = logits(load_quantized_model(res.path, "cpu", torch.float16), ids)
    torch.testing.assert_close(theirs, ours, atol=3e-3, rtol=1e-2)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fmt,packing", [("auto_round", AUTO_AWQ)])
def test_auto_round_loader_on_cpu_fails_for_zero_point_layouts(tiny_model, tmp_path, fmt, packing):
    """Documents the third-party failure the compat report names: the AWQ layout on CPU.

    Without auto-round-lib its backend selection falls to `auto_round:fake`, whose forward calls
    get_quant_func with act_data_type=None and raises TypeError. If this starts to pass, update
    stages.formats.compat.auto_round_loader_report.
    """
    res = _pack(fmt, tiny_model, tmp_path, 4, False, packing)
    assert compatibility_report(res)["auto_round_loader"]["cpu"] is False
    with pytest.raises(TypeError, match="NoneType"):
        _auto_round_logits(res.path, random_ids())


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fmt,bits,sym,packing", CPU_CASES)
def test_auto_round_loader_on_cuda_matches_our_loader(tiny_model, tmp_path, fmt, bits, sym, packing):
    """The GPU machine: auto-round's CUDA path loads our checkpoints with the same logits (float16 tolerance)."""
    from transformers import AutoModelForCausalLM, AutoRoundConfig

    res = _pack(fmt, tiny_model, tmp_path, bits, sym, packing)
    ids = random_ids().cuda()
    theirs_model = AutoModelForCausalLM.from_pretrained(res.path, quantization_config=AutoRoundConfig(backend="auto"),
                                                        dtype=torch.float16, device_map="cuda:0")
    theirs = logits(theirs_model, ids)
    ours = logits(load_quantized_model(res.path, "cuda:0", torch.float16), ids)
    torch.testing.assert_close(theirs, ours, atol=3e-3, rtol=1e-2)
