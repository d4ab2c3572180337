"""qdq math: exact codes against a straightforward per-group reference and the installed auto-round."""

from __future__ import annotations

import itertools

import pytest
import torch

from stages.quant.base import LayerScheme
from stages.quant.fakequant import build_buckets, export_layers, fake_quant, split_layers
from stages.quant.qdq import (SCALE_EPS_F16, compute_qparams, dequantize, group_index, qdq_ste, quantize,
                              quantize_weight)

BITS = (2, 3, 4, 8)
GROUPS = (16, 32, -1)
CASES = list(itertools.product(BITS, (False, True), GROUPS))


def _weight(seed: int, out_f: int = 12, in_f: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[0, :] = w[0, :].abs()  # a row with no negative values (min clamps to 0)
    w[1, :] = -w[1, :].abs()  # a row with no positive values
    w[2, :8] = 0.0  # a zero group for group size 8/16
    return w


def _reference_group(vals: list[float], bits: int, sym: bool, fmin: float = 1.0, fmax: float = 1.0):
    """One group, written out plainly: (codes, scale, zero) per qdq's docstring."""
    t = torch.tensor(vals, dtype=torch.float32)
    lo = min(min(vals), 0.0) * fmin
    hi = max(max(vals), 0.0) * fmax
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    if sym:
        half = 2 ** (bits - 1)
        raw = (-lo_t if -lo > hi else -hi_t) / half
        scale = float(raw.to(torch.float16))
        scale = min(scale, -SCALE_EPS_F16) if scale < 0 else max(scale, SCALE_EPS_F16)
        zero = half
    else:
        maxq = 2 ** bits - 1
        scale = max(float(((hi_t - lo_t) / maxq).to(torch.float16)), SCALE_EPS_F16)
        zero = min(max(float(torch.round(-lo_t / torch.tensor(scale))), 0), maxq)
    codes = [int(min(max(round_half_even(float(x / torch.tensor(scale))) + zero, 0), 2 ** bits - 1)) for x in t]
    return codes, scale, zero


def round_half_even(x: float) -> float:
    return float(torch.round(torch.tensor(x)))


@pytest.mark.parametrize("bits,sym,group_size", CASES)
def test_codes_scales_zeros_match_plain_reference(bits, sym, group_size):
    w = _weight(bits * 10 + sym)
    codes, qp = quantize_weight(w, bits, group_size, sym)
    gs = w.shape[1] if group_size == -1 else group_size
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // gs):
            ref_codes, ref_scale, ref_zero = _reference_group(w[r, g * gs:(g + 1) * gs].tolist(), bits, sym)
            assert codes[r, g * gs:(g + 1) * gs].tolist() == ref_codes
            assert qp.scale[r, g].item() == ref_scale
            assert qp.zero[r, g].item() == ref_zero
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
    deq = dequantize(codes, qp.scale, qp.zero, group_size)
    # the error is at most one step (half from rounding, half from the rounded zero / the
    # one-sided clamp of the full-range sym grid) and most values are within half a step
    step = qp.scale.abs().repeat_interleave(gs, dim=1)
    err = (deq - w).abs()
    assert bool((err <= step * 1.0 + 1e-7).all())
    assert float((err <= step * 0.5 + 1e-7).float().mean()) > 0.9


@pytest.mark.parametrize("bits,sym", list(itertools.product(BITS, (False, True))))
def test_clipping_factors_match_plain_reference(bits, sym):
    w = _weight(7)
    gs = 16
    g = torch.Generator().manual_seed(1)
    fmin = torch.rand(w.shape[0], w.shape[1] // gs, generator=g) * 0.5 + 0.5
    fmax = torch.rand(w.shape[0], w.shape[1] // gs, generator=g) * 0.5 + 0.5
    codes, qp = quantize_weight(w, bits, gs, sym, min_factor=fmin, max_factor=fmax)
    for r, gi in itertools.product(range(w.shape[0]), range(w.shape[1] // gs)):
        ref = _reference_group(w[r, gi * gs:(gi + 1) * gs].tolist(), bits, sym, fmin[r, gi].item(), fmax[r, gi].item())
        assert codes[r, gi * gs:(gi + 1) * gs].tolist() == ref[0]
        assert qp.scale[r, gi].item() == ref[1]


def test_sym_scale_sign_follows_the_dominant_side():
    w = torch.tensor([[0.5, -0.1, 0.2, 0.0], [-0.5, 0.1, 0.2, 0.0]])
    codes, qp = quantize_weight(w, 4, -1, True)
    assert qp.scale[0, 0].item() == pytest.approx(-0.5 / 8, rel=1e-3)  # positive side dominates: negative scale
    assert qp.scale[1, 0].item() == pytest.approx(0.5 / 8, rel=1e-3)
    assert codes[0, 0].item() == 0 and codes[1, 0].item() == 0  # the dominant extreme maps to code 0
    assert torch.equal(qp.zero, torch.full_like(qp.zero, 8.0))


def test_all_zero_weight_gets_the_minimum_scale():
    codes, qp = quantize_weight(torch.zeros(2, 8), 4, 4, False)
    assert torch.equal(qp.scale, torch.full_like(qp.scale, SCALE_EPS_F16))
    assert torch.equal(dequantize(codes, qp.scale, qp.zero, 4), torch.zeros(2, 8))


def test_scales_are_exact_float16_values():
    w = _weight(3) * 1e-3  # tiny weights exercise the float16 clamp
    for sym in (False, True):
        _, qp = quantize_weight(w, 4, 16, sym)
        assert torch.equal(qp.scale, qp.scale.half().float())


def test_dequantize_with_natural_g_idx_equals_grouped():
    w = _weight(4)
    codes, qp = quantize_weight(w, 3, 16, False)
    a = dequantize(codes, qp.scale, qp.zero, 16)
    b = dequantize(codes, qp.scale, qp.zero, 16, g_idx=group_index(64, 16))
    assert torch.equal(a, b)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    shuffled = dequantize(codes[:, perm], qp.scale, qp.zero, 16, g_idx=group_index(64, 16)[perm])
    assert torch.equal(shuffled, a[:, perm])


@pytest.mark.parametrize("bits,sym,group_size", [(2, False, 16), (4, True, -1), (3, False, -1), (8, True, 32)])
def test_matches_installed_auto_round(bits, sym, group_size):
    """Our codes/scales/zeros and W_hat equal auto_round.data_type.int's (called, not copied)."""
    from auto_round.data_type.int import quant_tensor_asym, quant_tensor_sym

    w = _weight(11, 16, 128)
    gs = 128 if group_size == -1 else group_size
    g = torch.Generator().manual_seed(2)
    v = (torch.rand(16, 128, generator=g) - 0.5) * 0.8
    fmin = torch.rand(16, 128 // gs, generator=g) * 0.4 + 0.6
    fmax = torch.rand(16, 128 // gs, generator=g) * 0.4 + 0.6
    ref_fn = quant_tensor_sym if sym else quant_tensor_asym
    ref, ref_scale, ref_zero = ref_fn(w, bits=bits, group_size=group_size, v=v.reshape(-1, gs),
                                      min_scale=fmin.reshape(-1), max_scale=fmax.reshape(-1))
    codes, qp = quantize_weight(w, bits, group_size, sym, v=v, min_factor=fmin, max_factor=fmax)
    assert torch.equal(dequantize(codes, qp.scale, qp.zero, group_size), ref.reshape(16, 128))
    assert torch.equal(qp.scale.reshape(-1), ref_scale.float().reshape(-1))
    if sym:
        assert ref_zero == 2 ** (bits - 1) and bool((qp.zero == ref_zero).all())
    else:
        assert torch.equal(qp.zero.reshape(-1), ref_zero.float().reshape(-1))


def _bucket_case(bits, sym, group_size, seed=0):
    w = _weight(seed, 16, 128)
    bucket = build_buckets({"a": w}, {"a": LayerScheme(bits, group_size, sym)})[0]
    g = torch.Generator().manual_seed(seed + 1)
    v = (torch.rand(bucket.weight.shape, generator=g) - 0.5) * 0.6
    fmin = torch.rand(bucket.rows, generator=g) * 0.5 + 0.5
    fmax = torch.rand(bucket.rows, generator=g) * 0.5 + 0.5
    return w, bucket, v, fmin, fmax


@pytest.mark.parametrize("bits,sym,group_size", CASES)
def test_fake_quant_equals_exported_codes(bits, sym, group_size):
    w, bucket, v, fmin, fmax = _bucket_case(bits, sym, group_size, seed=bits)
    fq = fake_quant(bucket, v, fmin, fmax)
    layer = export_layers(bucket, v, fmin, fmax)["a"]
    assert torch.equal(split_layers(bucket, fq)["a"], layer.dequantize())


@pytest.mark.parametrize("bits,sym,group_size", [(2, False, 32), (4, True, 32), (3, False, -1), (8, True, -1)])
def test_ste_gradients_match_auto_round_autograd(bits, sym, group_size):
    """Straight-through gradients for V are identical to the reference's; min/max factors agree
    to float16 precision (the reference backpropagates through its float16 scale tensor)."""
    from auto_round.data_type.int import quant_tensor_asym, quant_tensor_sym

    w, bucket, v, fmin, fmax = _bucket_case(bits, sym, group_size, seed=5)
    ours = [t.clone().requires_grad_() for t in (v, fmin, fmax)]
    out = fake_quant(bucket, *ours)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * upstream).sum().backward()
    theirs = [t.clone().requires_grad_() for t in (v, fmin, fmax)]
    ref_fn = quant_tensor_sym if sym else quant_tensor_asym
    ref, _, _ = ref_fn(w, bits=bits, group_size=group_size, v=theirs[0], min_scale=theirs[1], max_scale=theirs[2])
    assert torch.equal(out, ref.reshape(out.shape))
    (ref.reshape(out.shape) * upstream).sum().backward()
    assert torch.equal(ours[0].grad, theirs[0].grad)
    for a, b in ((ours[1].grad, theirs[1].grad), (ours[2].grad, theirs[2].grad)):
        assert (a - b).abs().max() <= 4e-3 * b.abs().max()
        big = b.abs() > 1e-2 * b.abs().max()
        assert torch.equal(torch.sign(a[big]), torch.sign(b[big]))


def test_ste_gradient_of_v_is_scale_inside_the_range_and_zero_outside():
    w = torch.tensor([[0.0, 0.1, 0.2, 0.3, -0.3, 0.05, 0.15, 0.25]])
    v = torch.tensor([[0.0, 0.4, -0.3, 0.7, -0.49, 0.2, 0.0, 0.0]], requires_grad=True)  # 0.3 + 0.7 leaves the range
    out = qdq_ste(w, 2, 4, False, v=v)
    out.sum().backward()
    qp = compute_qparams(w, 2, 4, False)
    x = w.reshape(1, 2, 4) / qp.scale.unsqueeze(-1) + v.detach().reshape(1, 2, 4)
    y = torch.round(x) + qp.zero.unsqueeze(-1)
    inside = ((y >= 0) & (y <= 3)).reshape(1, 8)
    expected = torch.where(inside, qp.scale.repeat_interleave(4, dim=1), torch.zeros(1, 8))
    assert torch.equal(v.grad, expected)
    assert not bool(inside.all())  # the case covers a clamped element
    codes = quantize(w, qp, 2, 4, v.detach())
    assert torch.equal(out.detach(), dequantize(codes, qp.scale, qp.zero, 4))


def test_buckets_flatten_layers_with_equal_group_length():
    a, b, c = torch.randn(8, 32), torch.randn(4, 32), torch.randn(8, 64)
    schemes = {"a": LayerScheme(4, 16, True), "b": LayerScheme(4, 16, True), "c": LayerScheme(4, -1, True)}
    buckets = build_buckets({"a": a, "b": b, "c": c}, schemes)
    assert [(bk.group_len, bk.rows) for bk in buckets] == [(16, 8 * 2 + 4 * 2), (64, 8)]
    views = split_layers(buckets[0], buckets[0].weight)
    assert torch.equal(views["a"], a) and torch.equal(views["b"], b)
    assert torch.equal(buckets[0].wmin[:2], a[0].reshape(2, 16).amin(1).clamp(max=0))


@pytest.mark.parametrize("bits,sym,group_size", [(2, False, 32), (4, True, 32), (3, False, -1)])
def test_compile_graph_form_equals_the_fused_function(bits, sym, group_size):
    """Under torch.compile the plain STE graph replaces the custom Function: same values and gradients."""
    from stages.quant.fakequant import _fake_quant_graph, group_scale_zero

    w, bucket, v, fmin, fmax = _bucket_case(bits, sym, group_size, seed=8)
    upstream = torch.randn(bucket.weight.shape, generator=torch.Generator().manual_seed(4))
    grads = []
    for graph in (False, True):
        leaves = [t.clone().requires_grad_() for t in (v, fmin, fmax)]
        if graph:
            scale, zero_f = group_scale_zero(bucket, leaves[1], leaves[2])
            out = _fake_quant_graph(bucket.weight, leaves[0], scale, zero_f, 2 ** bits - 1, float(2 ** (bits - 1)),
                                    torch.float32)
        else:
            out = fake_quant(bucket, *leaves)
        (out * upstream).sum().backward()
        grads.append((out.detach(), *[t.grad for t in leaves]))
    (o1, v1, n1, x1), (o2, v2, n2, x2) = grads
    assert torch.equal(o1, o2) and torch.equal(v1, v2)
    torch.testing.assert_close(n1, n2, rtol=1e-5, atol=1e-6 * float(n1.abs().max()))
    torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-6 * float(x1.abs().max()))
