"""The scale benchmarks (bench_scale.py, bench_dp.py) in their --small CPU modes, and their extrapolation."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    for path in (BENCH, BENCH.parent):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_extrapolation_scales_only_the_tuning_loop_and_pays_the_first_blocks_compile_once():
    bench = _load("bench_scale")
    blocks = [{"seconds": 20.0, "tune_seconds": 17.0}] + [{"seconds": 6.0, "tune_seconds": 3.0}] * 2
    out = bench.extrapolate({"blocks": blocks}, num_blocks=80, iters=5, target_iters=200)
    # steady block: 3 s outside the loop + 3 s of tuning at 5 iterations -> 3 + 3 * 40 at 200; block 0's
    # 14 s of compilation counted once, not scaled with the iterations
    assert out == {"blocks_done": 3, "seconds_per_block": 6.0, "tune_seconds_per_block": 3.0, "one_off_seconds": 14.0,
                   "model_seconds_at_iters": 14.0 + 480.0, "model_hours_at_200": round((14 + 80 * 123) / 3600, 3)}
    assert bench.extrapolate({"blocks": blocks[:1]}, 80, 5, 200) is None  # only the compiling block: no estimate
    assert bench.extrapolate({"blocks": []}, 80, 5, 200) is None


def test_report_recomputes_the_extrapolation_from_the_recorded_blocks(tmp_path):
    bench = _load("bench_scale")
    blocks = [{"seconds": 20.0, "tune_seconds": 17.0}, {"seconds": 6.0, "tune_seconds": 3.0}]
    record = {"part": "stream70b", "rows": [{"step": "s", "dims": {"num_hidden_layers": 80}, "rc": 0,
                                             "result": {"blocks": blocks}, "extrapolation": {"stale": 1}}],
              "environment": {"argv": "bench_scale.py --part stream70b --iters 10", "device": "cuda:0",
                              "torch": "x", "transformers": "y", "date": "d"}}
    file = tmp_path / "scale_stream70b.json"
    file.write_text(json.dumps(record))
    assert bench.main(["--report", str(file)]) == 0
    row = json.loads(file.read_text())["rows"][0]
    assert row["extrapolation"]["model_hours_at_200"] == round((14 + 80 * (3 + 3 * 20)) / 3600, 3)  # 10 iters
    assert "one_off_seconds" in (tmp_path / "scale_stream70b.md").read_text()


def test_reuse_model_takes_only_a_completely_written_model_of_the_same_dimensions(tmp_path, monkeypatch):
    bench = _load("bench_scale")
    written = []

    def fake_write(kind: str, spec: dict) -> dict:
        Path(spec["folder"]).mkdir(parents=True)
        written.append(spec["folder"])
        return {"rc": 0}

    monkeypatch.setattr(bench, "spawn", fake_write)
    args = bench.defaults(bench.parse_args(["--small", "--part", "stream8b-rtn-gptq", "--work", str(tmp_path),
                                            "--reuse-model"]))
    rows: list = []
    model = bench.prepare_model(args, rows, lambda: None)
    assert len(written) == 1 and (model / "written_dims.json").is_file()  # nothing to reuse yet: written
    bench.prepare_model(args, rows, lambda: None)
    assert len(written) == 1 and rows[-1]["step"].startswith("reuse")
    args.layers = 2  # other dimensions: written again
    bench.prepare_model(args, rows, lambda: None)
    assert len(written) == 2
    args.reuse_model, args.layers = False, None
    bench.prepare_model(args, rows, lambda: None)
    assert len(written) == 3


def test_tree_memory_counts_a_childs_pages_in_rss_and_pss():
    from scale_common import run_measured

    grab = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.0)"
    measured = run_measured([sys.executable, "-c", grab])
    assert measured["rc"] == 0
    assert 0.29 < measured["maxrss_gib"] and 0.29 < measured["tree_peak_gib"] and 0.29 < measured["tree_pss_peak_gib"]
    assert measured["tree_pss_peak_gib"] <= measured["tree_peak_gib"] + 1 / 1024


def test_a_rank_reporting_a_bad_input_becomes_the_stage_error(tmp_path):
    from core.errors import InputError
    from stages.quant.launch import _failure, error_file, job_file

    job = job_file(tmp_path)
    job.parent.mkdir(parents=True)
    assert isinstance(_failure(tmp_path, 1), RuntimeError)
    error_file(job, 1).write_text(json.dumps({"message": "model shard x is missing"}))
    err = _failure(tmp_path, 1)
    assert isinstance(err, InputError) and str(err) == "model shard x is missing"


COMPARED_WITH_IN_MEMORY = {"stream8b-rtn-gptq": 2, "stream8b-autoround-pack": 1, "stream70b": 0}


@pytest.mark.slow
@pytest.mark.parametrize("part", list(COMPARED_WITH_IN_MEMORY))
def test_bench_scale_small_parts_run_on_cpu(tmp_path, part):
    bench = _load("bench_scale")
    assert bench.main(["--small", "--part", part, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 0
    record = json.loads((tmp_path / "o" / f"scale_{part}_small.json").read_text())
    for row in record["rows"]:
        assert row["rc"] == 0 and 0 < row["maxrss_gib"] < 4
    compared = [row["vs_in_memory"] for row in record["rows"] if "vs_in_memory" in row]
    assert len(compared) == COMPARED_WITH_IN_MEMORY[part]  # one per quantizer the part streams
    assert all(c["identical_layers"] == c["layers"] == 28 for c in compared)
    if part == "stream70b":
        assert record["rows"][0]["result"]["complete"] and record["rows"][0]["extrapolation"]["blocks_done"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("part", ["dp-block", "dp-smollm2"])
def test_bench_dp_small_parts_run_on_cpu_with_gloo(tmp_path, part):
    bench = _load("bench_dp")
    assert bench.main(["--small", "--part", part, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
                       "--store", str(tmp_path / "store")]) == 0
    record = json.loads((tmp_path / "o" / f"dp_{part}_small.json").read_text())
    assert [r["ranks"] for r in record["rows"]] == [1, 2]
    summary = record["summary"]
    assert (summary["best_loss_rel_diff"] < 0.1) if part == "dp-block" else (summary["ppl_rel_diff"] < 0.01)
