"""benchmarks/recover_search.py --small: quantize once, several recipes, JSON + Markdown, the time budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_small_search_quantizes_once_runs_each_recipe_and_skips_past_the_budget(tmp_path):
    out = tmp_path / "search"
    cmd = [sys.executable, "benchmarks/recover_search.py", "--small", "--out", str(out), "--outputs",
           str(tmp_path / "outputs"), "--recipes", "scales_lora_200,lora_r32_svd_300"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "recover_search.json").read_text())
    first, second = record["cells"]
    assert [first["name"], second["name"]] == ["scales_lora_200", "lora_r32_svd_300"]
    # one quantize run: the second recipe reuses the first one's artifact (same fingerprint, same seconds)
    q1, q2 = first["manifests"]["quantize"], second["manifests"]["quantize"]
    assert q1["fingerprint"] == q2["fingerprint"] and q1["metrics"]["seconds"] == q2["metrics"]["seconds"]
    assert first["manifests"]["recover"]["fingerprint"] != second["manifests"]["recover"]["fingerprint"]
    assert [first["steps"], second["steps"]] == [4, 6]  # --small: steps / 50
    for cell in (first, second):
        assert cell["manifests"]["evaluate"]["metrics"]["ppl"] > 1
    md = (out / "recover_search.md").read_text()
    assert "| scales_lora_200 | recover=scales_lora recover.steps=200 |" in md and "| unquantized |" in md
    # a budget already spent: the first recipe runs (nothing to estimate from), the next is skipped
    cmd[cmd.index(str(out))] = str(tmp_path / "tight")
    proc = subprocess.run(cmd + ["--budget-s", "1"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = json.loads((tmp_path / "tight" / "recover_search.json").read_text())["cells"]
    assert "manifests" in cells[0] and cells[1]["skipped"] == "skipped: over the time budget"
