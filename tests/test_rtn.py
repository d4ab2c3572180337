"""Round-to-nearest through the block driver: every block Linear, lm_head policy, exact codes."""

from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from core.schema import RTNConfig, quant_config
from stages.quant.driver import quantize_model
from stages.quant.qdq import quantize_weight
from stages.quant.rtn import RTNQuantizer, rtn_layer
from _quant_helpers import tiny_llama


def test_rtn_layer_is_quantize_weight():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    from stages.quant.base import LayerScheme

    layer = rtn_layer(w, LayerScheme(3, 16, False))
    codes, qp = quantize_weight(w, 3, 16, False)
    assert torch.equal(layer.codes, codes) and torch.equal(layer.scale, qp.scale) and torch.equal(layer.zero, qp.zero)


def test_rtn_model_quantizes_every_block_linear_without_calibration():
    model = tiny_llama()
    original = {n: p.clone() for n, p in model.named_parameters()}
    result = quantize_model(model, None, quant_config(method="rtn", bits=4, group_size=32, sym=True), "cpu")
    names = sorted(result.layers)
    assert len(names) == 2 * 7 and names[0] == "model.layers.0.mlp.down_proj"
    assert result.meta == {"skipped": ["lm_head"], "blocks": "model.layers", "num_blocks": 2, "method": "rtn"}
    for name, layer in result.layers.items():
        w = original[name + ".weight"]
        codes, qp = quantize_weight(w, 4, 32, True)
        assert torch.equal(layer.codes, codes)
        # the model now holds the dequantized weights
        assert torch.equal(model.get_parameter(name + ".weight"), layer.dequantize())
    assert torch.equal(model.lm_head.weight, original["lm_head.weight"])
    assert torch.equal(model.model.embed_tokens.weight, original["model.embed_tokens.weight"])


def test_quantize_lm_head_when_untied_and_refused_when_tied():
    model = tiny_llama()
    result = quantize_model(model, None, quant_config(method="rtn", bits=8, group_size=64, quantize_lm_head=True), "cpu")
    assert "lm_head" in result.layers and result.meta["skipped"] == []
    tied = tiny_llama(tie=True)
    with pytest.raises(ConfigError, match="quant.quantize_lm_head=True cannot be used: lm_head shares its weight"):
        quantize_model(tied, None, quant_config(method="rtn", quantize_lm_head=True, group_size=32), "cpu")


def test_rtn_quantizer_ignores_layers_not_in_schemes():
    from stages.quant.base import LayerScheme

    model = tiny_llama()
    block = model.model.layers[0]
    before = block.mlp.up_proj.weight.clone()
    res = RTNQuantizer(RTNConfig()).quantize_block(block, {"self_attn.q_proj": LayerScheme(2, 32, False)}, None, None,
                                                     torch.device("cpu"))
    assert list(res.layers) == ["self_attn.q_proj"]
    assert torch.equal(block.mlp.up_proj.weight, before)
