"""recover=scales_lora on the tiny model: scales, norms and adapters train together; the tuned checkpoint
plus the adapter reproduce the trained student; learning-rate groups, bad combinations, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _quant_helpers import one_thread  # noqa: F401
from core.errors import ConfigError
from pipeline.runner import PipelineRunner
from pipeline.runtime import Runtime
from pipeline.validate import validate_config

JOINT = ["quant=rtn", "quant.bits=2", "quant.sym=false", "pack=auto_round", "recover=scales_lora",
         "recover.steps=6", "recover.batch_size=4", "recover.topk=16", "recover.rank=4", "recover.lr=0.003",
         "recover.scales_lr=0.01", "recover.checkpoint_every=0"]
LAYER = "model.layers.1.mlp.down_proj"


def _runner(compose, overrides):
    cfg, _ = compose(overrides)
    validate_config(cfg)
    return cfg, PipelineRunner(cfg, Runtime("cpu", "float32", log=lambda m: None))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trained_student(cfg, out):
    """The model as trained, rebuilt from the recover stage's own outputs: tuned qstate + norms + adapter."""
    from core.models import load_model
    from core.store import ArtifactStore
    from pipeline.models import prepare_model
    from stages.formats.source import QStateReader
    from stages.recovery.adapter import read_adapter
    from stages.recovery.student import build_student

    rec = out["recover"].path
    handle = prepare_model(cfg.model, ArtifactStore(Path(cfg.run.outputs_dir) / "store"), log=lambda m: None)
    student = build_student(load_model(handle, torch.float32, "cpu"), QStateReader.open(rec).iter_layers(),
                            torch.device("cpu"))
    student.model.load_state_dict(load_file(str(rec / "replacements.safetensors")), strict=False)
    adapter = read_adapter(rec / "adapter")
    for name, (a, b) in adapter.weights.items():
        student.layers[name].enable_lora(adapter.rank, adapter.alpha, a, b)
    return student.model


def test_joint_mode_tunes_scales_norms_and_adapters_and_the_checkpoint_plus_adapter_is_the_trained_model(
        compose, tiny_overrides, one_thread):
    from stages.evaluate import densify_quant_linears
    from stages.formats.qlinear import load_quantized_model
    from stages.recovery.adapter import apply_adapter_with_peft, read_adapter

    cfg, runner = _runner(compose, tiny_overrides + JOINT + ["run.stages=[calibrate,quantize,recover,pack]"])
    out = {o.name: o for o in runner.run()}
    m = out["recover"].metrics
    assert m["train_loss_final"] < 0.7 * m["train_loss_init"]
    rec, quant = out["recover"].path, out["quantize"].path
    tuned, orig = load_file(str(rec / "qstate.safetensors")), load_file(str(quant / "qstate.safetensors"))
    assert tuned.keys() == orig.keys()
    assert all(torch.equal(tuned[k], orig[k]) for k in tuned if k.endswith(".codes"))  # codes frozen
    assert not torch.equal(tuned[f"{LAYER}.scale"], orig[f"{LAYER}.scale"])  # scales trained
    norms = load_file(str(rec / "replacements.safetensors"))
    assert not torch.allclose(norms["model.norm.weight"], torch.ones_like(norms["model.norm.weight"]))
    adapter = read_adapter(out["pack"].path / "adapter")
    assert len(adapter.weights) == 14 and adapter.rank == 4
    assert adapter.weights[LAYER][1].abs().max() > 0  # B starts at zero (peft init): the adapters trained
    # the shipped form: the tuned checkpoint loaded back, dense weights, the adapter through PEFT
    ids = torch.arange(1, 33)[None]
    loaded = load_quantized_model(out["pack"].path / "checkpoint", "cpu", torch.float32)
    densify_quant_linears(loaded, torch.float32)
    plain = _logits(loaded, ids)
    got = _logits(apply_adapter_with_peft(loaded, out["pack"].path / "adapter"), ids)
    want = _logits(_trained_student(cfg, out), ids)
    # the checkpoint stores float16 scales: the student rebuilt from the exported qstate has the same
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert (got - plain).abs().max() > 100 * (got - want).abs().max()  # the adapter matters


def test_joint_mode_gives_adapters_recover_lr_and_scales_norms_recover_scales_lr():
    from core.schema import RecoverConfig
    from stages.recovery.modes import ScalesLoraMode, ScalesMode, LoraMode
    from stages.recovery.trainer import _optimizer

    names = ["model.layers.0.mlp.up_proj.lora_A", "model.layers.0.mlp.up_proj.lora_B",
             "model.layers.0.mlp.up_proj.scale_delta", "model.layers.0.mlp.up_proj.zero_delta", "model.norm.weight"]
    cfg = RecoverConfig(mode="scales_lora", lr=3e-4, scales_lr=5e-3)
    lrs = ScalesLoraMode(cfg).learning_rates(names)
    assert lrs == {names[0]: 3e-4, names[1]: 3e-4, names[2]: 5e-3, names[3]: 5e-3, names[4]: 5e-3}
    defaults = ScalesLoraMode(RecoverConfig(mode="scales_lora")).learning_rates(names)
    assert [defaults[n] for n in names] == [1e-3, 1e-3, 2e-3, 2e-3, 2e-3]
    assert set(ScalesMode(RecoverConfig(mode="scales")).learning_rates(names).values()) == {2e-3}
    assert set(LoraMode(RecoverConfig(mode="lora", lr=7e-4)).learning_rates(names).values()) == {7e-4}
    params = {n: torch.nn.Parameter(torch.zeros(2)) for n in names}
    opt = _optimizer(params, cfg, lrs, None)
    assert sorted((g["peak_lr"], len(g["params"])) for g in opt.param_groups) == [(3e-4, 2), (5e-3, 3)]


@pytest.mark.parametrize("extra,key", [
    (["recover=lora", "recover.scales_lr=0.002"],
     "recover.scales_lr=0.002 has no effect with recover.mode=lora (null unless recover.mode=scales_lora)"),
    (["recover=scales", "recover.scales_lr=0.002"], "recover.scales_lr=0.002 has no effect with recover.mode=scales"),
    (["recover=scales_lora", "recover.rank=33"], "recover.rank=33 is not supported (at most 32"),
    (["recover=scales_lora", "recover.target_modules=[qproj]"], "recover.target_modules=[qproj] selects nothing for"),
    (["recover=scales_lora", "recover.tune_zeros=true", "quant.sym=true"], "recover.tune_zeros=True is not supported"),
    (["recover=scales_lora", "eval.dense_weights=false", "run.stages=[calibrate,quantize,recover,pack,baseline_evaluate,evaluate]"],
     "eval.dense_weights=False is not supported (true with recover.mode=scales_lora"),
])
def test_bad_joint_configs_fail_before_any_work(compose, tiny_overrides, extra, key):
    cfg, runner = _runner(compose, tiny_overrides + ["quant=rtn"] + extra)
    with pytest.raises(ConfigError) as err:
        runner.check(runner.plan())
    assert key in str(err.value)
    assert not (Path(cfg.run.outputs_dir) / "store" / "calibrate").exists()


def test_scales_lr_enters_the_recover_fingerprint_only_when_set(compose, tiny_overrides):
    from pipeline.dag import SPECS, stage_config
    from stages.recover import fingerprint_view

    def plan(extra):
        return _runner(compose, tiny_overrides + ["quant=rtn"] + extra)[1].plan()

    a, b = plan(["recover=scales_lora"]), plan(["recover=scales_lora", "recover.scales_lr=0.004"])
    assert a.fps["quantize"] == b.fps["quantize"] and a.fps["calibrate"] == b.fps["calibrate"]
    assert a.fps["recover"] != b.fps["recover"] and a.fps["pack"] != b.fps["pack"]
    cfg, _ = compose(tiny_overrides + ["recover=lora"])
    view = fingerprint_view(stage_config(SPECS["recover"], cfg))
    assert "scales_lr" not in view["recover"]  # lora and scales keep their fingerprints from before the field
    assert {k: v for k, v in stage_config(SPECS["recover"], cfg)["recover"].items() if k != "scales_lr"} == \
        view["recover"]
    cfg, _ = compose(tiny_overrides + ["recover=scales_lora"])
    assert fingerprint_view(stage_config(SPECS["recover"], cfg))["recover"]["scales_lr"] == 0.002
