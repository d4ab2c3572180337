"""bitsandbytes baselines (quant=bnb_nf4 | bnb_int8): configs, the backend check, the whole DAG on the tiny
model (bitsandbytes 0.50 runs both schemes on the CPU), NF4 and int8 against reference math, the decode engine
and evaluation on the packed checkpoint, and the vLLM evaluation backend's fallback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.errors import ConfigError
from core.schema import LayerOverride
from pipeline.validate import validate_config

from conftest import compose_config

# NF4 (QLoRA, Dettmers et al. 2023, appendix E): the 16 quantiles of N(0, 1) normalised to [-1, 1].
NF4_CODE = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
DECODER_LINEARS = 14  # tiny model: 2 blocks x (q, k, v, o, gate, up, down)
FAST_EVAL = ["eval.tasks=[persuasion_lastword]", "eval.limit=2", "eval.perplexity.max_windows=1",
             "bench.num_prompts=2", "bench.input_len=6", "bench.output_len=4", "bench.repeats=1", "bench.warmup=0"]


def nf4_reference(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Straightforward NF4: per block of 64 consecutive weights, absmax scale, nearest code value."""
    blocks = w.float().reshape(-1, block)
    absmax = blocks.abs().amax(1, keepdim=True)
    idx = (blocks / absmax).unsqueeze(-1).sub(NF4_CODE).abs().argmin(-1)
    return (NF4_CODE[idx] * absmax).reshape(w.shape)


def int8_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 weights: the weight in float16, per output row its absmax and round(w * (127 / absmax))."""
    w16 = w.half().float()
    absmax = w16.abs().amax(1)
    return torch.round(w16 * (127 / absmax[:, None])).to(torch.int8), absmax


# -- configs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant,bits,group", [("bnb_nf4", 4, 64), ("bnb_int8", 8, -1)])
def test_bnb_presets_compose_and_validate(compose, quant, bits, group):
    cfg, dcfg = compose([f"quant={quant}"])
    validate_config(cfg)
    assert dcfg.hydra.runtime.choices["quant"] == quant
    q = cfg.quant
    assert (q.method, q.bits, q.group_size, q.sym) == (quant, bits, group, True)
    own = {"bnb_nf4": ("double_quant", False), "bnb_int8": ("int8_threshold", 6.0)}[quant]
    assert getattr(q, own[0]) == own[1]
    assert not any(hasattr(q, name) for name in ("iters", "batch_size", "damp_percent"))


@pytest.mark.parametrize("override,message", [
    ("quant.group_size=128", r"quant.group_size=128 is not possible with quant.method=bnb_nf4 \(bitsandbytes NF4 "
                             r"stores bits=4, group_size=64, sym=true only\); use quant.group_size=64"),
    ("quant.bits=2", r"quant.bits=2 is not possible with quant.method=bnb_nf4 .*use quant.bits=4"),
    ("quant.sym=false", r"quant.sym=false is not possible .*use quant.sym=true"),
    ("quant.quantize_lm_head=true", r"quant.quantize_lm_head=true is not possible with quant.method=bnb_nf4"),
    ("pack.format=gptq", r"pack.format=gptq cannot hold a quant.method=bnb_nf4 checkpoint \(auto: .*own "
                         r"serialisation.*\); use pack.format=auto"),
    ("pack.packing_format=auto_round", r"pack.packing_format=auto_round cannot hold a quant.method=bnb_nf4"),
])
def test_what_bitsandbytes_cannot_honour_fails_before_any_work(compose, override, message):
    cfg, _ = compose(["quant=bnb_nf4", override])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_layer_overrides_and_the_int8_scheme_are_refused(compose):
    cfg, _ = compose(["quant=bnb_nf4"])
    cfg.quant.overrides = [LayerOverride(pattern=".*down_proj", bits=8)]
    with pytest.raises(ConfigError, match=r"quant.overrides=\[1 entries\] is not possible .*remove quant.overrides"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match=r"quant.group_size=64 is not possible with quant.method=bnb_int8 "
                                          r"\(bitsandbytes LLM.int8 stores bits=8, group_size=-1"):
        validate_config(compose(["quant=bnb_int8", "quant.group_size=64"])[0])


def test_the_int8_threshold_is_range_checked(compose):
    with pytest.raises(ConfigError, match=r"quant.int8_threshold=-1.0 is not supported \(a number >= 0.0\)"):
        validate_config(compose(["quant=bnb_int8", "quant.int8_threshold=-1"])[0])


# -- the backend check ----------------------------------------------------------------------------------
def test_missing_package_is_one_clear_error(monkeypatch):
    import importlib.util

    from stages.quant import bnb

    real = importlib.util.find_spec
    monkeypatch.setattr(bnb.importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(ConfigError, match=r"quant.method=bnb_nf4 needs the bitsandbytes package, which is not "
                                          r"installed .*pip install bitsandbytes==0.50.2"):
        bnb.check_backend("bnb_nf4", "cpu", torch.float32)


@pytest.fixture
def bnb_outputs(tmp_path, tiny_store) -> Path:
    out = tmp_path / "outputs"
    shutil.copytree(tiny_store / "model", out / "store" / "model", copy_function=os.link)
    return out


def _run(outputs: Path, quant: str, stages: list[str], extra=()):
    from pipeline.runner import PipelineRunner
    from pipeline.runtime import Runtime

    cfg, _ = compose_config([f"quant={quant}", "model=tiny_random", f"run.outputs_dir={outputs}",
                             "tracking.enabled=false", "run.progress=false", "run.device=cpu", "calib.nsamples=4",
                             "calib.seqlen=16", f"run.stages=[{','.join(stages)}]", *FAST_EVAL, *extra])
    validate_config(cfg)
    return {o.name: o for o in PipelineRunner(cfg, Runtime("cpu", "float32", log=lambda m: None)).run()}


def test_a_scheme_without_a_backend_here_fails_before_any_stage_runs(monkeypatch, bnb_outputs):
    import bitsandbytes

    def no_kernel(self, x):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bitsandbytes.nn.Linear8bitLt, "forward", no_kernel)
    with pytest.raises(ConfigError, match=r"quant.method=bnb_int8 cannot run here: bitsandbytes \S+ has no cpu "
                                          r"backend for int8 \(NotImplementedError: no kernel for this device\).*"
                                          r"run.device=cuda"):
        _run(bnb_outputs, "bnb_int8", ["calibrate", "quantize", "pack"])
    assert not (bnb_outputs / "store" / "calibrate").exists()  # nothing ran


# -- the DAG on the tiny model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory, tiny_store):
    out = tmp_path_factory.mktemp("bnb") / "outputs"
    shutil.copytree(tiny_store / "model", out / "store" / "model", copy_function=os.link)
    outcomes = _run(out, "bnb_nf4", ["calibrate", "quantize", "pack", "baseline_evaluate", "evaluate",
                                     "baseline_benchmark", "benchmark"])
    return out, outcomes


def _source_weights(outputs: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from pipeline.models import prepare_model
    from core.store import ArtifactStore

    handle = prepare_model(compose_config(["model=tiny_random"])[0].model, ArtifactStore(outputs / "store"),
                           log=lambda m: None)
    return load_file(str(Path(handle.path) / "model.safetensors"))


def test_nf4_runs_every_stage_and_ships_exactly_what_was_quantized(nf4_run):
    import bitsandbytes.functional as F

    from stages.formats.qlinear import load_quantized_model
    from stages.quant.bnb import quantized_modules

    outputs, outcomes = nf4_run
    assert all(o.status == "ran" for o in outcomes.values())
    state = json.loads((outcomes["quantize"].path / "bnb_layers.json").read_text())
    layers = state["layers"]
    assert len(layers) == DECODER_LINEARS and state["skipped"] == ["lm_head"]
    stored = sum(r["bytes"] for r in layers.values())
    weights = sum(r["shape"][0] * r["shape"][1] for r in layers.values())
    assert outcomes["quantize"].metrics["bits_per_weight"] == round(8 * stored / weights, 4)
    # 4 bits + one fp32 absmax per 64 weights = 4.5, plus the per-layer code table and quant-state record
    assert 4.5 < outcomes["quantize"].metrics["bits_per_weight"] < 4.8
    assert outcomes["pack"].metrics["verified_layers"] == DECODER_LINEARS
    compat = json.loads((outcomes["pack"].path / "compat.json").read_text())
    assert (compat["format"], compat["vllm"]["loads"], compat["vllm"]["quantization"]) == \
        ("bitsandbytes", True, "bitsandbytes")
    ckpt = outcomes["pack"].path / "checkpoint"
    config = json.loads((ckpt / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bnb_4bit_quant_type"], qc["bnb_4bit_compute_dtype"], config["dtype"]) == \
        ("bitsandbytes", "nf4", "float32", "float32")  # model=tiny_random sets model.dtype=float32
    assert (ckpt / "tokenizer.json").is_file()
    model = load_quantized_model(ckpt, "cpu", torch.float32)
    source = _source_weights(outputs)
    found = quantized_modules(model)
    assert sorted(found) == sorted(layers)
    for name, module in found.items():
        got = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        assert torch.equal(got, nf4_reference(source[f"{name}.weight"])), name
    assert model.model.embed_tokens.weight.dtype == torch.float32  # evaluate computes in the run's dtype


def test_checkpoint_writer_casts_only_unquantized_tensors_and_shards(nf4_run, tmp_path):
    from safetensors import safe_open

    from stages.formats.bnb import verify_reloaded, write_bnb_checkpoint
    from stages.formats.source import read_safetensors_headers

    _, outcomes = nf4_run
    saved = outcomes["quantize"].path / "bnb"
    layers = json.loads((outcomes["quantize"].path / "bnb_layers.json").read_text())["layers"]
    keys = {f"{n}.{t}" for n, rec in layers.items() for t in rec["tensors"]}
    files = write_bnb_checkpoint(saved, tmp_path / "ckpt", keys, torch.bfloat16, 2 * 10**5, [])
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (config["dtype"], config["quantization_config"]["bnb_4bit_compute_dtype"]) == ("bfloat16", "bfloat16")
    before, after = read_safetensors_headers(saved), read_safetensors_headers(tmp_path / "ckpt")
    assert set(before) == set(after)
    for name, info in after.items():
        with safe_open(str(saved / before[name].file), framework="pt") as f:
            src = f.get_tensor(name)
        with safe_open(str(tmp_path / "ckpt" / info.file), framework="pt") as f:
            got = f.get_tensor(name)
        assert torch.equal(got, src if name in keys or not src.is_floating_point() else src.to(torch.bfloat16)), name
    assert after["model.embed_tokens.weight"].dtype == "BF16"
    assert verify_reloaded(saved, tmp_path / "ckpt", layers) == DECODER_LINEARS


def test_evaluate_and_benchmark_score_the_bnb_checkpoint(nf4_run):
    _, outcomes = nf4_run
    metrics = json.loads((outcomes["evaluate"].path / "metrics.json").read_text())
    assert metrics["backend"] == "hf" and metrics["model"].endswith("checkpoint")
    base = json.loads((outcomes["baseline_evaluate"].path / "metrics.json").read_text())["metrics"]
    assert metrics["metrics"]["ppl.delta_vs_baseline"] == pytest.approx(metrics["metrics"]["ppl"] - base["ppl"])
    record = json.loads((outcomes["benchmark"].path / "throughput.json").read_text())
    assert record["backend"] == "torch"
    groups = {k["signature"]: k["routes"] for k in record["kernels"]}
    assert groups and all(routes == ["module"] for sig, routes in groups.items() if sig.startswith("Linear4bit"))
    assert sum(1 for sig in groups if sig.startswith("Linear4bit")) == 4  # qkv, o, gate_up, down shapes


def test_decode_engine_on_the_bnb_checkpoint_gives_transformers_greedy_tokens(nf4_run):
    from stages.bench.engine import DecodeEngine
    from stages.bench.hf_decoder import decoder_from_hf
    from stages.formats.qlinear import load_quantized_model
    from stages.kernels.planner import build_kernel_linears

    _, outcomes = nf4_run
    ckpt = outcomes["pack"].path / "checkpoint"
    ids = torch.randint(3, 1000, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = load_quantized_model(ckpt, "cpu", torch.float32).generate(
            ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)[:, 5:]
        spec, sources = decoder_from_hf(load_quantized_model(ckpt, "cpu", torch.float32), torch.float32, 11)
        linears, _ = build_kernel_linears(sources, "auto", torch.float32, [2])
        got = DecodeEngine(spec, linears, 2, 11).generate(ids, 6)[0]
    assert torch.equal(got, ref)


def test_int8_quantize_and_pack_store_the_reference_int8_weights(bnb_outputs):
    from safetensors import safe_open

    outcomes = _run(bnb_outputs, "bnb_int8", ["calibrate", "quantize", "pack"])
    assert outcomes["pack"].metrics["verified_layers"] == DECODER_LINEARS
    assert 8.0 < outcomes["quantize"].metrics["bits_per_weight"] < 8.6  # + one fp32 scale per row
    ckpt = outcomes["pack"].path / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["load_in_8bit"] is True
    source = _source_weights(bnb_outputs)
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            codes, absmax = int8_reference(source[f"{name}.weight"])
            assert torch.equal(f.get_tensor(f"{name}.weight"), codes)
            assert torch.equal(f.get_tensor(f"{name}.SCB"), absmax)


# -- eval.backend=vllm where the checkpoint is not vLLM-servable -----------------------------------------
def _eval_ctx(tmp_path: Path, loads: bool, variant: str = "quantized", tasks=("persuasion_lastword",)):
    from core.context import Artifact

    pack = tmp_path / "pack"
    pack.mkdir(exist_ok=True)
    (pack / "compat.json").write_text(json.dumps({"vllm": {"version": "0.26.0", "loads": loads,
                                                           "reason": "Marlin does not support 2-bit"}}))
    cfg, _ = compose_config(["eval.backend=vllm", f"eval.tasks=[{','.join(tasks)}]"])
    return SimpleNamespace(cfg=cfg, variant=variant, inputs={"pack": Artifact("pack", pack, {})})


def test_vllm_evaluation_falls_back_to_hf_where_vllm_refuses_the_checkpoint(tmp_path):
    from stages.evaluate import eval_backend

    backend, why = eval_backend(_eval_ctx(tmp_path, loads=False))
    assert backend == "hf"
    assert why.startswith("eval.backend=vllm, but vLLM 0.26.0 refuses this checkpoint (Marlin does not support "
                          "2-bit): its tasks were scored with hf")
    assert eval_backend(_eval_ctx(tmp_path, loads=True))[0] == "vllm"
    assert eval_backend(_eval_ctx(tmp_path, loads=False, variant="baseline"))[0] == "vllm"
