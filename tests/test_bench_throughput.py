"""benchmarks/bench_throughput.py on the CPU: the vLLM part's variant and check lists, the packed variants' layout,
and the vLLM 2/3-bit probe's report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from bench_throughput import CHECKS, SMALL_MODEL, VLLM_VARIANTS, name_list, random_llama, write_packed  # noqa: E402


def test_name_lists_accept_known_names_and_none_only_where_allowed():
    import argparse

    variants = name_list(("baseline", *VLLM_VARIANTS))
    assert variants("w4g128_asym,baseline") == ("w4g128_asym", "baseline")
    with pytest.raises(argparse.ArgumentTypeError, match="w5 is not one of baseline, w4g128_sym, w4g128_asym"):
        variants("baseline,w5")
    with pytest.raises(argparse.ArgumentTypeError, match="none is not one of"):
        variants("none")
    with pytest.raises(argparse.ArgumentTypeError, match=r"\(empty\) is not one of"):
        variants(",")
    assert name_list(tuple(CHECKS), allow_empty=True)("none") == ()


def test_the_asym_vllm_variant_is_written_in_the_awq_layout(tmp_path):
    """What vLLM's INC config reads as AWQ (Marlin/Machete): auto_round:auto_awq, 4-bit, asym, int32 words."""
    model = random_llama(SMALL_MODEL, "cpu", torch.bfloat16, seed=1)
    info = write_packed(model, tmp_path / "asym", *VLLM_VARIANTS["w4g128_asym"])
    q = json.loads((Path(info["path"]) / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["packing_format"], q["bits"], q["sym"]) == ("auto-round", "auto_round:auto_awq", 4, False)
    sym = write_packed(model, tmp_path / "sym", *VLLM_VARIANTS["w4g128_sym"])
    assert json.loads((Path(sym["path"]) / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


def test_probe_report_folds_vllm_messages_into_one_row_each(tmp_path):
    record = {"vllm": "0.26.0", "gemlite": "0.6.0.post2", "card": "GPU", "command": "python probe --checkpoints w2g64_asym",
              "routes": {"w2g64_asym/as_written": {"ok": False, "error": "ValidationError: 1 validation error for "
                                                   "VllmConfig\n  Value error, Unsupported packing_format: auto_round "
                                                   "[type=value_error, input_value=ArgsKwargs(())]"}}}
    src = tmp_path / "in.json"
    src.write_text(json.dumps(record))
    subprocess.run([sys.executable, str(BENCH / "probe_vllm_lowbit.py"), "--report", str(src), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    md = (tmp_path / "vllm_lowbit.md").read_text()
    assert "| w2g64_asym/as_written | no | – | – | Unsupported packing_format: auto_round |" in md
    assert "No route loads: vLLM 0.26.0" in md and "Command: `python probe --checkpoints w2g64_asym`" in md
