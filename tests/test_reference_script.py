"""benchmarks/reference_table.py: its verdict, its evaluation-time table, and (slow) the --small CPU run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import reference_table as script  # noqa: E402

ROWS = [{"method": "FP (unquantized)", "scheme": "bf16", "ppl": "39.6"},
        {"method": "AutoRound", "scheme": "W4G64 asym", "ppl": "40.5"},
        {"method": "bitsandbytes NF4", "scheme": "W4 NF4, blocks of 64", "ppl": "42.3"},
        {"method": "AutoRound", "scheme": "W2G64 asym", "ppl": "64.0"}]


def _record(part: str, seconds: dict[str, tuple[float, str]]) -> dict:
    jobs = []
    for i, (scheme, (s, backend)) in enumerate(seconds.items()):
        stages = {"evaluate": {"status": "ran", "seconds": s, "summary": {"backend": backend}}}
        if i == 0:
            stages["baseline_evaluate"] = {"status": "ran", "seconds": 9.0, "summary": {"backend": backend}}
        jobs.append({"job": str(i), "scheme": scheme, "status": "COMPLETED", "stages": stages})
    return {"part": part, "command": f"python -m pipeline -m ... {part}", "returncode": 0, "wall_s": 60.0,
            "jobs": jobs, "table": None, "machine": {}}


def test_nf4_verdict_compares_perplexity_with_autoround_w4():
    assert script.nf4_vs_autoround(ROWS) == ("perplexity: bitsandbytes NF4 42.300 vs AutoRound W4G64 asym 40.500 "
                                             "(x1.044): NF4 behind AutoRound W4")
    flipped = [dict(r, ppl="40.0") if r["method"] == "bitsandbytes NF4" else r for r in ROWS]
    assert script.nf4_vs_autoround(flipped).endswith("NF4 NOT behind AutoRound W4")
    assert script.nf4_vs_autoround(ROWS[:2]) is None


def test_evaluation_time_table_pairs_hf_and_vllm_per_row(tmp_path):
    (tmp_path / "reference_eval_hf.json").write_text(json.dumps(_record("eval_hf", {
        "autoround_w4g64_asym": (20.0, "hf"), "autoround_w2g64_asym": (21.0, "hf")})))
    (tmp_path / "reference_eval_vllm.json").write_text(json.dumps(_record("eval_vllm", {
        "autoround_w4g64_asym": (7.5, "vllm"), "autoround_w2g64_asym": (22.0, "hf")})))
    md = script.markdown(tmp_path)
    assert "| FP | 9.0 | 9.0 (vllm) |" in md
    assert "| autoround_w4g64_asym | 20.0 | 7.5 (vllm) |" in md
    assert "| autoround_w2g64_asym | 21.0 | 22.0 (hf) |" in md  # vLLM refuses 2-bit: scored with hf


def test_small_mode_keeps_the_cpu_limits_and_each_part_its_own_sweep_folder(tmp_path):
    cmd = script.pipeline_command("eval_hf", tmp_path, True, ["x=1"])
    assert cmd[3:5] == ["-m", "+experiment=compare_reference_table"]
    assert "eval.limit=null" not in cmd and "eval.limit=4" in cmd and "model=tiny_random" in cmd
    assert f"hydra.sweep.dir={tmp_path}/sweeps/eval_hf" in cmd and cmd[-1] == "x=1"
    assert "eval.limit=null" in script.pipeline_command("eval_vllm", tmp_path, False, [])


@pytest.mark.slow
def test_small_table_part_runs_the_sweep_and_renders_the_table(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/reference_table.py", "--small", "--part", "table",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "reference_table.json").read_text())
    assert [r["method"] for r in record["table"]] == ["FP (unquantized)", "AutoRound", "GPTQ", "bitsandbytes NF4",
                                                      "AutoRound"]
    assert record["parent_run"] and record["nf4_vs_autoround"].startswith("perplexity: bitsandbytes NF4")
    assert "| bitsandbytes NF4 | W4 NF4, blocks of 64 |" in (tmp_path / "reference.md").read_text()
