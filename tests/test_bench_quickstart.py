"""benchmarks/bench_quickstart.py: reading a fresh store, the min/median/max summary, one real timed run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import REPO

ORDER = ["calibrate", "quantize", "pack"]


@pytest.fixture(scope="module")
def bq():
    spec = importlib.util.spec_from_file_location("bench_quickstart", REPO / "benchmarks" / "bench_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quickstart"] = module
    spec.loader.exec_module(module)
    return module


def _manifest(store: Path, stage: str, fp: str, seconds=None, started="2026-01-01T10:00:00+00:00",
              ended="2026-01-01T10:00:00+00:00") -> None:
    folder = store / stage / fp
    folder.mkdir(parents=True)
    metrics = {} if seconds is None else {"seconds": seconds}
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "metrics": metrics, "started": started,
                                                      "ended": ended}))


def _store(root: Path) -> Path:
    store = root / "store"
    _manifest(store, "model", "m", started="2026-01-01T10:00:03+00:00", ended="2026-01-01T10:00:21+00:00")
    for i, stage in enumerate(ORDER):
        _manifest(store, stage, f"f{i}", seconds=1.5 * (i + 1))
    return store


def test_stage_seconds_come_from_the_manifests_of_one_fresh_run(bq, tmp_path):
    got = bq.read_stages(_store(tmp_path), ORDER)
    assert got == {bq.CONVERSION: 18.0, "calibrate": 1.5, "quantize": 3.0, "pack": 4.5}
    assert list(got) == [bq.CONVERSION, *ORDER]
    with pytest.raises(RuntimeError, match=r"no manifest for \['report'\]"):
        bq.read_stages(tmp_path / "store", [*ORDER, "report"])
    _manifest(tmp_path / "store", "pack", "other", seconds=1.0)
    with pytest.raises(RuntimeError, match="two pack artifacts"):
        bq.read_stages(tmp_path / "store", ORDER)


def test_summary_and_markdown_over_runs(bq):
    runs = [{"stages": {"calibrate": c, bq.OTHER: 5.0}, "wall_s": w, "peak_rss_gib": r, "peak_tree_rss_gib": r,
             "cpu_s": 2 * w, "load_before": 0.2, "load_after": 1.0, "printed": f"| stage | ...\nNext: run {w}"}
            for c, w, r in ((1.0, 100.0, 2.5), (3.0, 120.0, 2.0), (2.0, 110.0, 3.0))]
    summary = bq.summarize(runs)
    assert summary["stages"]["calibrate"] == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert summary["total_s"] == {"min": 100.0, "median": 110.0, "max": 120.0}
    assert summary["peak_rss_gib"]["max"] == 3.0 and summary["load"] == {"min": 0.2, "median": 0.6, "max": 1.0}
    record = {"machine": {"cpu": "Test CPU", "cores": 2, "ram_gib": 8.0, "system": "Linux", "python": "3.11",
                          "torch": "2.13.0", "date": "2026-01-01", "host": "h"},
              "command": "python benchmarks/bench_quickstart.py", "overrides": [], "summary": summary, "runs": runs}
    text = bq.markdown(record)
    assert "Machine: Test CPU, 2 cores, 8.0 GiB RAM" in text and "overrides: none" in text
    assert "| calibrate | 1.0 | 2.0 | 3.0 |" in text and "| **total (wall)** | 100.0 | 110.0 | 120.0 |" in text
    assert "| peak RSS, largest process | 2.00 | 2.50 | 3.00 |" in text
    assert "median run (110.0 s)" in text and "Next: run 110.0" in text
    assert "upper bound" not in text  # a quiet machine is not flagged


@pytest.mark.slow  # multi-process / real-run check: -m slow keeps the default suite under 10 minutes
def test_one_real_run_is_timed_with_its_memory_and_printout(bq, tmp_path, tiny_outputs):
    overrides = ["model=tiny_random", f"run.outputs_dir={tiny_outputs}", "run.stages=[calibrate]",
                 "calib.nsamples=4", "calib.seqlen=16", "tracking.enabled=false", "run.progress=false"]
    work = tmp_path / "work"
    work.mkdir()
    rec = bq.run_once(work, overrides, timeout_s=300)
    assert rec["exit_code"] == 0, rec["log"][-3000:]
    assert rec["wall_s"] > 0 and rec["cpu_s"] > 0
    assert 0.1 < rec["peak_rss_gib"] < 8 and rec["peak_tree_rss_gib"] > 0
    printed = bq.printed_summary(rec["log"])
    assert printed.startswith("| stage ") and "| calibrate " in printed and "\nNext:\n" in printed


def test_the_timed_stages_are_the_ones_the_job_runs(bq):
    default = bq.stage_order([])
    assert "recover" not in default  # switched off by recover.mode=none
    assert default[0] == "calibrate" and {"quantize", "pack", "evaluate", "benchmark", "report"} <= set(default)
    assert bq.stage_order(["recover=scales"]).index("recover") == default.index("quantize") + 1
