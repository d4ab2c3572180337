"""The comparison report over synthetic manifests: values, degradation, files, sweep folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from core.errors import InputError
from stages.report import build_report, build_sweep_report, read_sweep_jobs, to_markdown, write_report
from stages.report_plots import read_block_losses

METHODS = ("rtn", "gptq", "autoround")
BITS = (2, 3, 4)


def manifest(stage: str, fp: str, metrics: dict, config: dict | None = None) -> dict:
    return {"stage": stage, "fingerprint": fp, "metrics": metrics, "config": config or {}}


def baseline_manifests(ppl: float = 20.0, tps: float = 100.0) -> dict:
    return {"baseline_evaluate": manifest("baseline_evaluate", f"be{ppl}", {"ppl": ppl, "lastword.acc": 0.5,
                                                                           "seconds": 3.0}),
            "baseline_benchmark": manifest("baseline_benchmark", f"bb{tps}", {"tokens_per_s": tps})}


def job_manifests(i: int, method: str, bits: int, full: bool = True) -> dict:
    quant = {"method": method, "bits": bits, "group_size": 64, "sym": False, "iters": 2, "lr": None}
    out = {"quantize": manifest("quantize", f"q{i}", {"seconds": 1.0 + i, "peak_gpu_mem_gb": 0.25}, {"quant": quant})}
    if full:
        out["evaluate"] = manifest("evaluate", f"e{i}", {"ppl": 20.0 + 10.0 / bits + i,
                                                         "lastword.acc": 0.5 - 0.1 / bits,
                                                         "lastword.acc_stderr": 0.01, "ppl.nll": 3.0,
                                                         "lastword.delta_vs_baseline": -0.1, "seconds": 2.0})
        out["pack"] = manifest("pack", f"p{i}", {"size_mb": float(bits)})
        out["benchmark"] = manifest("benchmark", f"b{i}", {"tokens_per_s": 110.0 + i, "decode_tokens_per_s": 1.0,
                                                           "tokens_per_s.b4": 2.0, "speedup_vs_baseline.b4": 9.0})
        out.update(baseline_manifests())
    return out


def nine_jobs(full: bool = True) -> list:
    cells = [(m, b) for m in METHODS for b in BITS]
    return [(str(i), job_manifests(i, m, b, full)) for i, (m, b) in enumerate(cells)]


def by_label(report) -> dict:
    return {r["label"]: r for r in report.rows}


def test_table_values_deltas_and_speedup_are_exact():
    report = build_report(nine_jobs())
    rows = by_label(report)
    assert len(report.quantized_rows()) == 9 and len(report.baseline_rows()) == 1
    assert report.rows[0]["kind"] == "baseline"  # baseline first
    gptq3 = rows["gptq W3G64 asym"]  # job 4: ppl = 20 + 10/3 + 4
    assert gptq3["eval.ppl"] == pytest.approx(20.0 + 10.0 / 3 + 4)
    assert gptq3["delta.ppl"] == pytest.approx(10.0 / 3 + 4)
    assert gptq3["ppl_ratio"] == pytest.approx((20.0 + 10.0 / 3 + 4) / 20.0)
    assert gptq3["delta.lastword.acc"] == pytest.approx(-0.1 / 3)
    assert gptq3["speedup"] == pytest.approx(114.0 / 100.0)  # computed from the baseline benchmark
    assert gptq3["peak_memory_mb"] == pytest.approx(256.0)  # GB -> MB
    assert gptq3["size_mb"] == pytest.approx(3.0)
    assert gptq3["iters"] is None  # GPTQ has no iterations
    assert rows["rtn W2G64 asym"]["iters"] == 0 and rows["autoround W2G64 asym i2"]["iters"] == 2
    # only each task's primary metric is a score column (no stderr, nll, or the stage's own delta)
    assert report.columns[7:12] == ["eval.ppl", "delta.ppl", "ppl_ratio", "eval.lastword.acc", "delta.lastword.acc"]
    assert [c for c in report.columns if c.startswith("eval.")] == ["eval.ppl", "eval.lastword.acc"]
    assert report.ppl_key == "ppl"
    assert [r["method"] for r in report.quantized_rows()] == ["autoround"] * 3 + ["gptq"] * 3 + ["rtn"] * 3
    assert [r["bits"] for r in report.quantized_rows()[:3]] == [2, 3, 4]
    assert report.notes == []


def test_each_quantizer_with_and_without_recovery_gets_its_own_row():
    jobs = []
    for i, (method, mode) in enumerate([("rtn", None), ("rtn", "scales"), ("autoround", None), ("autoround", "lora")]):
        m = job_manifests(i, method, 2)
        if mode is not None:
            m["recover"] = manifest("recover", f"r{i}", {"seconds": 30.0 + i, "adapter_mb": 4.5 if mode == "lora" else None,
                                                         "train_loss_init": 1.0, "train_loss_final": 0.5},
                                    {"recover": {"mode": mode, "steps": 200}})
        jobs.append((str(i), m))
    report = build_report(jobs)
    rows = by_label(report)
    assert sorted(rows) == ["autoround W2G64 asym i2", "autoround W2G64 asym i2 +lora", "baseline (unquantized)",
                            "rtn W2G64 asym", "rtn W2G64 asym +scales"]
    assert rows["rtn W2G64 asym"]["recover"] == "none" and rows["rtn W2G64 asym +scales"]["recover"] == "scales"
    assert rows["rtn W2G64 asym +scales"]["recover_seconds"] == 31.0 and rows["rtn W2G64 asym"]["recover_seconds"] is None
    assert rows["autoround W2G64 asym i2 +lora"]["adapter_mb"] == 4.5
    assert "recover_seconds" in report.columns and "adapter_mb" in report.columns
    md = to_markdown(report)
    assert "recover s" in md and "adapter MB" in md


def test_speedup_metric_from_benchmark_wins_over_the_ratio():
    jobs = nine_jobs()[:1]
    jobs[0][1]["benchmark"]["metrics"]["speedup_vs_baseline"] = 2.5
    assert build_report(jobs).quantized_rows()[0]["speedup"] == 2.5


def test_markdown_lists_every_cell_and_the_baseline():
    text = to_markdown(build_report(nine_jobs()))
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 1 + 9  # header, baseline, 9 jobs
    assert "| rtn W4G64 asym | rtn | 4 | 64 | no | 0 |" in text
    assert "Δ ppl" in lines[0] and "speedup" in lines[0]


def test_columns_of_stages_not_run_are_left_out_with_a_note():
    report = build_report(nine_jobs(full=False))
    assert not any(c.startswith(("eval.", "delta.")) for c in report.columns)
    assert "size_mb" not in report.columns and "tokens_per_s" not in report.columns and "speedup" not in report.columns
    assert "quantize_seconds" in report.columns and "peak_memory_mb" in report.columns
    notes = " ".join(report.notes)
    assert "no job ran `evaluate`" in notes and "no job ran `pack`" in notes and "no job ran `benchmark`" in notes
    assert "\nNotes:\n- no job ran `evaluate`" in to_markdown(report)


def test_a_job_without_one_stage_shows_a_dash():
    jobs = nine_jobs()[:2]
    del jobs[1][1]["benchmark"]
    report = build_report(jobs)
    row = next(r for r in report.quantized_rows() if r["job"] == "1")
    assert row["tokens_per_s"] is None and row["speedup"] is None
    line = next(ln for ln in to_markdown(report).splitlines() if ln.startswith(f"| {row['label']} |"))
    assert line.rstrip(" |").endswith("- | -")


def test_missing_quantize_or_no_jobs_fail_clearly():
    with pytest.raises(InputError, match="job 7 has no quantize manifest .*evaluate"):
        build_report([("7", {"evaluate": manifest("evaluate", "e", {})})])
    with pytest.raises(InputError, match="at least one job"):
        build_report([])


def test_jobs_with_different_baselines_get_their_own_deltas():
    a = job_manifests(0, "rtn", 4)
    b = job_manifests(1, "rtn", 4)
    b.update(baseline_manifests(ppl=10.0, tps=50.0))
    report = build_report([("0", a), ("1", b)])
    assert len(report.baseline_rows()) == 2
    rows = {r["job"]: r for r in report.quantized_rows()}
    assert rows["0"]["delta.ppl"] == pytest.approx(22.5 - 20.0)
    assert rows["1"]["delta.ppl"] == pytest.approx(23.5 - 10.0)
    assert rows["1"]["speedup"] == pytest.approx(111.0 / 50.0)
    assert rows["0"]["label"] != rows["1"]["label"]  # same scheme: labels made unique


def _png_has_content(path: Path) -> bool:
    import matplotlib.image

    img = matplotlib.image.imread(path)
    return img.shape[0] > 100 and img.shape[1] > 100 and float(img[..., :3].std()) > 0.01


def test_write_report_files(tmp_path):
    report = build_report(nine_jobs())
    curves = {"autoround W2G64 asym i2": [{"block": 0, "mse": 0.2, "loss_init": 0.4, "loss_best": 0.1},
                                          {"block": 1, "mse": 0.5, "loss_init": 0.9, "loss_best": 0.3}],
              "gptq W2G64 asym": [{"block": 0, "mse": 0.3}, {"block": 1, "mse": 0.6}]}
    files = write_report(report, tmp_path / "r", curves)
    names = sorted(p.name for p in files)
    assert names == ["block_losses.png", "ppl_vs_iters.png", "report.csv", "report.md", "score_vs_bits.png"]
    for png in [p for p in files if p.suffix == ".png"]:
        assert _png_has_content(png)
    with open(tmp_path / "r" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and rows[0]["kind"] == "baseline"
    rtn2 = next(r for r in rows if r["label"] == "rtn W2G64 asym")
    assert float(rtn2["eval.ppl"]) == pytest.approx(20.0 + 5.0 + 0)  # job 0
    assert float(rtn2["speedup"]) == pytest.approx(1.10)
    assert rtn2["iters"] == "0"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "![score_vs_bits](score_vs_bits.png)" in md


def test_plots_degrade_with_notes(tmp_path):
    files = write_report(build_report(nine_jobs(full=False)), tmp_path)
    assert sorted(p.name for p in files) == ["report.csv", "report.md"]
    md = (tmp_path / "report.md").read_text()
    assert "score vs bits: no evaluate metrics" in md and "per-block losses: no job's quantize artifact has per-block mse/loss" in md


def test_read_block_losses_reads_what_the_quantize_stage_writes(tmp_path):
    from stages.quant.job import BLOCK_METRICS_FILE

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / BLOCK_METRICS_FILE).write_text(json.dumps([{"block": 0, "mse": 1.0}, {"block": 1, "mse": 2.0}]))
    assert read_block_losses(tmp_path / "a") == [{"block": 0, "mse": 1.0}, {"block": 1, "mse": 2.0}]
    assert read_block_losses(tmp_path) is None


# ---------------------------------------------------------------------------------------------
# sweep folders
# ---------------------------------------------------------------------------------------------
def write_sweep(tmp_path: Path, jobs: list, failed: int = 0) -> Path:
    """A sweep folder whose job.json files point at manifests in a tmp store."""
    sweep = tmp_path / "sweeps" / "2026-01-01_00-00-00"
    for name, manifests in jobs:
        stages = {}
        for stage, m in manifests.items():
            art = tmp_path / "store" / stage / m["fingerprint"]
            art.mkdir(parents=True, exist_ok=True)
            (art / "manifest.json").write_text(json.dumps(m))
            stages[stage] = {"fingerprint": m["fingerprint"], "path": str(art), "status": "ran", "seconds": 1.0}
        (sweep / name).mkdir(parents=True)
        (sweep / name / "job.json").write_text(json.dumps({"status": "COMPLETED", "overrides": [f"job={name}"],
                                                            "model": "tiny", "error": None, "stages": stages}))
    for k in range(failed):
        (sweep / f"f{k}").mkdir(parents=True)
        (sweep / f"f{k}" / "job.json").write_text(json.dumps({"status": "FAILED", "overrides": ["quant.bits=3"],
                                                              "error": "RuntimeError: boom", "stages": {}}))
    return sweep


def test_sweep_report_writes_under_reports_dir(tmp_path, compose):
    sweep = write_sweep(tmp_path, nine_jobs(), failed=1)
    cfg, _ = compose([f"run.outputs_dir={tmp_path}"])
    files = build_sweep_report(cfg, sweep)
    out = tmp_path / "reports" / sweep.name
    assert {p.parent for p in files} == {out}
    md = (out / "report.md").read_text()
    assert md.startswith(f"# tiny: sweep {sweep.name}")
    assert sum(1 for ln in md.splitlines() if ln.startswith("| ") and "W" in ln.split("|")[1]) == 9
    assert "job f0 (quant.bits=3) failed: RuntimeError: boom" in md


def test_jobs_are_read_in_numeric_order(tmp_path):
    jobs = [(str(i), job_manifests(i, "rtn", 4, full=False)) for i in (10, 2, 1)]
    assert [j.name for j in read_sweep_jobs(write_sweep(tmp_path, jobs))] == ["1", "2", "10"]


def test_report_over_an_empty_or_missing_sweep_folder_fails_clearly(tmp_path, compose):
    cfg, _ = compose([f"run.outputs_dir={tmp_path}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"holds no finished jobs \(no \*/job.json\): nothing to report"):
        build_sweep_report(cfg, tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        build_sweep_report(cfg, tmp_path / "nope")
    only_failed = write_sweep(tmp_path, [], failed=2)
    with pytest.raises(InputError, match="no job of sweep .* produced a quantize artifact .*boom"):
        build_sweep_report(cfg, only_failed)


def test_sweep_cli_rebuilds_a_report_and_fails_clearly_on_an_empty_folder(tmp_path, capsys):
    from pipeline.sweep import main

    sweep = write_sweep(tmp_path, nine_jobs()[:3])
    assert main([str(sweep), "--reports-dir", str(tmp_path / "rep"), "--no-plots", "--no-tracking"]) == 0
    assert sorted(p.name for p in (tmp_path / "rep" / sweep.name).iterdir()) == ["report.csv", "report.md"]
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--no-tracking"]) == 2
    assert "holds no finished jobs" in capsys.readouterr().err
