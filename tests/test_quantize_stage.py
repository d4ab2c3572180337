"""The quantize stage through the runner: outputs, step metrics, resume after a crash, overrides, preflight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import ConfigError
from pipeline.runner import PipelineRunner
from pipeline.runtime import Runtime
from stages.quant.autoround import AutoRoundQuantizer
from stages.quant.qstate import load_qstate
from _quant_helpers import RecordingTracker, one_thread  # noqa: F401
from conftest import CONF_DIR
from pipeline.overrides import check_cli_overrides



def _run(compose, overrides, tracker=None):
    cfg, _ = compose([*overrides, "run.stages=[calibrate,quantize]"])
    return PipelineRunner(cfg, Runtime("cpu", "float32", log=lambda m: None), tracker).run()


def test_stage_writes_qstate_layers_json_and_block_metrics(compose, tiny_overrides, one_thread):
    tracker = RecordingTracker()
    outcomes = _run(compose, tiny_overrides + ["quant.bits=2", "quant.sym=false", "quant.iters=4"], tracker)
    q = outcomes[-1]
    assert q.name == "quantize" and q.status == "ran"
    layers, meta = load_qstate(q.path)
    assert len(layers) == 14 and meta["method"] == "autoround" and meta["num_blocks"] == 2
    assert meta["skipped"] == ["lm_head"] and meta["blocks"] == "model.layers"
    rec = meta["layers"]["model.layers.1.mlp.down_proj"]
    assert rec == {"bits": 2, "group_size": 32, "sym": False, "shape": [64, 128], "act_order": False}
    tensors = load_file(str(q.path / "qstate.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.scale"].dtype == torch.float16
    assert int(tensors["model.layers.0.self_attn.q_proj.codes"].max()) <= 3
    assert not (q.path / "blocks").exists()
    blocks = json.loads((q.path / "block_metrics.json").read_text())
    assert [b["block"] for b in blocks] == [0, 1] and all(b["loss_best"] <= b["loss_init"] for b in blocks)
    steps = {(k, s) for k, _, s in tracker.metrics}
    for key in ("quantize.block_loss", "quantize.block_loss_init", "quantize.block_loss_best",
                "quantize.block_best_iter", "quantize.block_mse", "quantize.block_seconds"):
        assert {(key, 0), (key, 1)} <= steps
    assert q.metrics["blocks_resumed"] == 0 and q.metrics["num_layers"] == 14


def test_resume_after_a_crash_equals_an_uninterrupted_run(compose, tiny_overrides, tmp_path, monkeypatch, one_thread):
    overrides = tiny_overrides + ["quant.iters=3"]
    calls: list[int] = []
    original = AutoRoundQuantizer.quantize_block

    def crashing(self, block, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in block 1")
        return original(self, block, *args, **kwargs)

    monkeypatch.setattr(AutoRoundQuantizer, "quantize_block", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(compose, overrides)
    partial = next(Path(overrides[1].split("=", 1)[1]).glob("store/quantize/.partial-*"))
    assert [p.name for p in (partial / "blocks").iterdir()] == ["block_00000.safetensors"]
    calls.clear()
    resumed = _run(compose, overrides)[-1]
    assert len(calls) == 1  # only block 1 was tuned again
    assert resumed.metrics["blocks_resumed"] == 1
    monkeypatch.setattr(AutoRoundQuantizer, "quantize_block", original)
    fresh_dir = tmp_path / "fresh"
    fresh = _run(compose, [o if not o.startswith("run.outputs_dir=") else f"run.outputs_dir={fresh_dir}"
                           for o in overrides])[-1]
    # the model store is missing in fresh_dir: it was materialised there, same fingerprint
    assert fresh.fingerprint == resumed.fingerprint
    a, b = load_file(str(resumed.path / "qstate.safetensors")), load_file(str(fresh.path / "qstate.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overrides_skip_and_change_bits(compose, tiny_overrides, one_thread):
    overrides = tiny_overrides + ["quant.iters=2", "quant.bits=4",
                                  "+quant.overrides=[{pattern: '.*mlp\\.down_proj', bits: 8},"
                                  "{pattern: model.layers.1.self_attn.o_proj, skip: true},"
                                  "{pattern: '.*k_proj', group_size: -1, sym: false}]"]
    q = _run(compose, overrides)[-1]
    layers, meta = load_qstate(q.path)
    assert "model.layers.1.self_attn.o_proj" not in layers
    assert meta["skipped"] == ["lm_head", "model.layers.1.self_attn.o_proj"]
    assert layers["model.layers.0.mlp.down_proj"].scheme.bits == 8
    assert layers["model.layers.0.self_attn.k_proj"].scheme.group_size == -1
    assert layers["model.layers.0.self_attn.k_proj"].scale.shape == (32, 1)
    assert layers["model.layers.0.self_attn.q_proj"].scheme == layers["model.layers.1.mlp.up_proj"].scheme
    assert layers["model.layers.0.self_attn.q_proj"].scheme.bits == 4


def test_override_matching_nothing_fails_before_work(compose, tiny_overrides):
    overrides = tiny_overrides + ["+quant.overrides=[{pattern: '.*mlp\\.fc1', bits: 8}]"]
    with pytest.raises(ConfigError, match=r"quant.overrides\[0\].pattern=.\*mlp\\.fc1 matches no quantized layer"):
        _run(compose, overrides)
    head = tiny_overrides + ["+quant.overrides=[{pattern: lm_head, bits: 8}]"]
    with pytest.raises(ConfigError, match="quant.quantize_lm_head=true"):
        _run(compose, head)


def _smollm2_like_handle(tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.models import ModelHandle

    if not (tmp_path / "config.json").is_file():  # preflight also checks the weights against the config
        LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                                     num_attention_heads=9, num_key_value_heads=3, vocab_size=1000)
                         ).save_pretrained(tmp_path)
    return ModelHandle("smollm2-like", str(tmp_path), None, "fp")


def test_preflight_group_size_error_names_layer_dim_and_valid_sizes(compose, tmp_path):
    from stages.quantize import preflight

    cfg, _ = compose(["quant.group_size=128"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg, _smollm2_like_handle(tmp_path))
    msg = str(err.value)
    assert msg.startswith("quant.group_size=128 does not divide the input dimension 576 of layer "
                          "model.layers.0.self_attn.q_proj")
    assert "32, 64, -1" in msg and "128" not in msg.split("(")[1] and msg.endswith("e.g. quant.group_size=64")
    ok, _ = compose(["quant.group_size=64"])
    preflight(ok, _smollm2_like_handle(tmp_path))


def test_preflight_override_group_size_error_names_the_override_key(compose, tmp_path):
    from stages.quantize import preflight

    cfg, _ = compose(["quant.group_size=64", "+quant.overrides=[{pattern: '.*down_proj', group_size: 100}]"])
    with pytest.raises(ConfigError, match=r"quant.overrides\[0\].group_size=100 does not divide the input dimension "
                                          r"1536 of layer model.layers.0.mlp.down_proj"):
        preflight(cfg, _smollm2_like_handle(tmp_path))


def test_compile_is_autorounds_key_and_oversized_batches_are_rejected(compose):
    from stages.quantize import check_quant_config

    with pytest.raises(ConfigError, match=r"quant.compile=on is not a key of quant.method=rtn .*\(quant=autoround\)"):
        check_cli_overrides(["quant=rtn", "quant.compile=on"], CONF_DIR)
    cfg, _ = compose(["quant.batch_size=16"])
    with pytest.raises(ConfigError, match="quant.batch_size=16 exceeds the calibration samples"):
        check_quant_config(cfg.quant, 8)


def test_rtn_stage_needs_no_calibration_stage(compose, tiny_overrides, tmp_path):
    from stages.quantize import run as quantize_run
    from core.context import StageContext
    from pipeline.models import prepare_model
    from core.store import ArtifactStore

    cfg, _ = compose(tiny_overrides + ["quant=rtn", "quant.bits=3", "quant.sym=false"])
    handle = prepare_model(cfg.model, ArtifactStore(Path(cfg.run.outputs_dir) / "store"), log=lambda m: None)
    work = tmp_path / "work"
    work.mkdir()
    ctx = StageContext(cfg=cfg, stage="quantize", variant="quantized", workdir=work, resumed=False, inputs={},
                       model=handle, device="cpu", dtype="float32", progress=False)
    result = quantize_run(ctx)
    layers, meta = load_qstate(work)
    assert meta["method"] == "rtn" and len(layers) == 14 and result.summary["bits"] == 3


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", ["off", "on"])
def test_cuda_low_gpu_mem_matches_device_resident_tuning(compile_):
    """On CUDA (bf16, amp): pinned-CPU caches + side-stream batches tune like device-resident caches."""
    from core.schema import quant_config
    from stages.quant.driver import quantize_model
    from _quant_helpers import calib_ids, tiny_llama

    results = []
    for low_mem in (False, True):
        model = tiny_llama().to(torch.bfloat16)
        if not low_mem:
            model = model.cuda()
        cfg = quant_config(method="autoround", bits=2, group_size=32, sym=False, iters=30, batch_size=4,
                          grad_accum=2, low_gpu_mem=low_mem, compile=compile_)
        torch.cuda.reset_peak_memory_stats()
        results.append(quantize_model(model, calib_ids(), cfg, "cuda", seed=0))
    dense, low = results
    assert low.metrics["peak_gpu_mem_gb"] < dense.metrics["peak_gpu_mem_gb"]
    for a, b in zip(dense.block_metrics, low.block_metrics):
        assert a["loss_init"] == pytest.approx(b["loss_init"], rel=1e-3)
        assert b["mse"] < 0.7 * b["loss_init"] and a["mse"] < 0.7 * a["loss_init"]


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quantize", Path(__file__).parent.parent / "benchmarks"
                                                  / "bench_quantize.py")
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules["bench_quantize"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_small_block_part_runs_on_cpu(tmp_path, one_thread):
    bench = _bench()
    assert bench.main(["--small", "--parts", "block", "--compile", "off", "--iters", "3", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quantize_small_cpu.json").read_text())
    (row,) = data["rows"]
    assert row["part"] == "block" and row["iters"] == 3 and row["seconds"] > 0
    assert row["loss_best"] <= row["loss_init"]
    assert "| h256/i768, 16x128, 3 it, bs 4 | False | False |" in (tmp_path / "quantize_small_cpu.md").read_text()


@pytest.mark.slow
def test_benchmark_small_model_part_runs_on_cpu(tmp_path, one_thread):
    bench = _bench()
    out = tmp_path / "out"
    assert bench.main(["--small", "--parts", "model", "--compile", "off", "--iters", "2", "--out", str(out),
                       "--store", str(tmp_path / "store")]) == 0
    rows = json.loads((out / "quantize_small_cpu.json").read_text())["rows"]
    assert [(r["cell"], r["method"]) for r in rows][:3] == [("fp", "none"), ("W2G64 asym", "rtn"),
                                                            ("W2G64 asym", "autoround")]
    assert all(r["ppl"] > 1 for r in rows)


def test_quantize_reruns_for_its_methods_field_and_stays_cached_otherwise(compose, tiny_overrides, one_thread):
    base = ["quant=autoround", "quant.iters=2", "quant.batch_size=4", *tiny_overrides]
    first = {o.name: o for o in _run(compose, base)}
    assert first["quantize"].status == "ran"
    again = {o.name: o for o in _run(compose, base + ["eval.limit=4"])}
    assert again["quantize"].status == "cached"
    assert again["quantize"].fingerprint == first["quantize"].fingerprint
    own = {o.name: o for o in _run(compose, base + ["quant.iters=3"])}
    assert own["calibrate"].status == "cached" and own["quantize"].status == "ran"
    assert own["quantize"].fingerprint != first["quantize"].fingerprint


@pytest.mark.parametrize("method, option, own", [
    ("rtn", "rtn", "quant.bits=2"),
    ("gptq", "gptq", "quant.damp_percent=0.05"),
    ("autoround", "autoround", "quant.lr=0.5"),
    ("bnb_nf4", "bnb_nf4", "quant.double_quant=true"),
    ("bnb_int8", "bnb_int8", "quant.int8_threshold=3.0"),
])
def test_quantize_fingerprint_hashes_exactly_the_methods_config(compose, method, option, own):
    from dataclasses import fields

    from core.schema import QUANT_CONFIGS
    from pipeline import dag

    def fp(overrides):
        cfg, _ = compose([f"quant={option}", *overrides])
        return dag.stage_fingerprint(dag.SPECS["quantize"], cfg, {"calibrate": "c"}, "m", "cpu", "float32")

    cfg, _ = compose([f"quant={option}"])
    hashed = dag.stage_config(dag.SPECS["quantize"], cfg)["quant"]
    assert type(cfg.quant) is QUANT_CONFIGS[method]
    assert list(hashed) == [f.name for f in fields(QUANT_CONFIGS[method])]
    assert fp([own]) != fp([])


@pytest.mark.parametrize("overrides, key, method", [
    (["quant=autoround", "quant.damp_percent=0.05"], "quant.damp_percent", "autoround"),
    (["quant=gptq", "quant.iters=7"], "quant.iters", "gptq"),
    (["quant=rtn", "quant.batch_size=2"], "quant.batch_size", "rtn"),
    (["quant=bnb_nf4", "quant.int8_threshold=3"], "quant.int8_threshold", "bnb_nf4"),
    (["+experiment=compare_methods", "quant.iters=50"], "quant.iters", "gptq"),
])
def test_a_key_the_method_lacks_is_one_error_naming_its_keys(overrides, key, method):
    from core.schema import quant_keys
    from pipeline.overrides import check_cli_overrides

    with pytest.raises(ConfigError) as err:
        check_cli_overrides(overrides, CONF_DIR)
    assert str(err.value).startswith(f"{key}=")
    assert f"is not a key of quant.method={method} (the keys of quant.method={method}: " \
           f"{', '.join(quant_keys(method))})" in str(err.value)


def test_a_method_switched_by_key_keeps_no_other_methods_fields(compose):
    with pytest.raises(ConfigError, match=r"quant.iters=200 is not a key of quant.method=gptq \(the keys of "
                                          r"quant.method=gptq: method, bits, .*damp_percent"):
        compose(["quant=autoround", "quant.method=gptq"])


def test_every_quant_method_has_its_config_class():
    from core.schema import QUANT_CONFIGS, QuantScheme
    from stages.registry import QUANT_METHODS

    assert list(QUANT_CONFIGS) == list(QUANT_METHODS)
    for method, cls in QUANT_CONFIGS.items():
        assert issubclass(cls, QuantScheme) and cls().method == method
