"""Recovery cores: the trainable quantized Linear, the losses, the sampler and schedules, the adapter files."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import InputError
from core.schema import RecoverConfig
from stages.quant.base import LayerScheme, QuantizedLayer
from stages.quant.qdq import dequantize, quantize_weight
from stages.recovery.adapter import LoraAdapter, read_adapter, vllm_max_lora_rank, write_adapter
from stages.recovery.losses import TopK, kl_full, kl_topk, lm_ce, teacher_topk
from stages.recovery.qlinear import RecoverLinear
from stages.recovery.trainer import batch_samples, cosine_schedule, linear_schedule, lr_at


def _layer(out_f=48, in_f=64, bits=2, group=16, sym=False, act_order=False, seed=0) -> QuantizedLayer:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    codes, qp = quantize_weight(w, bits, group, sym)
    g_idx = torch.randperm(in_f, generator=g).to(torch.int32) // group if act_order else None
    return QuantizedLayer(codes, qp.scale, qp.zero, LayerScheme(bits, group, sym), g_idx)


def _reference_weight(layer: QuantizedLayer, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """W from plain autograd ops, group by group (the straightforward reference)."""
    idx = layer.g_idx.long() if layer.g_idx is not None else torch.arange(layer.codes.shape[1]) // layer.scheme.group_size
    return scale[:, idx] * (layer.codes.float() - zero[:, idx])


@pytest.mark.parametrize("sym,act_order,group", [(False, False, 16), (True, False, 16), (False, True, 16),
                                                 (False, False, -1)])
def test_forward_equals_the_dequantized_linear(sym, act_order, group):
    layer = _layer(sym=sym, act_order=act_order, group=group)
    bias = torch.randn(48)
    x = torch.randn(3, 5, 64)
    mod = RecoverLinear(layer, bias)
    w = dequantize(layer.codes, layer.scale, layer.zero, group, layer.g_idx)
    assert torch.equal(mod(x), F.linear(x, w, bias))
    assert torch.equal(mod.dequantize(), w)


@pytest.mark.parametrize("act_order", [False, True])
def test_gradients_of_scales_zeros_and_input_match_plain_autograd(act_order):
    layer = _layer(act_order=act_order)
    mod = RecoverLinear(layer)
    mod.enable_scales()
    mod.enable_zeros()
    with torch.no_grad():
        mod.scale_delta.uniform_(-0.1, 0.1)
        mod.zero_delta.uniform_(-0.3, 0.3)
    x = torch.randn(4, 7, 64, requires_grad=True)
    target = torch.randn(4, 7, 48)
    ((mod(x) - target) ** 2).sum().backward()
    # reference: the same parametrisation through ordinary autograd (straight-through round of the zero)
    d_s = mod.scale_delta.detach().clone().requires_grad_()
    d_z = mod.zero_delta.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    z = layer.zero + d_z
    z = (z + (torch.round(z) - z).detach()).clamp(0, 3)
    w = _reference_weight(layer, layer.scale * (1 + d_s), z)
    ((F.linear(x2, w) - target) ** 2).sum().backward()
    for got, want in ((mod.scale_delta.grad, d_s.grad), (mod.zero_delta.grad, d_z.grad), (x.grad, x2.grad)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_export_keeps_codes_and_rounds_the_tuned_scales_to_float16():
    layer = _layer()
    mod = RecoverLinear(layer)
    same = mod.exported()
    assert torch.equal(same.codes, layer.codes) and torch.equal(same.scale, layer.scale)
    assert torch.equal(same.zero, layer.zero)
    mod.enable_scales()
    mod.enable_zeros()
    with torch.no_grad():
        mod.scale_delta.fill_(0.1)
        mod.zero_delta.fill_(0.6)  # rounds every zero up by one (clamped to the 2-bit range)
    out = mod.exported()
    assert torch.equal(out.codes, layer.codes) and out.scheme == layer.scheme
    assert torch.equal(out.scale, (layer.scale * 1.1).to(torch.float16).float())
    assert torch.equal(out.zero, (layer.zero + 1).clamp(0, 3))


def test_lora_term_is_what_peft_computes_on_the_dequantized_linear():
    from peft import LoraConfig, get_peft_model

    layer = _layer(out_f=32, in_f=64)
    mod = RecoverLinear(layer)
    mod.enable_lora(4, 8.0)
    with torch.no_grad():
        mod.lora_B.normal_()
    dense = torch.nn.Sequential()
    dense.add_module("proj", torch.nn.Linear(64, 32, bias=False))
    dense.proj.weight.data = layer.dequantize()
    peft = get_peft_model(dense, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    wrapped = peft.base_model.model.proj
    wrapped.lora_A["default"].weight.data = mod.lora_A.data.clone()
    wrapped.lora_B["default"].weight.data = mod.lora_B.data.clone()
    x = torch.randn(6, 64)
    assert torch.allclose(mod(x), peft(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mod(x), F.linear(x, layer.dequantize()), atol=1e-3)


def test_kl_topk_with_every_token_is_the_full_kl_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    teacher, student = torch.randn(10, 50) * 3, torch.randn(10, 50) * 3
    full = kl_full(student, teacher)
    assert torch.allclose(kl_topk(student, teacher_topk(teacher, 50)), full, rtol=1e-5)
    partial = kl_topk(student, teacher_topk(teacher, 5))
    assert 0 < partial < full  # KL of a coarsening never exceeds the KL (data processing inequality)
    t = teacher_topk(teacher, 5)
    assert torch.allclose(t.logp.exp().sum(-1) + t.logp_rest.exp(), torch.ones(10), atol=1e-6)
    assert kl_topk(teacher, teacher_topk(teacher, 5)).abs() < 1e-5 and kl_full(teacher, teacher).abs() < 1e-5
    labels = torch.randint(0, 50, (10,))
    assert torch.allclose(lm_ce(student, labels), F.cross_entropy(student, labels, reduction="sum"))


def test_batches_visit_every_training_sample_once_per_epoch_and_depend_only_on_the_step():
    train_idx = torch.tensor([0, 2, 3, 5, 7, 8])
    epoch = torch.cat([batch_samples(s, m, train_idx, 2, 1, seed=3) for s in range(3) for m in range(1)])
    assert sorted(epoch.tolist()) == train_idx.tolist()
    assert torch.equal(batch_samples(4, 1, train_idx, 2, 2, 3), batch_samples(4, 1, train_idx, 2, 2, 3))
    assert not torch.equal(torch.cat([batch_samples(s, 0, train_idx, 2, 1, 3) for s in range(3)]),
                           torch.cat([batch_samples(s, 0, train_idx, 2, 1, 4) for s in range(3)]))


def test_schedules_warm_up_then_decay_to_zero():
    assert [lr_at(linear_schedule, s, 10, 0) for s in (0, 5)] == [1.0, 0.5]
    assert lr_at(cosine_schedule, 5, 10, 0) == pytest.approx(0.5)
    assert lr_at(cosine_schedule, 0, 10, 4) == pytest.approx(0.2)  # warmup: (step + 1) / (warmup + 1)
    assert lr_at(cosine_schedule, 4, 10, 4) == 1.0
    assert lr_at(cosine_schedule, 9, 10, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_adapter_read_back(tmp_path):
    a, b = torch.randn(4, 64), torch.randn(32, 4)
    adapter = LoraAdapter(4, 8.0, ["q_proj"], {"model.layers.0.self_attn.q_proj": (a, b)})
    assert write_adapter(tmp_path, adapter, "m") == ["adapter_config.json", "adapter_model.safetensors"]
    back = read_adapter(tmp_path)
    assert back.rank == 4 and back.scaling == 2.0 and back.target_modules == ["q_proj"]
    got_a, got_b = back.weights["model.layers.0.self_attn.q_proj"]
    assert torch.equal(got_a, a) and torch.equal(got_b, b)
    assert [vllm_max_lora_rank(r) for r in (1, 2, 16, 17, 300)] == [1, 8, 16, 32, 320]


def test_recover_config_defaults_name_registered_choices():
    from stages import registry

    cfg = RecoverConfig()
    assert cfg.mode == "none" and cfg.loss in registry.RECOVER_LOSSES and cfg.teacher in registry.RECOVER_TEACHERS
    assert cfg.schedule in registry.RECOVER_SCHEDULES and cfg.lora_init in registry.LORA_INITS
    assert set(registry.RECOVER_MODES) == {"scales", "lora", "scales_lora"}


def test_torch_backend_lora_on_fused_linears_equals_peft_per_module():
    from stages.bench.lora import LoraKernelLinear, add_lora
    from stages.kernels.linear import DenseWeight, KernelLinear, Route

    torch.manual_seed(0)
    outs = {"q": 64, "k": 32, "v": 32}
    w = {n: torch.randn(o, 64) for n, o in outs.items()}
    fused = KernelLinear({"dense": DenseWeight(torch.cat(list(w.values())))}, [Route(1 << 30, "dense")])
    down = KernelLinear({"dense": DenseWeight(torch.randn(64, 128))}, [Route(1 << 30, "dense")])
    weights = {f"model.layers.0.self_attn.{n}_proj": (torch.randn(4, 64), torch.randn(o, 4))
               for n, o in outs.items() if n != "k"}  # k has no adapter: its slice stays the base output
    adapter = LoraAdapter(4, 8.0, ["q_proj", "v_proj"], weights)
    linears = {"layers.0.qkv": fused, "layers.0.down": down}
    sizes = {"layers.0.qkv": list(outs.values()), "layers.0.down": [64]}
    assert add_lora(linears, adapter, sizes, "model.layers", torch.float32, "cpu") == 1
    assert isinstance(linears["layers.0.qkv"], LoraKernelLinear) and linears["layers.0.down"] is down
    x = torch.randn(3, 64)
    want = []
    for n in outs:
        y = F.linear(x, w[n])
        if f"model.layers.0.self_attn.{n}_proj" in weights:
            a, b = weights[f"model.layers.0.self_attn.{n}_proj"]
            y = y + (x @ a.t()) @ b.t() * adapter.scaling
        want.append(y)
    assert torch.allclose(linears["layers.0.qkv"](x), torch.cat(want, -1), atol=1e-5)
    stray = LoraAdapter(4, 8.0, ["lm_head"], {"lm_head": (torch.randn(4, 64), torch.randn(10, 4))})
    with pytest.raises(InputError, match="cannot place"):
        add_lora({"layers.0.down": down}, stray, {"layers.0.down": [64]}, "model.layers", torch.float32, "cpu")
