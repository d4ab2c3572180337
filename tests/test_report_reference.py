"""The reference comparison table, rendered from recorded job files (job.json + manifests), as a sweep leaves them."""

from __future__ import annotations

import csv
import json

import pytest

from core.errors import InputError
from stages.report import build_sweep_report
from stages.report_reference import build_reference_table, to_markdown

from test_report import manifest, write_sweep

TASKS = {"persuasion_lastword.acc": 0.40, "persuasion_nextsent.acc": 0.30, "persuasion_ppl.bits_per_byte": 1.3}


def baseline() -> dict:
    ev = manifest("baseline_evaluate", "be", {"ppl": 40.0, **TASKS, "persuasion_lastword.acc_stderr": 0.02})
    ev.update(dtype="bfloat16", summary={"backend": "hf"})
    bench = manifest("baseline_benchmark", "bb", {"decode_tokens_per_s": 200.0, "size_on_disk_mb": 256.0})
    return {"baseline_evaluate": ev, "baseline_benchmark": bench}


def job(i: int, method: str, bits: int, group: int, sym: bool, ppl: float, backend: str = "hf") -> dict:
    quant = {"method": method, "bits": bits, "group_size": group, "sym": sym, "iters": 200}
    ev = manifest("evaluate", f"e{i}", {"ppl": ppl, "persuasion_lastword.acc": 0.40 - 0.01 * i,
                                        "persuasion_nextsent.acc": 0.30, "persuasion_ppl.bits_per_byte": 1.3 + i,
                                        "ppl.delta_vs_baseline": ppl - 40.0})
    ev["summary"] = {"backend": backend}
    return {"quantize": manifest("quantize", f"q{i}", {"seconds": 3.0}, {"quant": quant}), "evaluate": ev,
            "pack": manifest("pack", f"p{i}", {"size_mb": 100.0 + i, "bits_per_weight": 4.25 + i}),
            "benchmark": manifest("benchmark", f"b{i}", {"decode_tokens_per_s": 150.0 + i}), **baseline()}


JOBS = [("0", job(0, "autoround", 4, 64, False, 41.0, "vllm")), ("1", job(1, "gptq", 4, 64, True, 43.0, "vllm")),
        ("2", job(2, "bnb_nf4", 4, 64, True, 44.0, "vllm")), ("3", job(3, "autoround", 2, 64, False, 60.0, "hf"))]


def test_one_row_per_method_in_sweep_order_with_exact_values():
    table = build_reference_table(JOBS, "SmolLM2-135M", in_features=[576, 1536])
    assert [(r["method"], r["scheme"]) for r in table.rows] == [
        ("FP (unquantized)", "bf16"), ("AutoRound", "W4G64 asym"), ("GPTQ", "W4G64 sym"),
        ("bitsandbytes NF4", "W4 NF4, blocks of 64"), ("AutoRound", "W2G64 asym")]
    assert table.columns == ["method", "scheme", "persuasion_lastword.acc", "persuasion_nextsent.acc",
                             "persuasion_ppl.bits_per_byte", "avg_acc", "ppl", "bits_per_weight", "size_mb",
                             "decode_tok_s", "eval_backend"]
    fp, ar4, _, nf4, ar2 = table.rows
    assert (fp["persuasion_lastword.acc"], fp["avg_acc"], fp["ppl"], fp["bits_per_weight"]) == (40.0, 35.0, 40.0, 16.0)
    assert fp["size_mb"] == pytest.approx(256.0 * 2**20 / 10**6) and fp["decode_tok_s"] == 200.0
    assert nf4["persuasion_lastword.acc"] == pytest.approx(38.0) and nf4["avg_acc"] == pytest.approx(34.0)
    assert (nf4["ppl"], nf4["bits_per_weight"], nf4["size_mb"], nf4["decode_tok_s"]) == (44.0, 6.25, 102.0, 152.0)
    assert (ar4["eval_backend"], ar2["eval_backend"], ar2["persuasion_ppl.bits_per_byte"]) == ("vllm", "hf", 4.3)
    assert table.notes[1] == ("W4 rows use group size 64 instead of the reference comparison's 128: the model's "
                              "Linears have in_features [576, 1536], and 576 is not a multiple of 128")


def test_markdown_shows_every_row_and_the_headers():
    md = to_markdown(build_reference_table(JOBS, "SmolLM2-135M"))
    lines = md.splitlines()
    assert lines[0] == "# SmolLM2-135M: the reference comparison"
    assert lines[2] == ("| method | scheme | persuasion_lastword acc % | persuasion_nextsent acc % | persuasion_ppl "
                        "bits_per_byte | avg acc % | ppl | bits/weight | size MB | decode tok/s (b1) | tasks scored by |")
    assert lines[4] == "| FP (unquantized) | bf16 | 40 | 30 | 1.3 | 35 | 40 | 16 | 268.4 | 200 | hf |"
    assert lines[7] == "| bitsandbytes NF4 | W4 NF4, blocks of 64 | 38 | 30 | 3.3 | 34 | 44 | 6.25 | 102 | 152 | vllm |"
    assert "W4 rows use group size 64 instead of the reference comparison's 128" in md


def test_rows_at_the_reference_group_size_need_no_note_and_missing_stages_show_a_dash():
    jobs = [("0", job(0, "autoround", 4, 128, False, 41.0)), ("1", {"quantize": job(1, "gptq", 4, 128, True, 1.0)["quantize"]})]
    table = build_reference_table(jobs, "m")
    assert len(table.notes) == 1
    assert "| GPTQ | W4G128 sym | - | - | - | - | - | - | - | - | - |" in to_markdown(table)
    with pytest.raises(InputError, match="needs at least one job with a quantize manifest"):
        build_reference_table([("0", {"evaluate": JOBS[0][1]["evaluate"]})], "m")


def test_sweep_report_writes_the_table_from_job_files_when_asked(tmp_path, compose):
    sweep = write_sweep(tmp_path, JOBS, failed=1)
    q0 = tmp_path / "store" / "quantize" / "q0"
    (q0 / "layers.json").write_text(json.dumps({"layers": {"a": {"shape": [576, 576]}, "b": {"shape": [576, 1536]}}}))
    cfg, _ = compose([f"run.outputs_dir={tmp_path}"])
    assert not any(p.name.startswith("reference") for p in build_sweep_report(cfg, sweep))
    cfg.report.reference_table = True
    files = build_sweep_report(cfg, sweep)
    out = tmp_path / "reports" / sweep.name
    assert {out / "reference_table.md", out / "reference_table.csv"} <= set(files)
    md = (out / "reference_table.md").read_text()
    assert md.startswith("# tiny: the reference comparison")
    assert "576 is not a multiple of 128" in md and "job f0 (quant.bits=3) failed: RuntimeError: boom" in md
    assert "## Reference table" in (out / "report.md").read_text()
    rows = list(csv.DictReader((out / "reference_table.csv").open()))
    assert [r["method"] for r in rows] == ["FP (unquantized)", "AutoRound", "GPTQ", "bitsandbytes NF4", "AutoRound"]
    assert float(rows[4]["ppl"]) == 60.0
