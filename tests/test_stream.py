"""Streaming quantization: blocks from safetensors shards equal the in-memory path bit for bit; the seeded
random model source; the qstate merge; bad model folders fail before any work; peak host memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import InputError
from core.schema import ModelConfig, QuantScheme, RandomModelConfig, quant_config
from stages.quant.job import QuantizeJob, run_job
from stages.quant.qstate import load_qstate
from _quant_helpers import one_thread  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
SMALL = RandomModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, seed=3)


def write_model(folder: Path, dims: RandomModelConfig = SMALL, dtype: torch.dtype = torch.float32,
                shard_bytes: int = 10**9) -> Path:
    from pipeline.random_model import write_random_model

    folder.mkdir(parents=True, exist_ok=True)
    write_random_model(ModelConfig(source="random", random=dims), folder, dtype, shard_bytes)
    return folder


def write_calib(folder: Path, n: int = 8, seqlen: int = 32, vocab: int = 256) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(5), dtype=torch.int32)
    save_file({"input_ids": ids}, str(folder / "calib.safetensors"))
    return folder


def make_job(work: Path, model: Path, calib: Path, q: QuantScheme, dtype: str = "float32") -> QuantizeJob:
    work.mkdir(parents=True, exist_ok=True)
    return QuantizeJob(str(work), str(model), None, False, str(calib), "cpu", dtype, asdict(q), 0, False, False)


CASES = {
    "rtn_head": (quant_config(method="rtn", bits=3, group_size=32, sym=False, quantize_lm_head=True), "float32"),
    "gptq_act_order": (quant_config(method="gptq", bits=3, group_size=32, sym=False, act_order=True, batch_size=4),
                       "float32"),
    "autoround": (quant_config(method="autoround", bits=2, group_size=32, sym=False, iters=6, batch_size=4),
                  "float32"),
    "autoround_bf16": (quant_config(method="autoround", bits=4, group_size=32, iters=4, batch_size=4), "bfloat16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_stage_equals_the_in_memory_core_bit_for_bit(tmp_path, case, one_thread):
    from transformers import AutoModelForCausalLM

    from stages.quant.driver import quantize_model

    q, dtype = CASES[case]
    model, calib = write_model(tmp_path / "model", shard_bytes=100_000), write_calib(tmp_path / "calib")
    assert len(list(model.glob("model-*.safetensors"))) > 3  # really sharded
    metrics = run_job(make_job(tmp_path / "work", model, calib, q, dtype), log=lambda m: None)
    resident = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    ids = load_file(str(calib / "calib.safetensors"))["input_ids"]
    ref = quantize_model(resident, ids, q, "cpu", seed=0)
    layers, meta = load_qstate(tmp_path / "work")
    assert set(layers) == set(ref.layers) and len(layers) == 21 + (case == "rtn_head")
    for name, layer in layers.items():
        expected = ref.layers[name]
        assert torch.equal(layer.codes, expected.codes.to(torch.uint8)), name
        assert torch.equal(layer.scale, expected.scale.half().float()), name
        assert torch.equal(layer.zero, expected.zero.float()), name
        assert (layer.g_idx is None) == (expected.g_idx is None)
    assert meta["num_blocks"] == 3 and meta["method"] == q.method and metrics["num_layers"] == len(layers)
    blocks = json.loads((tmp_path / "work" / "block_metrics.json").read_text())
    assert [b.get("mse") for b in blocks] == [b.get("mse") for b in ref.block_metrics]
    assert not (tmp_path / "work" / "blocks").exists()


def test_random_tensors_are_drawn_per_name_in_any_order_and_written_shard_by_shard(tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.random_model import RandomTensors, llama_config

    tensors = RandomTensors(llama_config(SMALL, torch.bfloat16), SMALL.seed, torch.bfloat16)
    names = tensors.names()
    forward = {n: tensors.load(n) for n in names}
    backward = {n: tensors.load(n) for n in reversed(names)}
    assert all(torch.equal(forward[n], backward[n]) for n in names)
    q = forward["model.layers.1.self_attn.q_proj.weight"]
    assert q.dtype == torch.bfloat16 and abs(float(q.float().std()) - 0.02) < 0.002
    assert not torch.equal(q, forward["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(forward["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    other = RandomTensors(llama_config(replace(SMALL, seed=4), torch.bfloat16), 4, torch.bfloat16)
    assert not torch.equal(other.load("model.embed_tokens.weight"), forward["model.embed_tokens.weight"])
    folder = write_model(tmp_path / "m", dtype=torch.bfloat16, shard_bytes=40_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 3 and set(index) == set(names)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    state = loaded.state_dict()
    assert all(torch.equal(state[n], forward[n]) for n in names)


def test_concat_safetensors_reads_back_like_one_save_file(tmp_path):
    from safetensors import safe_open

    from stages.quant.qstate import concat_safetensors

    gen = torch.Generator().manual_seed(0)
    parts, expected = [], {}
    for i, dtypes in enumerate([(torch.uint8, torch.float16), (torch.int32,), (torch.float32, torch.uint8)]):
        tensors = {f"t{j}": (torch.randn(3 + i, 5 + j, generator=gen) * 10).to(dt) for j, dt in enumerate(dtypes)}
        save_file(tensors, str(tmp_path / f"p{i}.safetensors"), metadata={"ignored": "yes"})
        parts.append((tmp_path / f"p{i}.safetensors", f"b.{i}."))
        expected.update({f"b.{i}.{k}": v for k, v in tensors.items()})
    out = tmp_path / "all.safetensors"
    concat_safetensors(parts, out)
    got = load_file(str(out))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    size = int.from_bytes(out.read_bytes()[:8], "little")
    assert (8 + size) % 8 == 0
    with safe_open(str(out), framework="pt") as f:
        assert list(f.get_slice("b.1.t0").get_shape()) == [4, 5]


def test_missing_or_mismatched_shards_fail_before_any_stage_runs(tmp_path, compose, tiny_store):
    import shutil

    from pipeline.runner import PipelineRunner
    from pipeline.runtime import Runtime

    folder = write_model(tmp_path / "m", shard_bytes=200_000)
    tiny = next((tiny_store / "model").glob("[!.]*"))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the calibrate stage's preflight reads them
        shutil.copy(tiny / name, folder / name)
    shards = sorted(folder.glob("model-*.safetensors"))
    overrides = ["model=hf_local", f"model.name_or_path={folder}", f"run.outputs_dir={tmp_path / 'out'}",
                 "tracking.enabled=false", "run.device=cpu", "quant=rtn", "quant.group_size=32", "calib.seqlen=32",
                 "run.stages=[calibrate,quantize]"]
    cfg, _ = compose(overrides)
    runner = PipelineRunner(cfg, Runtime("cpu", "float32", log=lambda m: None))
    moved = shards[2].rename(tmp_path / shards[2].name)
    with pytest.raises(InputError, match=f"missing 1 of the {len(shards)} shards .*: {shards[2].name}"):
        runner.check(runner.plan())
    tensors = load_file(str(moved))
    key = next(iter(tensors))
    save_file({**tensors, key: torch.zeros(7, 3)}, str(shards[2]))
    with pytest.raises(InputError, match=rf"do not match its config.json \(1 tensors\): {key} in {shards[2].name} "
                                         rf"is \[7, 3\], the config needs \[{', '.join(map(str, tensors[key].shape))}\]"):
        runner.check(runner.plan())
    assert not (tmp_path / "out" / "store" / "calibrate").exists()


SLACK = 48 * 2**20  # allocator noise between two runs of the same per-block work (measured: up to ~25 MB)
THIN = RandomModelConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, vocab_size=256, max_position_embeddings=128, seed=0)


@pytest.mark.slow
def test_peak_host_memory_is_one_blocks_worth_for_a_model_several_times_larger(tmp_path):
    """In a fresh process: the budget is the peak RSS increment of quantizing a 2-block model (RTN), plus
    slack; a 256-block model of the same width, whose bf16 weights are over 4x that budget, is quantized
    within it. The calibrated path likewise: AutoRound on 12 blocks stays within its 2-block peak + slack."""
    calib = write_calib(tmp_path / "calib", n=4, seqlen=64)
    models = {n: write_model(tmp_path / f"m{n}", replace(THIN, num_hidden_layers=n), torch.bfloat16, 64 * 2**20)
              for n in (2, 12, 256)}
    rtn = quant_config(method="rtn", bits=4, group_size=128)
    ar = quant_config(method="autoround", bits=4, group_size=128, iters=2, batch_size=4)
    jobs = [make_job(tmp_path / f"w{i}", models[n], calib, q)
            for i, (n, q) in enumerate([(2, rtn), (256, rtn), (2, ar), (12, ar)])]
    out = subprocess.run([sys.executable, str(REPO / "tests" / "_rss_probe.py"), json.dumps([asdict(j) for j in jobs])],
                         capture_output=True, text=True, timeout=900, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    before, (rtn2, rtn256, ar2, ar12) = probe["before"], probe["peaks"]
    budget = rtn2 - before + SLACK
    size256 = sum(p.stat().st_size for p in models[256].glob("*.safetensors"))
    assert size256 > 4 * budget, (size256, budget)  # about 1.4 GB of bf16 weights
    assert rtn256 - before < budget, probe
    assert ar12 - before < ar2 - before + SLACK, probe
    for i, n in enumerate((2, 256, 2, 12)):
        assert load_qstate(tmp_path / f"w{i}")[1]["num_blocks"] == n


def test_a_tied_lm_head_is_expected_once_as_the_embedding():
    from transformers import LlamaConfig

    from stages.quant.stream import checkpoint_tensors, meta_skeleton

    dims = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    tied = checkpoint_tensors(meta_skeleton(LlamaConfig(**dims, tie_word_embeddings=True)))
    untied = checkpoint_tensors(meta_skeleton(LlamaConfig(**dims, tie_word_embeddings=False)))
    assert "model.embed_tokens.weight" in tied and "lm_head.weight" not in tied
    assert set(untied) - set(tied) == {"lm_head.weight"}
