"""Every pack format stores the quantized numbers exactly, or refuses before writing anything.

The checkpoint is read back by an unpacker written here from the format descriptions alone
(plain Python integers, one value at a time), not by the project's own loader, and compared
with the qstate: codes, fp16 scale bits and zero points, for bits 2/3/4/8, sym and asym,
including groups whose zero point is 0 (what GPTQ v1's zero-1 convention cannot hold) and
groups at the top of the range.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.errors import InputError
from stages.formats.auto_round import pack_auto_round
from stages.formats.choice import pack_auto
from stages.formats.gptq import pack_gptq, pack_gptq_v2
from stages.quant.base import LayerScheme, QuantizedLayer

from _formats_helpers import options, recipe, save_test_qstate, source, write_fake_source

SHAPES = {"model.layers.0.mlp.up_proj": (64, 128), "model.layers.0.mlp.down_proj": (128, 64)}
GROUP = 32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _layer(out_f: int, in_f: int, bits: int, sym: bool, seed: int) -> QuantizedLayer:
    g = torch.Generator().manual_seed(seed)
    groups = in_f // GROUP
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scale = ((torch.rand(out_f, groups, generator=g) - 0.5) * 0.04).half().float()
    scale = torch.where(scale.abs() < 1e-4, torch.full_like(scale, 1e-3), scale).abs() if not sym else scale
    if sym:
        zero = torch.full((out_f, groups), 2.0 ** (bits - 1))
    else:
        zero = torch.randint(0, 2**bits, (out_f, groups), generator=g).float()
        zero[0, :] = 0  # the values GPTQ v1 cannot store ...
        zero[1, :] = 2**bits - 1  # ... and the top of the range
    return QuantizedLayer(codes, scale, zero, LayerScheme(bits, GROUP, sym))


def _setup(tmp_path, bits: int, sym: bool):
    layers = {n: _layer(o, i, bits, sym, seed) for seed, (n, (o, i)) in enumerate(SHAPES.items())}
    qs = save_test_qstate(tmp_path / "qstate", layers, [], num_blocks=1)
    tensors = {f"{n}.weight": torch.zeros(o, i) for n, (o, i) in SHAPES.items()}
    tensors["model.norm.weight"] = torch.linspace(-1, 1, 64)
    src = write_fake_source(tmp_path / "src", tensors, {"num_hidden_layers": 1, "tie_word_embeddings": False,
                                                        "model_type": "llama", "dtype": "float32"})
    return layers, qs, source(src)


def _stream_values(words: list[int], bits: int, count: int) -> list[int]:
    """Values k = 0..count-1 at bits [k*bits, (k+1)*bits) of the little-endian concatenation of 32-bit words."""
    big = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words))
    return [(big >> (k * bits)) & (2**bits - 1) for k in range(count)]


def _gptq_codes(qweight: np.ndarray, bits: int, in_f: int) -> np.ndarray:
    """qweight int32 [in*bits/32, out]: each column is a bit stream of its in_f codes."""
    return np.array([_stream_values([int(w) for w in qweight[:, j]], bits, in_f)
                     for j in range(qweight.shape[1])], dtype=np.int64)  # [out, in]


def _gptq_zeros(qzeros: np.ndarray, bits: int, out_f: int, offset: int) -> np.ndarray:
    """qzeros int32 [groups, out*bits/32]: each group row is a bit stream of out_f stored zeros (zero - offset)."""
    rows = [_stream_values([int(w) for w in qzeros[g]], bits, out_f) for g in range(qzeros.shape[0])]
    return np.array(rows, dtype=np.int64).T + offset  # [out, groups]


def _awq_unpack(packed: np.ndarray) -> np.ndarray:
    """int32 [K, N/8] -> [K, N]: nibble p of word w holds column 8*w + AWQ_ORDER[p]."""
    k_dim, n_words = packed.shape
    out = np.zeros((k_dim, n_words * 8), dtype=np.int64)
    for r in range(k_dim):
        for w in range(n_words):
            word = int(packed[r, w]) & 0xFFFFFFFF
            for p in range(8):
                out[r, 8 * w + AWQ_ORDER[p]] = (word >> (4 * p)) & 0xF
    return out


def read_back(folder, name: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [out, in], fp16 scale bits [out, groups], zeros [out, groups]) of one layer, from the files alone."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    t = {k: v.numpy() for k, v in load_file(str(folder / "model.safetensors")).items() if k.startswith(name + ".")}
    out_f, in_f = shape
    bits = qc.get("extra_config", {}).get(name, {}).get("bits", qc["bits"])
    scales = t[f"{name}.scales"].astype(np.float16).view(np.int16).T
    if qc["quant_method"] == "auto-round" and qc["packing_format"] == "auto_round:auto_awq":
        return _awq_unpack(t[f"{name}.qweight"]).T, scales, _awq_unpack(t[f"{name}.qzeros"]).T
    if qc["quant_method"] == "gptq":
        offset = 0 if qc["checkpoint_format"] == "gptq_v2" else 1
    else:
        offset = 1 if qc["packing_format"] == "auto_round:auto_gptq" else 0
    codes = _gptq_codes(t[f"{name}.qweight"], bits, in_f)
    return codes, scales, _gptq_zeros(t[f"{name}.qzeros"], bits, out_f, offset)


PACKERS = {
    "auto": (pack_auto, "auto"),
    "gptq": (pack_gptq, "auto"),
    "gptq_v2": (pack_gptq_v2, "auto"),
    "auto_round": (pack_auto_round, "auto"),
    "auto_round:auto_awq": (pack_auto_round, "auto_round:auto_awq"),
    "auto_round:auto_round": (pack_auto_round, "auto_round"),
    "auto_round:auto_gptq": (pack_auto_round, "auto_round:auto_gptq"),
}
# (format, bits, sym) that must be refused: v1 zeros cannot hold asym zero 0; AWQ is 4-bit only.
REFUSED = {("gptq", b, False) for b in (2, 3, 4, 8)} | {("auto_round:auto_gptq", b, False) for b in (2, 3, 4, 8)} \
    | {("auto_round:auto_awq", b, s) for b in (2, 3, 8) for s in (True, False)}


@pytest.mark.parametrize("fmt", list(PACKERS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_every_format_reads_back_exactly_or_refuses(tmp_path, fmt, bits, sym):
    layers, qs, src = _setup(tmp_path, bits, sym)
    packer, packing = PACKERS[fmt]
    out = tmp_path / "ckpt"
    if (fmt, bits, sym) in REFUSED:
        with pytest.raises(InputError, match="zero-1|4-bit"):
            packer(qs, src, out, options(packing_format=packing), recipe(bits, GROUP, sym), "id")
        assert not out.exists()
        return
    result = packer(qs, src, out, options(packing_format=packing), recipe(bits, GROUP, sym), "id")
    assert result.extras["verified_layers"] == len(SHAPES)
    for name, shape in SHAPES.items():
        codes, scale_bits, zeros = read_back(out, name, shape)
        layer = layers[name]
        np.testing.assert_array_equal(codes, layer.codes.numpy().astype(np.int64))
        np.testing.assert_array_equal(scale_bits, layer.scale.half().view(torch.int16).numpy())
        np.testing.assert_array_equal(zeros, layer.zero.numpy().astype(np.int64))


@pytest.mark.parametrize("bits,sym,expected", [
    (4, True, "gptq"), (2, True, "gptq"), (4, False, "auto_round:auto_awq"), (3, False, "auto_round"),
    (2, False, "auto_round"), (8, False, "auto_round"),
])
def test_auto_picks_the_served_exact_layout(tmp_path, bits, sym, expected):
    _, qs, src = _setup(tmp_path, bits, sym)
    result = pack_auto(qs, src, tmp_path / "ckpt", options(torch.bfloat16), recipe(bits, GROUP, sym), "id")
    assert result.packing_format == expected


def test_auto_keeps_act_order_asym_in_gptq_v2(tmp_path):
    from _formats_helpers import act_order_layer

    name, (out_f, in_f) = "model.layers.0.mlp.up_proj", (64, 128)
    layer = act_order_layer(out_f, in_f, 3, GROUP, sym=False)
    layer.zero[0, :] = 0
    qs = save_test_qstate(tmp_path / "qs", {name: layer}, [], num_blocks=1)
    src = write_fake_source(tmp_path / "src", {f"{name}.weight": torch.zeros(out_f, in_f)},
                            {"num_hidden_layers": 1, "tie_word_embeddings": False, "model_type": "llama"})
    result = pack_auto(qs, source(src), tmp_path / "ckpt", options(), recipe(3, GROUP, False, method="gptq"), "id")
    assert result.packing_format == "gptq_v2" and result.quantization_config["checkpoint_format"] == "gptq_v2"
    codes, _, zeros = read_back(tmp_path / "ckpt", name, (out_f, in_f))
    assert (zeros == layer.zero.numpy()).all() and (codes == layer.codes.numpy()).all()
    g_idx = load_file(str(tmp_path / "ckpt" / "model.safetensors"))[f"{name}.g_idx"]
    assert torch.equal(g_idx, layer.g_idx)


def test_a_layout_that_loses_numbers_fails_the_pack_and_writes_nothing(tmp_path, monkeypatch):
    """The pack-time check compares what was written with the qstate: a lossy layout cannot slip through."""
    from stages.formats import gptq

    layers, qs, src = _setup(tmp_path, 4, True)
    real = gptq.pack_layer_tensors

    def lossy(name, layer, zero_offset=1, with_g_idx=True):
        tensors = real(name, layer, zero_offset, with_g_idx)
        tensors[f"{name}.scales"] = tensors[f"{name}.scales"] * 1.001  # one fp16 step off somewhere
        return tensors

    monkeypatch.setattr(gptq, "pack_layer_tensors", lossy)
    with pytest.raises(InputError, match=r"did not store the quantized weights exactly \(2 layers.*scales differ"):
        pack_gptq(qs, src, tmp_path / "ckpt", options(), recipe(4, GROUP, True), "id")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("model_dtype,source_dtype,expected", [
    ("auto", torch.float32, torch.bfloat16),  # a float32 source (e.g. converted from GGUF) ships 16-bit tensors
    ("auto", None, torch.bfloat16),
    ("auto", torch.float16, torch.float16),
    ("auto", torch.bfloat16, torch.bfloat16),
    ("float32", torch.bfloat16, torch.float32),  # an explicit model.dtype wins
    ("float16", torch.float32, torch.float16),
])
def test_unquantized_tensors_are_written_in_a_16_bit_dtype_unless_asked(model_dtype, source_dtype, expected):
    from stages.formats.artifact import checkpoint_dtype

    assert checkpoint_dtype(model_dtype, source_dtype) == expected
