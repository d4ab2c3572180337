"""benchmarks/bench_kernels.py's pieces on the CPU: the candidate sweep, the decode record and the report."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import decode_candidates as dc  # noqa: E402
import kernel_candidates as kc  # noqa: E402
from kernels_report import render  # noqa: E402


def test_random_layer_is_in_the_checkpoint_layout_and_exact():
    from stages.kernels.linear import dequantize_weight

    w = kc.random_layer(64, 128, 3, 32, False, "cpu", seed=1)
    assert (w.bits, w.group_size, w.in_features, w.out_features) == (3, 32, 128, 64) and w.zeros is not None
    ws = kc.random_layer(64, 128, 4, 32, True, "cpu", seed=1)
    assert ws.zeros is None and ws.zero_const == 8.0
    assert torch.isfinite(dequantize_weight(w, torch.float32)).all()


def test_cpu_sweep_checks_every_candidate_and_renders():
    budget = kc.Budget(120)
    res = kc.sweep({"w4g32_sym": (4, 32, True)}, {"qkv": (96, 128)}, [1, 3], "cpu", torch.float32, True, budget,
                   lambda m: None, None)
    cell = res["w4g32_sym"]["qkv"]
    assert set(cell["candidates"]) == {"bf16", "tinygemm", "dequant"}
    assert "CUDA device" in cell["not_applicable"]["gemlite"]
    for name, cand in cell["candidates"].items():
        for m in (1, 3):
            us, label, err = kc.best_of(cand, m)
            assert us > 0 and err < (2e-2 if name == "tinygemm" else 1e-5), (name, m, err)
    assert cell["candidates"]["tinygemm"]["bytes"] < cell["candidates"]["bf16"]["bytes"] / 3
    md = render({"kernels": {"machine": {"card": "CPU", "torch": "x", "date": "d", "command": "c"}, "rows": [1, 3],
                             "timing": "t", "results": res}})
    assert "| qkv 96x128 | 3 |" in md and "### w4g32_sym" in md


def test_decode_variant_on_cpu_reports_ratios():
    wls = [dc.Workload(1, 4, 3, (1,), warmup=0, repeats=1), dc.Workload(1, 8, 2, (1,), warmup=0, repeats=1)]
    dims = {**dc.SMALL, "layers": 1}
    base = dc.run_variant(dims, None, None, "auto", "cpu", torch.float32, wls, kc.random_layer, lambda m: None, True)
    rec = dc.run_variant(dims, (2, 32, False), None, "auto", "cpu", torch.float32, wls, kc.random_layer,
                         lambda m: None, True)
    assert {p["routes"][0] for p in rec["plans"]} == {"dequant_once", "dense"}
    r = dc.ratios(rec, base)
    assert set(r) == {"decode_b1", "prefill_b1", "weight_memory", "decoder_linears"} and r["decode_b1"] > 0


def test_sweep_time_boxes_schemes_and_reports_every_unit():
    units = []
    res = kc.sweep({"w4g32_sym": (4, 32, True), "w8_sym": (8, -1, True)}, {"qkv": (96, 128), "lm_head": (64, 128)},
                   [1], "cpu", torch.float32, True, kc.Budget(0), lambda m: None, None, (256,), units.append)
    assert all(cell["skipped"] == "time budget spent" for per in res.values() for cell in per.values())
    assert res["w8_sym"]["qkv"]["rows"] == [1, 256] and res["w8_sym"]["lm_head"]["rows"] == [1]  # no prefill for lm_head
    md = render({"kernels": {"machine": {"card": "CPU", "torch": "x", "date": "d", "command": "c"}, "rows": [1],
                             "timing": "t", "results": res}})
    assert "| qkv 96x128 | all |" in md and "time budget spent" in md
    done = kc.sweep({"w4g32_sym": (4, 32, True)}, {"qkv": (96, 128)}, [1], "cpu", torch.float32, True, kc.Budget(60),
                    lambda m: None, None, (), units.append)
    assert len(units) == 1 and "bf16" in done["w4g32_sym"]["qkv"]["candidates"]


def test_decode_variants_run_w2_before_the_lm_head_variant_and_w8_last():
    import argparse

    import bench_kernels as bk

    variants = bk.decode_variants(argparse.Namespace(small=False, schemes="", batch1_weight=1.0))
    assert [v[0] for v in variants] == ["bf16", "w4g128_sym", "w4g128_asym", "w3g64_asym", "w2g64_asym",
                                        "w4g128_sym_lmhead", "w4g128_sym_b1w4", "w8_sym"]
    assert [v[3] for v in variants] == [1.0] * 6 + [4.0, 1.0]
    only_w8 = bk.decode_variants(argparse.Namespace(small=False, schemes="w8_sym", batch1_weight=1.0))
    assert [v[0] for v in only_w8] == ["bf16", "w8_sym"]


def test_report_merges_partial_matrices_per_shape():
    """A later run of the shapes an earlier run's budget skipped fills them; measured entries are not lost."""
    from kernels_report import merge_kernels

    def timing(us):
        return {"us": us, "rel_err": 1e-3, "roofline_pct": 50.0}

    def measured(us):
        return {"n": 64, "k": 32, "rows": [1], "candidates": {"bf16": {"bytes": 4096, "-": {"1": timing(2 * us)}},
                                                             "triton": {"bytes": 1024, "cfg": {"1": timing(us)}}}}

    skipped = {"n": 64, "k": 32, "rows": [1], "candidates": {}, "skipped": "time budget spent"}
    machine = {"card": "GPU", "torch": "2.x", "date": "day {}", "command": "bench_kernels.py run{}"}
    first = {"machine": {k: v.format(1) for k, v in machine.items()}, "rows": [1], "timing": "t",
             "results": {"w4": {"qkv": measured(3.0), "down": skipped}, "w2": {"qkv": skipped}}}
    second = {"machine": {k: v.format(2) for k, v in machine.items()}, "rows": [1], "timing": "t",
              "results": {"w4": {"down": measured(5.0)}, "w2": {"qkv": measured(7.0)}}}
    merged = merge_kernels([first, second])
    assert merged["results"]["w4"]["qkv"]["candidates"]["triton"]["cfg"]["1"]["us"] == 3.0
    assert merged["results"]["w4"]["down"]["candidates"]["triton"]["cfg"]["1"]["us"] == 5.0
    assert merged["results"]["w2"]["qkv"]["candidates"]["triton"]["cfg"]["1"]["us"] == 7.0
    assert [m["entries"] for m in merged["merged_from"]] == [["w4 qkv"], ["w2 qkv", "w4 down"]]
    assert merge_kernels([second, first])["results"]["w4"]["down"]["candidates"]  # order does not lose data
    md = render({"kernels": merged})
    assert "from `bench_kernels.py run1`" in md and "from `bench_kernels.py run2`" in md
    assert "time budget spent" not in md


def test_report_fills_a_skipped_decode_variant_from_a_later_run_and_names_its_baseline():
    from kernels_report import merge_decode

    def variant(tok_s, ratio=None):
        r = {"decode": [{"batch_size": 1, "decode_tokens_per_s": {"median": tok_s}}], "plans": [],
             "prefill": [{"ttft_ms": {"median": 10.0}}], "weight_memory_bytes": 2**30}
        return {**r, "vs_bf16": {"decode_b1": ratio}} if ratio else r

    def run(n, records):
        return {"machine": {"card": "GPU", "torch": "2.x", "date": f"day {n}", "command": f"bench_kernels.py run{n}"},
                "model": {}, "policy": "auto", "workloads": [{"batch_sizes": [1], "input_len": 8}],
                "records": records}

    first = run(1, {"bf16": variant(100.0), "w4": variant(150.0, 1.5), "w8": {"skipped": "time budget spent"}})
    second = run(2, {"bf16": variant(98.0), "w4": variant(10.0, 0.1), "w8": variant(88.2, 0.9)})
    merged = merge_decode([first, second])
    assert merged["records"]["bf16"]["decode"][0]["decode_tokens_per_s"]["median"] == 100.0  # the first run's
    assert merged["records"]["w4"]["vs_bf16"]["decode_b1"] == 1.5  # measured first: kept
    assert merged["records"]["w8"]["vs_bf16"]["decode_b1"] == 0.9  # skipped first: filled, own baseline
    assert "baseline_from" not in merged["records"]["w4"]
    md = render({"decode": merged})
    assert "88.2 (0.90x)" in md and "w8: ratios to the bf16 of its own run (`bench_kernels.py run2`" in md
    assert "time budget spent" not in md
