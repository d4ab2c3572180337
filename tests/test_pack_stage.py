"""The pack stage: run(ctx) on a qstate built here, its report and metrics, preflight, config checks, the DAG."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from core.context import Artifact, StageContext
from core.errors import ConfigError
from pipeline.validate import validate_config
from stages.formats.gptq import gptq_layer_bytes
from stages.formats.qlinear import iter_quant_linears, load_quantized_model
from stages.formats.artifact import REPORT_FILE, checkpoint_dir
from stages.pack import preflight, run
from _formats_helpers import tiny_model, tiny_once  # noqa: F401  (fixtures)
from _formats_helpers import fake_quantize, logits, quantize_linears, random_ids, save_test_qstate


def _ctx(cfg, handle, tmp_path, layers, skipped, manifest_extra=None):
    qdir = tmp_path / "quantize"
    save_test_qstate(qdir, layers, skipped, 2, method=cfg.quant.method)
    manifest = {"fingerprint": "q" * 16, "config": {"quant": asdict(cfg.quant), "run.seed": 0}, "outputs": [],
                **(manifest_extra or {})}
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return StageContext(cfg=cfg, stage="pack", variant="quantized", workdir=work, resumed=False,
                        inputs={"quantize": Artifact("quantize", qdir, manifest)}, model=handle, device="cpu",
                        dtype="float32", progress=False, log=lambda m: None)


def test_run_writes_a_loadable_checkpoint_and_a_compat_report(compose, tiny_model, tmp_path):
    model, _, handle = tiny_model
    cfg, _ = compose(["model=tiny_random", "quant=gptq", "quant.bits=4", "quant.group_size=32", "quant.sym=true",
                      "quant.damp_percent=0.02"])
    layers, skipped = quantize_linears(model, 4, 32, True)
    ctx = _ctx(cfg, handle, tmp_path, layers, skipped)
    result = run(ctx)
    ck = checkpoint_dir(ctx.workdir)
    qc = json.loads((ck / "config.json").read_text())["quantization_config"]
    assert qc["damp_percent"] == 0.02 and qc["bits"] == 4 and qc["quant_method"] == "gptq"
    report = json.loads((ctx.workdir / REPORT_FILE).read_text())
    assert report["checkpoint"] == "checkpoint" and report["vllm"]["loads"] is True
    assert report["identity"] == json.loads((ck / "packing.json").read_text())["identity"]
    m = result.metrics
    assert m["layers"] == 14 and m["vllm_loads"] == 1.0 and m["verified_layers"] == 14.0
    assert m["quantized_fp16_mb"] == round(2 * sum(layer.codes.numel() for layer in layers.values()) / 1e6, 3)
    packed = sum(gptq_layer_bytes(*layer.codes.shape, 4, 32) for layer in layers.values())
    numel = sum(layer.codes.numel() for layer in layers.values())
    assert m["quantized_mb"] == round(packed / 1e6, 3) and m["bits_per_weight"] == round(8 * packed / numel, 4)
    assert m["compression_vs_fp16"] == round(2 * numel / packed, 4)  # 3.16x: tiny layers, g_idx is 1 bit/weight
    assert result.summary["format"] == "gptq" and result.summary["vllm"].startswith("loads (auto_gptq: Marlin")
    assert result.artifacts == [REPORT_FILE, "checkpoint/config.json"]
    loaded = load_quantized_model(ck, "cpu", torch.float32)
    ids = random_ids()
    assert torch.equal(logits(loaded, ids), logits(fake_quantize(model, layers), ids))
    run(ctx)  # a resumed attempt at the same fingerprint replaces its own checkpoint


@pytest.mark.parametrize("pack", ["pack=auto_round", "pack=auto"])
def test_asym_4bit_is_packed_as_awq_exactly(compose, tiny_model, tmp_path, pack):
    model, _, handle = tiny_model
    cfg, _ = compose(["model=tiny_random", pack, "quant=rtn", "quant.bits=4", "quant.group_size=32",
                      "quant.sym=false"])
    layers, skipped = quantize_linears(model, 4, 32, False)
    layers["model.layers.0.mlp.up_proj"].zero[0, 0] = 0  # storable in AWQ: zeros are kept as they are
    ctx = _ctx(cfg, handle, tmp_path, layers, skipped)
    result = run(ctx)
    assert result.summary["format"] == "auto_round:auto_awq" and result.summary["exact"] == "14/14 layers verified"
    assert result.summary["vllm"].startswith("loads (inc:")
    loaded = load_quantized_model(checkpoint_dir(ctx.workdir), "cpu", torch.float32)
    for name, ql in iter_quant_linears(loaded):
        assert torch.equal(ql.dequantize(torch.float32), layers[name].dequantize(torch.float32)), name


def test_the_default_pack_of_an_asym_2bit_run_keeps_zero_points_of_zero(compose, tiny_model, tmp_path):
    """pack.format=auto (the default) picks auto-round's plain layout for asym 2-bit: the loaded weights are
    the quantized ones, zero points of 0 included (GPTQ v1 would read them back one step off)."""
    model, _, handle = tiny_model
    cfg, _ = compose(["model=tiny_random", "quant=rtn", "quant.bits=2", "quant.group_size=32", "quant.sym=false"])
    assert cfg.pack.format == "auto"
    layers, skipped = quantize_linears(model, 2, 32, False)
    layers["model.layers.1.self_attn.k_proj"].zero[2, 1] = 0
    assert sum(int((l.zero == 0).sum()) for l in layers.values()) >= 1
    ctx = _ctx(cfg, handle, tmp_path, layers, skipped)
    result = run(ctx)
    assert result.summary["format"] == "auto_round" and result.summary["vllm"].startswith("refuses: ")
    loaded = load_quantized_model(checkpoint_dir(ctx.workdir), "cpu", torch.float32)
    for name, ql in iter_quant_linears(loaded):
        assert torch.equal(ql.dequantize(torch.float32), layers[name].dequantize(torch.float32)), name


@pytest.mark.parametrize("overrides,key,pattern", [
    (["pack.packing_format=auto_round"], "pack.packing_format", "applies to pack.format=auto_round"),
    (["pack=auto_round", "quant=gptq", "quant.act_order=true"], "pack.format", "has no g_idx"),
    (["pack=auto_round", "pack.packing_format=auto_round:auto_awq", "quant.bits=3"], "pack.packing_format",
     "4-bit layers only"),
    (["pack=gptq", "quant.sym=false"], "pack.format", "GPTQ v1 stores zero-1 .*use pack.format=auto"),
    (["pack=gptq", "quant.overrides=[{pattern: '.*down_proj', sym: false}]"], "pack.format", "cannot hold an asym"),
    (["pack=auto_round", "pack.packing_format=auto_round:auto_gptq", "quant.sym=false"], "pack.packing_format",
     "auto_gptq stores zero-1"),
])
def test_preflight_rejects_schemes_the_format_cannot_express(compose, overrides, key, pattern):
    cfg, _ = compose(["model=tiny_random", *overrides])
    with pytest.raises(ConfigError, match=pattern) as err:
        preflight(cfg, None, None)
    assert err.value.key == key


def test_an_asym_run_with_gptq_v1_fails_validation_before_any_model_work(compose, tmp_path):
    cfg, _ = compose(["model=tiny_random", f"run.outputs_dir={tmp_path}", "pack=gptq", "quant.sym=false"])
    with pytest.raises(ConfigError, match=r"^pack.format=gptq is not supported \(auto, gptq_v2 or auto_round for a "
                                          r"run with asym layers.*use pack.format=auto"):
        validate_config(cfg)
    assert not (tmp_path / "store").exists()


def test_preflight_accepts_act_order_that_keeps_natural_groups(compose):
    cfg, _ = compose(["model=tiny_random", "pack=auto_round", "quant=gptq", "quant.act_order=true",
                      "quant.static_groups=true"])  # g_idx stays natural
    preflight(cfg, None, None)


def test_preflight_rejects_a_quantized_lm_head_tied_to_the_embeddings(compose, smollm2_handle_free_tied, tmp_path):
    cfg, _ = compose(["model=tiny_random", "quant.quantize_lm_head=true"])
    with pytest.raises(ConfigError, match="tied to the"):
        preflight(cfg, smollm2_handle_free_tied, None)


@pytest.fixture
def smollm2_handle_free_tied(tmp_path):
    """A ModelHandle of a small random Llama with tie_word_embeddings=true (no GGUF conversion needed)."""
    from core.models import ModelHandle
    from _formats_helpers import make_llama_folder

    folder = make_llama_folder(tmp_path / "tied", tie_word_embeddings=True)
    return ModelHandle("tied", str(folder), None, "t" * 16)


@pytest.mark.parametrize("override,pattern", [("pack.packing_format=awq", "choose from auto, auto_round:auto_gptq"),
                                              ("pack.max_shard_size=lots", "a size such as 4GB"),
                                              ("pack.format=exl2", "choose from auto, gptq, gptq_v2, auto_round")])
def test_config_validation_names_the_key_and_the_choices(compose, tmp_path, override, pattern):
    cfg, _ = compose(["model=tiny_random", f"run.outputs_dir={tmp_path}", override])
    with pytest.raises(ConfigError, match=pattern):
        validate_config(cfg)


def test_pack_groups_compose(compose):
    cfg, _ = compose([])
    assert cfg.pack.format == "auto"  # the default never writes a checkpoint that differs from the qstate
    cfg, _ = compose(["pack=gptq_v2"])
    assert cfg.pack.format == "gptq_v2"
    cfg, _ = compose(["pack=auto_round"])
    assert (cfg.pack.format, cfg.pack.packing_format, cfg.pack.max_shard_size) == ("auto_round", "auto", "4GB")
    cfg, _ = compose(["pack=gptq"])
    assert (cfg.pack.format, cfg.pack.packing_format) == ("gptq", "auto")


def test_the_dag_packs_what_quantize_produced(compose, tiny_overrides):
    from pipeline.runner import PipelineRunner
    from pipeline.runtime import Runtime

    cfg, _ = compose([*tiny_overrides, "quant=rtn", "quant.bits=3", "quant.sym=false",
                      "run.stages=[calibrate,quantize,pack]"])
    outcomes = PipelineRunner(cfg, Runtime("cpu", "float32", log=lambda m: None)).run()
    pack = outcomes[-1]
    assert pack.name == "pack" and pack.status == "ran" and pack.summary["format"] == "auto_round"
    manifest = json.loads((pack.path / "manifest.json").read_text())
    assert any(o["path"] == "checkpoint/model.safetensors" for o in manifest["outputs"])
    loaded = load_quantized_model(checkpoint_dir(pack.path), "cpu", torch.float32)
    assert {ql.bits for _, ql in iter_quant_linears(loaded)} == {3}
