"""Benchmark stage: workload, measurement arithmetic, the torch decode engine against transformers,
the torch backend on the tiny packed model and its baseline, vLLM request/log handling, bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _bench_helpers import dequantized_reference_model, fake_vllm_log, pack_checkpoint
from core.context import Artifact, StageContext
from core.errors import ConfigError, InputError
from stages import benchmark as bench
from stages.bench.engine import DecodeEngine
from stages.bench.hf_decoder import decoder_from_hf
from stages.bench.options import BenchOptions, BenchTarget
from stages.bench.vllm_backend import VLLMBackend, build_request, parse_vllm_log, run_worker
from stages.bench.workload import BatchTiming, Workload, batches_for, measure, prompt_token_ids, speedups
from stages.kernels.planner import build_kernel_linears

HAS_VLLM = importlib.util.find_spec("vllm") is not None
SMALL = Workload(num_prompts=3, input_len=5, output_len=4, batch_sizes=(1, 2), warmup=0, repeats=2, seed=3)


# -- workload --------------------------------------------------------------------------------------------
def test_prompts_are_seeded_and_avoid_special_tokens():
    a = prompt_token_ids(SMALL, 50, exclude={0, 1, 2, 49})
    assert a.shape == (3, 5) and torch.equal(a, prompt_token_ids(SMALL, 50, exclude={0, 1, 2, 49}))
    assert not bool(torch.isin(a, torch.tensor([0, 1, 2, 49])).any()) and int(a.max()) < 50
    other = prompt_token_ids(Workload(3, 5, 4, (1,), seed=4), 50, exclude={0, 1, 2, 49})
    assert not torch.equal(a, other)
    assert torch.equal(prompt_token_ids(SMALL, 4, exclude={0, 1, 2}), torch.full((3, 5), 3))


def test_batches_cycle_through_the_prompts():
    assert batches_for(SMALL, 1) == [[0], [1], [2]]
    assert batches_for(SMALL, 2) == [[0, 1], [2, 0]]
    assert batches_for(SMALL, 4) == [[0, 1, 2, 0]]


def test_measure_arithmetic_on_fixed_timings():
    seen = []

    def run_batch(idx):
        seen.append(list(idx))
        return BatchTiming(ttft_s=0.1, total_s=0.4)

    w = Workload(3, 5, 4, (2,), warmup=1, repeats=2)
    rec = measure(run_batch, w, 2)
    assert len(seen) == 2 * 3  # one warm-up pass + two timed passes of two batches
    assert rec["requests"] == 4 and rec["output_tokens"] == 16 and rec["batches"] == 2
    assert rec["output_tokens_per_s"]["median"] == pytest.approx(16 / 0.8)
    assert rec["requests_per_s"]["median"] == pytest.approx(4 / 0.8)
    assert rec["ttft_ms"]["median"] == pytest.approx(100)
    assert rec["tpot_ms"]["median"] == pytest.approx(100)  # (0.4 - 0.1) / 3 tokens
    assert rec["decode_tokens_per_s"]["median"] == pytest.approx(4 * 3 / 0.6)
    q = [{"batch_size": 1, "output_tokens_per_s": {"median": 30.0}}, {"batch_size": 8, "output_tokens_per_s": {"median": 5.0}}]
    b = [{"batch_size": 1, "output_tokens_per_s": {"median": 20.0}}]
    assert speedups(q, b) == {1: 1.5}


# -- the decode engine against transformers ----------------------------------------------------------------
def _tiny_hf(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=211,
                               max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _engine_tokens(model, ids, out_len, policy="auto"):
    spec, sources = decoder_from_hf(model, torch.float32, ids.shape[1] + out_len)
    linears, _ = build_kernel_linears(sources, policy, torch.float32, [ids.shape[0]])
    return DecodeEngine(spec, linears, ids.shape[0], ids.shape[1] + out_len).generate(ids, out_len)[0]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_engine_reproduces_transformers_greedy_tokens(model_type):
    model = _tiny_hf(model_type)
    ids = torch.randint(3, 211, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)[:, 6:]
        got = _engine_tokens(model, ids, 8)
    assert torch.equal(got, ref)


@pytest.fixture(scope="module")
def tiny_packed(tmp_path_factory, tiny_store):
    """(baseline model folder, W4G32 sym checkpoint, W3G32 asym checkpoint) of the tiny random Llama."""
    from pipeline.models import prepare_model
    from core.store import ArtifactStore
    from conftest import compose_config

    cfg, _ = compose_config(["model=tiny_random"])
    handle = prepare_model(cfg.model, ArtifactStore(tiny_store), log=lambda m: None)
    root = tmp_path_factory.mktemp("packed")
    w4 = pack_checkpoint(handle.path, root / "w4", 4, 32, True)
    w3 = pack_checkpoint(handle.path, root / "w3", 3, 32, False)
    return handle, w4, w3


@pytest.mark.parametrize("which", ["w4", "w3"])
def test_engine_on_packed_checkpoint_matches_its_reference_model(tiny_packed, which):
    handle, w4, w3 = tiny_packed
    ckpt = w4 if which == "w4" else w3
    ids = torch.randint(3, 1000, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = dequantized_reference_model(ckpt).generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                                         pad_token_id=0)[:, 5:]
        got = _engine_tokens(dequantized_reference_model(ckpt), ids, 6)
    assert torch.equal(got, ref)


# -- the stage on the tiny model: baseline, then the packed checkpoint with its speedup --------------------
def _ctx(tmp_path: Path, handle, variant: str, inputs: dict, overrides=()):
    from conftest import compose_config

    cfg, _ = compose_config(["model=tiny_random", "bench=torch", "bench.num_prompts=2", "bench.input_len=4",
                             "bench.output_len=3", "bench.batch_sizes=[1,2]", "bench.warmup=0", "bench.repeats=2",
                             *overrides])
    work = tmp_path / variant
    work.mkdir()
    return StageContext(cfg=cfg, stage="benchmark" if variant != "baseline" else "baseline_benchmark",
                        variant=variant, workdir=work, resumed=False, inputs=inputs, model=handle, device="cpu",
                        dtype="float32", log=lambda m: None)


def test_stage_records_baseline_and_packed_with_speedup(tmp_path, tiny_packed, monkeypatch):
    handle, w4, _ = tiny_packed
    base_ctx = _ctx(tmp_path, handle, "baseline", {})
    base = bench.run(base_ctx)
    base_rec = json.loads((base_ctx.workdir / bench.RESULT_FILE).read_text())
    assert base_rec["backend"] == "torch" and base_rec["backend_requested"] == "torch"
    assert [r["batch_size"] for r in base_rec["results"]] == [1, 2] and base_rec["variant"] == "baseline"
    assert base.metrics["tokens_per_s.b2"] > 0 and base.metrics["tokens_per_s"] == base.metrics["tokens_per_s.b1"]
    # the pack artifact holds the checkpoint in checkpoint/ (stages.formats.artifact.checkpoint_dir)
    pack_art = tmp_path / "pack"
    (pack_art).mkdir()
    (pack_art / "checkpoint").symlink_to(w4, target_is_directory=True)
    inputs = {"pack": Artifact("pack", pack_art, {"fingerprint": "p"}),
              "baseline_benchmark": Artifact("baseline_benchmark", base_ctx.workdir, {"fingerprint": "b"})}
    ctx = _ctx(tmp_path, handle, "quantized", inputs)
    res = bench.run(ctx)
    rec = json.loads((ctx.workdir / bench.RESULT_FILE).read_text())
    for key in ("results", "kernels", "weight_memory_bytes", "quantized_linear_bytes", "size_on_disk_bytes",
                "weights_on_disk_bytes", "peak_gpu_memory_bytes", "workload", "device_name", "note"):
        assert key in rec, key
    for r in rec["results"]:
        for metric in ("output_tokens_per_s", "requests_per_s", "ttft_ms", "tpot_ms", "latency_ms"):
            assert r[metric]["min"] <= r[metric]["median"] <= r[metric]["max"], metric
        assert len(r["passes"]) == 2
    # on the CPU quantized Linears are dequantized once (no low-bit kernels): same weight memory as the baseline
    assert set(rec["speedup_vs_baseline"]) == {"1", "2"} and rec["weight_memory_ratio"] == pytest.approx(1.0, abs=0.01)
    assert {p["routes"][0] for p in rec["kernels"]} == {"dequant_once", "dense"}
    assert res.metrics["speedup_vs_baseline"] == rec["speedup_vs_baseline"]["1"]
    # on the CPU the summary says it only checked the path, and shows no speedup
    assert res.summary["check"] == base.summary["check"] == bench.CPU_LABEL and "speedup" not in res.summary
    assert rec["quantized_linear_bytes"] < rec["weight_memory_bytes"]


def test_speedup_refused_across_backends_or_workloads():
    rec = {"backend": "torch", "workload": {"a": 1}, "results": []}
    bench.attach_speedups(rec, {"backend": "vllm", "workload": {"a": 1}, "results": []})
    assert "speedup_vs_baseline" not in rec and "not comparable" in rec["speedup_note"]


# -- choices and bad input -----------------------------------------------------------------------------------
def _bench_cfg(**kw):
    from core.schema import BenchConfig

    return BenchConfig(**kw)


def test_auto_backend_and_switches_resolve_per_device(monkeypatch):
    import stages.bench.vllm_backend as vb

    monkeypatch.setattr(vb, "vllm_available", lambda: False)
    assert bench.resolve_backend("auto", "cuda:0") == ("torch", "auto: vLLM is not installed")
    monkeypatch.setattr(vb, "vllm_available", lambda: True)
    assert bench.resolve_backend("auto", "cpu")[0] == "torch"
    assert bench.resolve_backend("auto", "cuda:0")[0] == "vllm"
    cpu, gpu = bench.resolve_options(_bench_cfg(), "cpu", "float32"), bench.resolve_options(_bench_cfg(), "cuda:0", "bfloat16")
    assert (cpu.compile, cpu.cuda_graphs, gpu.compile, gpu.cuda_graphs) == (False, False, True, True)


def test_auto_falls_back_to_torch_where_the_pack_report_says_vllm_refuses(monkeypatch, tmp_path, tiny_packed):
    import stages.bench.vllm_backend as vb

    monkeypatch.setattr(vb, "vllm_available", lambda: True)
    refuses = {"version": "0.26.0", "loads": False, "reason": "Unsupported quantization config: bits=2, sym=False"}
    name, why = bench.resolve_backend("auto", "cuda:0", refuses)
    assert name == "torch" and "refuses this checkpoint (Unsupported quantization config: bits=2" in why
    assert bench.resolve_backend("auto", "cuda:0", {"loads": True})[0] == "vllm"
    assert bench.resolve_backend("vllm", "cuda:0", refuses) == ("vllm", "requested")  # an explicit choice is kept
    # the baseline stage ran vLLM: the unquantized model is measured again on torch for a comparable speedup
    handle = tiny_packed[0]
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / bench.RESULT_FILE).write_text(json.dumps({"backend": "vllm", "results": []}))
    ctx = _ctx(tmp_path, handle, "quantized", {"baseline_benchmark": Artifact("baseline_benchmark", base_dir, {})},
               ["bench.backend=auto"])
    measured = []
    monkeypatch.setattr(bench, "_measure", lambda c, n, target, o: measured.append((n, target.variant)) or
                        {"backend": n, "results": []})
    rerun = bench.comparable_baseline(ctx, {"backend": "torch"}, None)
    assert measured == [("torch", "baseline")] and rerun == {"backend": "torch", "results": []}
    same = bench.comparable_baseline(ctx, {"backend": "vllm"}, None)
    assert same["backend"] == "vllm" and len(measured) == 1


def test_bad_inputs_fail_before_work(monkeypatch, tiny_packed):
    import stages.bench.vllm_backend as vb

    monkeypatch.setattr(vb, "vllm_available", lambda: False)
    with pytest.raises(ConfigError, match=r"bench.backend=vllm needs the vllm package.*pip install vllm==0.26.0.*bench.backend=torch"):
        bench.check_bench(_bench_cfg(backend="vllm"), "cuda:0", 2048)
    monkeypatch.setattr(vb, "vllm_available", lambda: True)
    with pytest.raises(ConfigError, match="bench.backend=vllm needs a CUDA device"):
        bench.check_bench(_bench_cfg(backend="vllm"), "cpu", 2048)
    for key in ("compile", "cuda_graphs"):
        with pytest.raises(ConfigError, match=f"bench.{key}=on needs a CUDA device"):
            bench.check_bench(_bench_cfg(**{key: "on"}), "cpu", 2048)
    with pytest.raises(ConfigError, match="bench.linear_kernel=tinygemm needs a CUDA device"):
        bench.check_bench(_bench_cfg(linear_kernel="tinygemm"), "cpu", 2048)
    bench.check_bench(_bench_cfg(linear_kernel="dequant", compile="off"), "cpu", 2048)  # fine
    with pytest.raises(ConfigError, match=r"bench.kernel_batch1_weight=0 is not a weight \(a number > 0.*e.g. bench"):
        bench.check_bench(_bench_cfg(kernel_batch1_weight=0), "cpu", 2048)
    from conftest import compose_config

    cfg, _ = compose_config(["model=tiny_random", "run.device=cpu", "bench.input_len=2000", "bench.output_len=100"])
    with pytest.raises(ConfigError, match=r"bench.output_len=100 makes the workload 2100 tokens long.*2048"):
        bench.preflight(cfg, tiny_packed[0])


def test_engine_refuses_unsupported_models_and_too_long_workloads():
    model = _tiny_hf("llama")
    with pytest.raises(ValueError, match="exceeds the rotary table"):
        spec, sources = decoder_from_hf(model, torch.float32, 32)
        linears, _ = build_kernel_linears(sources, "auto", torch.float32, [1])
        DecodeEngine(spec, linears, 1, 64)
    gpt2 = SimpleNamespace(model_type="gpt2")
    from stages.bench.hf_decoder import check_supported

    with pytest.raises(InputError, match="Llama-layout models.*bench.backend=vllm"):
        check_supported(gpt2, 10)


# -- vLLM: request building, log parsing, the child process --------------------------------------------------
def test_vllm_log_parsing_finds_method_kernel_and_memory():
    info = parse_vllm_log(fake_vllm_log())
    assert info["linear_kernels"] == [{"kernel": "MacheteLinearKernel", "method": "GPTQMarlinLinearMethod"}]
    assert info["quantization_logged"] == "gptq_marlin" and info["weight_memory_gib"] == pytest.approx(2.1524)
    assert info["attention_backend"] == "FLASH_ATTN" and any("convertible" in ln for ln in info["quant_log_lines"])
    assert parse_vllm_log(fake_vllm_log(kernel=None, quant="gptq"))["linear_kernels"] == []


def test_vllm_request_uses_the_same_prompts_as_torch(tiny_packed):
    handle, w4, _ = tiny_packed
    target = BenchTarget(str(w4), "quantized")
    req = build_request(target, SMALL, BenchOptions("cuda:0", "bfloat16"))
    vocab = target.config()["vocab_size"]
    assert req["prompts"] == prompt_token_ids(SMALL, vocab, {1, 2}).tolist()
    from stages.bench.vllm_worker import engine_kwargs

    kw = engine_kwargs(req)
    assert kw["max_model_len"] == 9 and kw["max_num_seqs"] == 2 and kw["enable_prefix_caching"] is False
    assert kw["skip_tokenizer_init"] and kw["compilation_config"] == {"cudagraph_capture_sizes": [1, 2]}
    assert "compilation_config" not in engine_kwargs({**req, "enforce_eager": True})


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch, tiny_packed):
    import stages.bench.vllm_backend as vb

    monkeypatch.setattr(vb, "vllm_available", lambda: False)
    with pytest.raises(InputError, match="pip install vllm==0.26.0.*bench.backend=torch"):
        VLLMBackend().run(BenchTarget(str(tiny_packed[1]), "quantized"), SMALL, BenchOptions("cuda:0", "bfloat16"))


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: this checks the failure path without it")
def test_vllm_worker_reports_failures_through_the_result_file(tmp_path, tiny_packed):
    req = build_request(BenchTarget(str(tiny_packed[1]), "quantized"), SMALL, BenchOptions("cuda:0", "bfloat16"))
    res = run_worker(req, 120, tmp_path / "vllm.log")
    assert res["ok"] is False and "No module named 'vllm'" in res["error"] and res["log"].endswith("vllm.log")


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here (pip install vllm==0.26.0 on the GPU machine)")
def test_vllm_requests_and_outputs_with_real_vllm_types():
    from vllm import SamplingParams
    from vllm.outputs import CompletionOutput, RequestOutput

    from stages.bench.vllm_worker import build_requests, parse_outputs

    reqs, params = build_requests([[5, 6, 7], [8, 9, 10]], 4, seed=0)
    assert isinstance(params, SamplingParams) and params.max_tokens == 4 and params.ignore_eos
    assert params.temperature == 0.0 and [r["prompt_token_ids"] for r in reqs] == [[5, 6, 7], [8, 9, 10]]
    outs = [RequestOutput(request_id=str(i), prompt=None, prompt_token_ids=r["prompt_token_ids"], prompt_logprobs=None,
                          outputs=[CompletionOutput(0, "", [1, 2, 3, 4], 0.0, None)], finished=True)
            for i, r in enumerate(reqs)]
    assert parse_outputs(outs, 4) == [[1, 2, 3, 4]] * 2
    with pytest.raises(RuntimeError, match="produced 4 tokens, expected 5"):
        parse_outputs(outs, 5)


def test_output_parsing_counts_tokens():
    from stages.bench.vllm_worker import parse_outputs

    outs = [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1, 2, 3])])]
    assert parse_outputs(outs, 3) == [[1, 2, 3]]
    with pytest.raises(RuntimeError, match="expected 4"):
        parse_outputs(outs, 4)


# -- CUDA (run with -m gpu on the GPU machine; needs no hub, hydra or GGUF package) ---------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_and_compile_give_the_eager_tokens(tmp_path):
    from stages.formats.qlinear import load_quantized_model

    src = tmp_path / "model"
    _tiny_hf("llama").save_pretrained(src)
    w4 = pack_checkpoint(str(src), tmp_path / "w4", 4, 32, True)
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(2)).cuda()
    outs = []
    for fast in (False, True):
        model = load_quantized_model(w4, "cuda", torch.bfloat16)
        spec, sources = decoder_from_hf(model, torch.bfloat16, 16)
        linears, _ = build_kernel_linears(sources, "auto", torch.bfloat16, [2])
        engine = DecodeEngine(spec, linears, 2, 16, compile_glue=fast, cuda_graphs=fast)
        outs.append(engine.generate(ids, 8)[0])
    assert torch.equal(outs[0], outs[1])
