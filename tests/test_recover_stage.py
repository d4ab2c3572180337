"""The recover stage through the pipeline on the tiny model: scales and lora modes, pack, evaluate, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from _quant_helpers import one_thread  # noqa: F401
from pipeline.dag import SPECS, stage_fingerprint
from core.errors import ConfigError, InputError
from pipeline.runner import PipelineRunner
from pipeline.runtime import Runtime
from pipeline.validate import validate_config

RECOVER = ["quant.bits=2", "quant.sym=false", "recover.steps=6", "recover.batch_size=4", "recover.topk=16",
           "recover.checkpoint_every=2", "pack=auto_round"]
STAGES = "run.stages=[calibrate,quantize,recover,pack]"


def _run(compose, overrides: list[str]):
    cfg, _ = compose(overrides)
    validate_config(cfg)
    outcomes = PipelineRunner(cfg, Runtime("cpu", "float32", log=lambda m: None)).run()
    return cfg, {o.name: o for o in outcomes}


def _unpack_gptq_reference(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain bit-by-bit GPTQ v2 unpacker (independent of stages.formats; v2 stores zero points as they are):
    codes [out, in], zeros [groups, out]."""
    per = 32 // bits
    mask = (1 << bits) - 1
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = torch.stack([(words >> (bits * k)) & mask for k in range(per)], dim=1).reshape(-1, qweight.shape[1])
    zw = qzeros.to(torch.int64) & 0xFFFFFFFF
    zeros = torch.stack([(zw >> (bits * k)) & mask for k in range(per)], dim=2).reshape(qzeros.shape[0], -1)
    return codes.t(), zeros


def test_scales_mode_lowers_the_loss_and_the_gptq_v2_checkpoint_carries_the_tuned_scales(compose, tiny_overrides):
    ov = tiny_overrides + RECOVER + ["recover=scales", "pack=gptq_v2", "quant.group_size=32", STAGES, "quant=rtn",
                                     "recover.lr=0.01"]
    cfg, out = _run(compose, ov)
    m = out["recover"].metrics
    assert m["train_loss_final"] < 0.9 * m["train_loss_init"]
    rec = out["recover"].path
    tuned = load_file(str(rec / "qstate.safetensors"))
    orig = load_file(str(out["quantize"].path / "qstate.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(tuned[f"{name}.codes"], orig[f"{name}.codes"])  # integer codes frozen
    assert not torch.equal(tuned[f"{name}.scale"], orig[f"{name}.scale"])
    norms = load_file(str(rec / "replacements.safetensors"))
    assert "model.norm.weight" in norms and "model.layers.0.input_layernorm.weight" in norms
    ck = load_file(str(out["pack"].path / "checkpoint" / "model.safetensors"))
    codes, zeros = _unpack_gptq_reference(ck[f"{name}.qweight"], ck[f"{name}.qzeros"], 2)
    assert torch.equal(codes.to(torch.uint8), tuned[f"{name}.codes"])
    assert torch.equal(ck[f"{name}.scales"], tuned[f"{name}.scale"].t())  # the tuned float16 scales, as stored
    assert torch.equal(zeros, tuned[f"{name}.zero"].t().long())  # exact asym zero points, 0 included
    assert torch.equal(ck["model.norm.weight"], norms["model.norm.weight"].to(ck["model.norm.weight"].dtype))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_adapter_lands_beside_the_checkpoint_and_peft_reproduces_the_trained_model(compose, tiny_overrides):
    from stages.formats.qlinear import load_quantized_model
    from stages.formats.source import QStateReader
    from stages.recovery.adapter import apply_adapter_with_peft, read_adapter
    from stages.recovery.student import build_student
    from core.models import load_model
    from pipeline.models import prepare_model
    from core.store import ArtifactStore
    from stages.evaluate import densify_quant_linears

    ov = tiny_overrides + RECOVER + ["recover=lora", "recover.rank=4", "recover.lr=0.001", "eval.tasks=[]",
                                     "eval.perplexity.seqlen=32", "eval.perplexity.stride=32",
                                     "eval.perplexity.max_windows=2",
                                     "run.stages=[calibrate,quantize,recover,pack,baseline_evaluate,evaluate]"]
    cfg, out = _run(compose, ov)
    m = out["recover"].metrics
    assert m["train_loss_final"] < 0.7 * m["train_loss_init"]
    pack = out["pack"].path
    assert sorted(p.name for p in (pack / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    adapter = read_adapter(pack / "adapter")
    assert len(adapter.weights) == 14 and adapter.rank == 4
    # the student as trained: quantized layers from the qstate + the exported A, B
    handle = prepare_model(cfg.model, ArtifactStore(Path(cfg.run.outputs_dir) / "store"), log=lambda m: None)
    student = build_student(load_model(handle, torch.float32, "cpu"),
                            QStateReader.open(out["quantize"].path).iter_layers(), torch.device("cpu"))
    for name, (a, b) in adapter.weights.items():
        student.layers[name].enable_lora(4, cfg.recover.alpha, a, b)
    # the shipped form: the packed checkpoint loaded back, dense weights, adapter through PEFT
    loaded = load_quantized_model(pack / "checkpoint", "cpu", torch.float32)
    densify_quant_linears(loaded, torch.float32)
    plain = _logits(loaded, torch.arange(1, 33)[None])
    with_adapter = apply_adapter_with_peft(loaded, pack / "adapter")
    ids = torch.arange(1, 33)[None]
    got, want = _logits(with_adapter, ids), _logits(student.model, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert (got - plain).abs().max() > 100 * (got - want).abs().max()  # the adapter changes the logits
    # the evaluate stage scored the checkpoint + adapter: its perplexity is the trained student's
    from stages.eval.perplexity import perplexity, tokenize_text
    from stages.eval.texts import read_heldout_text
    from core.models import load_tokenizer

    text_ids = tokenize_text(load_tokenizer(handle), read_heldout_text())
    with torch.no_grad():
        want_ppl = perplexity(student.model, text_ids, 32, 32, max_windows=2)["ppl"]
    assert out["evaluate"].metrics["ppl"] == pytest.approx(want_ppl, rel=1e-5)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_one(compose, tiny_overrides,
                                                                                   monkeypatch, tmp_path, one_thread):
    ov = tiny_overrides + RECOVER + ["recover=scales", STAGES]
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # killed during step 5, after the checkpoint of step 4
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        _run(compose, ov)
    outputs = Path(next(o for o in ov if o.startswith("run.outputs_dir=")).split("=", 1)[1])
    partial = next((outputs / "store" / "recover").glob(".partial-*"))
    assert sorted(p.name for p in (partial / "progress").iterdir()) == \
        ["init_metrics.json", "teacher_topk.safetensors", "train_state.safetensors"]
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    _, out = _run(compose, ov)
    assert out["recover"].metrics["resumed_from_step"] == 4.0 and out["recover"].status == "ran"
    assert not (out["recover"].path / "progress").exists()
    fresh = [o if not o.startswith("run.outputs_dir=") else f"run.outputs_dir={tmp_path / 'fresh'}" for o in ov]
    _, clean = _run(compose, fresh)
    assert clean["recover"].fingerprint == out["recover"].fingerprint
    a = load_file(str(out["recover"].path / "qstate.safetensors"))
    b = load_file(str(clean["recover"].path / "qstate.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out["recover"].path / "recover.json").read_text())["curve"] == \
        json.loads((clean["recover"].path / "recover.json").read_text())["curve"]


def _plan(compose, overrides):
    cfg, _ = compose(overrides)
    return PipelineRunner(cfg, Runtime("cpu", "float32", log=lambda m: None)).plan(), cfg


def test_recover_none_leaves_pack_exactly_as_without_the_stage(compose, tiny_overrides):
    off, cfg = _plan(compose, tiny_overrides + ["quant=rtn"])
    assert "recover" not in off.fps and off.inputs["pack"] == ["quantize"]
    assert off.fps["pack"] == stage_fingerprint(SPECS["pack"], cfg, {"quantize": off.fps["quantize"]},
                                                off.model.fingerprint, "cpu", "float32")
    on, _ = _plan(compose, tiny_overrides + ["quant=rtn", "recover=scales"])
    assert on.inputs["pack"] == ["quantize", "recover"] and on.fps["pack"] != off.fps["pack"]
    assert on.fps["quantize"] == off.fps["quantize"]
    export = Path(cfg.run.outputs_dir) / "dvc"
    _, out = _run(compose, tiny_overrides + ["quant=rtn", "run.stages=[calibrate,quantize,recover,pack]",
                                             f"run.export_dir={export}"])
    assert out["recover"].status == "skipped" and out["pack"].status == "ran"
    # DVC's recover stage still gets its outs: a marker folder and empty metrics
    assert json.loads((export / "recover" / "skipped.json").read_text())["stage"] == "recover"
    assert json.loads((export / "recover.metrics.json").read_text()) == {}
    assert json.loads((out["pack"].path / "manifest.json").read_text())["inputs"] == \
        {"quantize": out["quantize"].fingerprint}


@pytest.mark.parametrize("extra,key", [
    (["recover=lora", "recover.rank=33"], "recover.rank=33 is not supported (at most 32, the smaller dimension of "
                                          "model.layers.0.self_attn.k_proj [32 x 64])"),
    (["recover=lora", "recover.target_modules=[qproj]"], "recover.target_modules=[qproj] selects nothing for"),
    (["recover=scales", "recover.val_samples=8"], "recover.val_samples=8 leaves no training samples"),
    (["recover=scales", "recover.tune_zeros=true", "quant.sym=true"], "recover.tune_zeros=True is not supported"),
])
def test_bad_recover_configs_fail_before_any_work(compose, tiny_overrides, extra, key):
    cfg, _ = compose(tiny_overrides + ["quant=rtn"] + extra)
    validate_config(cfg)
    runner = PipelineRunner(cfg, Runtime("cpu", "float32", log=lambda m: None))
    with pytest.raises(ConfigError) as err:
        runner.check(runner.plan())
    assert key in str(err.value)
    assert not (Path(cfg.run.outputs_dir) / "store" / "calibrate").exists()


def test_recover_without_a_quantize_stage_is_refused(compose, tiny_overrides):
    cfg, _ = compose(tiny_overrides + ["recover=scales", "run.stages=[recover]"])
    runner = PipelineRunner(cfg, Runtime("cpu", "float32", log=lambda m: None))
    with pytest.raises(InputError, match=r"stage 'recover' needs 'quantize', which is neither selected nor in the "
                                         r"store .*run.stages=\[quantize,recover"):
        runner.check(runner.plan())


def test_negative_steps_exit_with_one_clear_error():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "recover=scales", "recover.steps=-1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: recover.steps=-1 is not supported (an integer >= 0); e.g. recover.steps=200"


@pytest.mark.slow
@pytest.mark.parametrize("mode,lr", [("scales", 2e-3), ("lora", 1e-3)])
def test_recovery_lowers_distillation_loss_and_heldout_perplexity_of_smollm2(smollm2_handle, mode, lr):
    """Real SmolLM2-135M, RTN W3G64 asym, 16 x 128 Austen calibration tokens, 12 steps of batch 4:
    the distillation loss and the perplexity on the first 4 Persuasion windows (512 tokens) drop.
    The scales model is scored in its exported form (float16 scales, integer zeros, tuned norms)."""
    import copy

    from core.models import load_model, load_tokenizer
    from core.schema import CalibConfig, RecoverConfig
    from stages.calib_sources import load_austen_documents
    from stages.calibrate import sample_calibration
    from stages.eval.perplexity import perplexity, tokenize_text
    from stages.eval.taskdata import read_heldout_text
    from stages.quant.base import LayerScheme
    from stages.quant.rtn import rtn_layer
    from stages.recovery.core import recover_model
    from stages.recovery.student import build_student

    tok = load_tokenizer(smollm2_handle)
    base = load_model(smollm2_handle, torch.float32, "cpu")
    ccfg = CalibConfig(source="austen", nsamples=16, seqlen=128, seed=42)
    calib = sample_calibration([d.text for d in load_austen_documents(ccfg)], tok, ccfg)
    ids = tokenize_text(tok, read_heldout_text())
    layers = {n: rtn_layer(m.weight.detach(), LayerScheme(3, 64, False)) for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}

    def ppl(model):
        with torch.no_grad():
            return perplexity(model, ids, 512, 512, batch_size=2, max_windows=4)["ppl"]

    fp = ppl(base)
    quantized = ppl(build_student(copy.deepcopy(base), layers.items(), torch.device("cpu")).model)
    cfg = RecoverConfig(mode=mode, steps=12, batch_size=4, lr=lr, topk=32, checkpoint_every=0)
    student = copy.deepcopy(base)
    result = recover_model(student, layers.items(), calib, cfg, "cpu", load_teacher=lambda: None,
                           fp_weight=lambda n: None)
    m = result.metrics
    assert m["train_loss_final"] < 0.8 * m["train_loss_init"], m
    if mode == "scales":  # the exported checkpoint's numbers: a fresh model with the exported layers and norms
        shipped = build_student(copy.deepcopy(base), result.export.layers.items(), torch.device("cpu")).model
        shipped.load_state_dict(result.export.replacements, strict=False)
    else:
        shipped = student
    recovered = ppl(shipped)
    assert 20 < fp < 100 and quantized > 1.5 * fp
    assert recovered < fp + 0.7 * (quantized - fp), (fp, quantized, recovered)


def test_recovery_after_a_bitsandbytes_method_is_refused(compose, tiny_overrides):
    cfg, _ = compose([o for o in tiny_overrides if not o.startswith("quant.")] + ["quant=bnb_nf4", "recover=scales"])
    runner = PipelineRunner(cfg, Runtime("cpu", "float32", log=lambda m: None))
    with pytest.raises(ConfigError, match=r"recover.mode=scales cannot follow quant=bnb_nf4"):
        validate_config(cfg)
        runner.check(runner.plan())
    assert not (Path(cfg.run.outputs_dir) / "store" / "calibrate").exists()


def test_scales_mode_changes_only_scale_and_norm_values_of_the_served_checkpoint(compose, tiny_overrides):
    """What a server sees after recover=scales: the same tensors (names, shapes, dtypes), the same quantization
    config and the same packed codes as without recovery; only the scales and the norm weights differ. So a
    server that loads the untuned W4 sym checkpoint (vLLM: Marlin/Machete) loads the tuned one the same way."""
    base = tiny_overrides + ["quant=rtn", "quant.bits=4", "quant.sym=true", "quant.group_size=32", "pack=auto",
                             "recover.steps=4", "recover.batch_size=4", "recover.topk=16", "recover.lr=0.01", STAGES]
    _, plain = _run(compose, base + ["recover=none"])
    _, tuned = _run(compose, base + ["recover=scales"])
    assert plain["recover"].status == "skipped" and tuned["recover"].status == "ran"
    folder_a, folder_b = plain["pack"].path / "checkpoint", tuned["pack"].path / "checkpoint"
    config = [json.loads((f / "config.json").read_text())["quantization_config"] for f in (folder_a, folder_b)]
    assert config[0] == config[1] and config[0]["bits"] == 4 and config[0]["sym"] is True
    a, b = load_file(str(folder_a / "model.safetensors")), load_file(str(folder_b / "model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    differ = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert differ and all(k.endswith(".scales") or k.endswith("norm.weight") for k in differ), differ
    assert any(k.endswith(".scales") for k in differ)
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith((".qweight", ".qzeros", ".g_idx")))
