"""benchmarks/published_results.py --small: the CPU check of the script that writes RESULTS.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


def published_results(*args: str, timeout: int) -> None:
    """Run benchmarks/published_results.py with `args`; it must succeed."""
    proc = subprocess.run([sys.executable, "benchmarks/published_results.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_small_quality_grid_runs_through_the_pipeline_and_renders_results(tiny_outputs, tmp_path):
    results, md = tmp_path / "results", tmp_path / "RESULTS.md"
    published_results("--small", "--parts", "quality", "--cells", "W4G64 sym", "--results", str(results), "--outputs",
                      str(tiny_outputs), timeout=600)
    record = json.loads((results / "quality.json").read_text())
    assert [c["method"] for c in record["cells"]] == ["rtn", "gptq", "autoround"]
    for cell in record["cells"]:
        m = cell["manifests"]
        assert set(m) == {"calibrate", "quantize", "pack", "baseline_evaluate", "evaluate"}
        assert m["quantize"]["config"]["quant"]["method"] == cell["method"]
        assert m["pack"]["config"]["pack"]["format"] == "gptq"  # sym cells are packed for vLLM
        assert m["evaluate"]["metrics"]["ppl"] > 0 and m["evaluate"]["inputs"]["pack"] == m["pack"]["fingerprint"]
    # one baseline evaluation shared by all cells (the store caches it)
    assert len({c["manifests"]["baseline_evaluate"]["fingerprint"] for c in record["cells"]}) == 1

    published_results("--parts", "results", "--results", str(results), "--markdown", str(md), timeout=120)
    text = md.read_text()
    base_ppl = record["cells"][0]["manifests"]["baseline_evaluate"]["metrics"]["ppl"]
    assert "| unquantized | bf16/fp32 |" in text and f"{base_ppl:.3g}" in text
    for method in ("rtn", "gptq", "autoround"):
        assert f"| {method} | W4G64 sym |" in text
    assert "Calibrated on 8 x 64 tokens of austen" in text and "AutoRound 4 iterations" in text
    assert "## 3. Inference: vLLM" in text and "(not run: no results in throughput_vllm/)" in text
    assert "## 6. CPU: the quickstart" in text and "(not run: no results in quickstart_cpu/)" in text


@pytest.mark.slow
def test_small_recover_part_runs_every_cell_with_and_without_recovery_and_the_cost_script(tiny_outputs, tmp_path):
    results, md = tmp_path / "results", tmp_path / "RESULTS.md"
    published_results("--small", "--parts", "recover", "--cells", "W3G64 asym", "--results", str(results), "--outputs",
                      str(tiny_outputs), timeout=1200)
    record = json.loads((results / "recover.json").read_text())
    assert [(c["method"], c["recover"]) for c in record["cells"]] == [("autoround", "none"), ("autoround", "scales")]
    plain, recovered = (c["manifests"] for c in record["cells"])
    assert "recover" not in plain and plain["pack"]["inputs"] == {"quantize": plain["quantize"]["fingerprint"]}
    assert recovered["pack"]["inputs"]["recover"] == recovered["recover"]["fingerprint"]
    assert recovered["quantize"]["fingerprint"] == plain["quantize"]["fingerprint"]  # the same quantized model
    assert recovered["recover"]["metrics"]["steps"] == 4.0 and recovered["recover"]["metrics"]["train_loss_final"] > 0
    cost = json.loads((results / "recover_cost" / "recover_cost.json").read_text())
    assert [r["row"] for r in cost["rows"]] == ["scales", "lora"]
    assert all(r["seconds_per_1m_tokens"] > 0 and r["trainable_params"] > 0 for r in cost["rows"])

    published_results("--parts", "results", "--results", str(results), "--markdown", str(md), timeout=120)
    text = md.read_text()
    assert "## 7. Recovery after quantization: SmolLM2-135M" in text
    assert "| autoround | W3G64 asym | none |" in text and "| autoround | W3G64 asym | scales |" in text
    assert "- AutoRound + recovery (scales) W3G64 asym: perplexity" in text
    assert "### Recovery cost: small Llama shape (CPU check)" in text
