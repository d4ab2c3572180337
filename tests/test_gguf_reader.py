"""The single-pass GGUF reader against files written by gguf-py's GGUFWriter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf.constants import GGUFValueType as V

from core.errors import InputError
from pipeline.gguf_reader import read_gguf
from tests._gguf_helpers import write_gguf

METADATA = [
    ("test.u8", 200, V.UINT8, None), ("test.i8", -100, V.INT8, None), ("test.u16", 60000, V.UINT16, None),
    ("test.i16", -30000, V.INT16, None), ("test.u32", 4_000_000_000, V.UINT32, None),
    ("test.i32", -2_000_000_000, V.INT32, None), ("test.f32", 0.1, V.FLOAT32, None), ("test.bool", True, V.BOOL, None),
    ("test.u64", 2**63 + 5, V.UINT64, None), ("test.i64", -(2**62), V.INT64, None), ("test.f64", 0.1, V.FLOAT64, None),
    ("test.string", "héllo wörld", V.STRING, None),
    ("test.strings", ["a", "", "Ġthe", "<|im_end|>", "日本"], V.ARRAY, V.STRING),
    ("test.ints", [3, -1, 7], V.ARRAY, V.INT32), ("test.floats", [0.5, -2.25], V.ARRAY, V.FLOAT32),
]
EXPECTED = {
    "general.architecture": "test", "test.u8": 200, "test.i8": -100, "test.u16": 60000, "test.i16": -30000,
    "test.u32": 4_000_000_000, "test.i32": -2_000_000_000, "test.f32": float(np.float32(0.1)), "test.bool": True,
    "test.u64": 2**63 + 5, "test.i64": -(2**62), "test.f64": 0.1, "test.string": "héllo wörld",
    "test.strings": ["a", "", "Ġthe", "<|im_end|>", "日本"], "test.ints": [3, -1, 7], "test.floats": [0.5, -2.25],
}


def _values(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


TENSORS = {"f32": (_values(0, 3, 5), T.F32), "f16": (_values(1, 7), T.F16), "q8": (_values(2, 4, 64), T.Q8_0),
           "q4_1": (_values(3, 2, 32), T.Q4_1)}


@pytest.fixture(params=[None, 64], ids=["default-alignment", "alignment-64"])
def zoo(request, tmp_path) -> tuple[Path, int]:
    path = write_gguf(tmp_path / "zoo.gguf", "test", METADATA, TENSORS, alignment=request.param)
    return path, request.param or 32


def test_metadata_values_round_trip_with_their_types(zoo):
    parsed = read_gguf(zoo[0])
    assert parsed.version == 3
    meta = {k: v for k, v in parsed.metadata.items() if k != "general.alignment"}
    assert meta == EXPECTED
    assert type(meta["test.bool"]) is bool and type(meta["test.u64"]) is int


def test_tensor_table_shapes_types_and_alignment(zoo):
    path, alignment = zoo
    parsed = read_gguf(path)
    assert list(parsed.tensors) == list(TENSORS)
    for name, (values, qtype) in TENSORS.items():
        info = parsed.tensors[name]
        assert (info.shape, info.ggml_type) == (values.shape, qtype)
        assert info.offset % alignment == 0


def test_tensors_match_gguf_py_reader_and_written_values(zoo):
    from gguf import GGUFReader
    from gguf.quants import dequantize, quantize

    parsed = read_gguf(zoo[0])
    reference = {t.name: t for t in GGUFReader(zoo[0]).tensors}
    for name, (values, qtype) in TENSORS.items():
        ours = parsed.dequantize(name)
        assert ours.dtype == np.float32 and ours.shape == values.shape
        np.testing.assert_array_equal(ours, dequantize(reference[name].data, qtype).reshape(values.shape))
        raw_reference = np.asarray(reference[name].data).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(parsed.raw(name).reshape(-1), raw_reference)
        expected = {T.F32: values, T.F16: values.astype(np.float16).astype(np.float32)}.get(qtype)
        if expected is None:  # block formats: what gguf-py's own quantize -> dequantize gives
            expected = dequantize(quantize(values, qtype), qtype)
        np.testing.assert_array_equal(ours, expected)


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    from gguf import GGUFWriter
    from gguf.constants import GGML_QUANT_SIZES

    block, block_bytes = GGML_QUANT_SIZES[T.IQ2_XXS]  # a type gguf-py cannot quantize: written as raw bytes
    path = tmp_path / "iq.gguf"
    writer = GGUFWriter(path, arch="test")
    writer.add_tensor("blk.0.odd.weight", np.zeros((2, block_bytes), np.uint8), raw_dtype=T.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parsed = read_gguf(path)
    assert parsed.tensors["blk.0.odd.weight"].shape == (2, block)
    with pytest.raises(InputError, match=r"blk\.0\.odd\.weight .*IQ2_XXS.*allowed: .*Q4_1.*llama-quantize"):
        parsed.dequantize("blk.0.odd.weight")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95], ids=["in-metadata", "in-tensor-table-or-data", "in-data"])
def test_truncated_file_is_one_clear_error(tmp_path, keep):
    whole = write_gguf(tmp_path / "whole.gguf", "test", METADATA, TENSORS).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:int(len(whole) * keep)])
    with pytest.raises(InputError, match=r"cut\.gguf is truncated.*re-download or reinstall it"):
        read_gguf(cut)


def test_not_a_gguf_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(InputError, match=r"model\.gguf is not a GGUF file"):
        read_gguf(bad)
