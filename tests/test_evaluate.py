"""Evaluate stage: local lm-eval tasks end to end, task data, metrics, caching and bad input."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from core.errors import ConfigError, InputError
from stages.eval import taskdata
from stages.eval.harness import EvalTarget, check_tokenizer_files, lm_eval_limit
from stages.eval.perplexity import perplexity, tokenize_text
from stages.eval.results import (deltas_vs_baseline, flatten_lm_eval, paired_ppl_ratio, perplexity_metrics,
                                 short_summary, summary_table)
from stages.eval.tasks import TASKS_DIR, check_task_names, local_task_names

LOCAL_TASKS = ["persuasion_ppl", "persuasion_lastword", "persuasion_nextsent"]
DATA_DIR = TASKS_DIR / "data"


def _records(task: str, n: int) -> list[dict]:
    with open(DATA_DIR / f"{task}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def _eval_cfg(compose, tasks, limit, **perplexity):
    cfg, _ = compose(["model=tiny_random", f"eval.tasks=[{','.join(tasks)}]", f"eval.limit={limit}",
                      "eval.batch_size=4"] + [f"eval.perplexity.{k}={v}" for k, v in perplexity.items()])
    return cfg.eval


@pytest.fixture(scope="module")
def tiny(tiny_store):
    from conftest import compose_config
    from core.models import load_model, load_tokenizer
    from pipeline.models import prepare_model
    from core.store import ArtifactStore

    cfg, _ = compose_config(["model=tiny_random"])
    handle = prepare_model(cfg.model, ArtifactStore(tiny_store), log=lambda m: None)
    return load_model(handle, torch.float32, "cpu"), load_tokenizer(handle), handle


def _target(model, tokenizer, path="tiny") -> EvalTarget:
    return EvalTarget(path, lambda: model, lambda: tokenizer, "cpu", "float32")


# -- task data ------------------------------------------------------------------------------
def test_shipped_task_data_is_rebuilt_identically(tmp_path):
    """scripts/build_eval_tasks.py is deterministic and the shipped files are current."""
    text = taskdata.read_heldout_text()
    counts = taskdata.write_task_data(taskdata.build_all(text), text, tmp_path)
    for name in counts:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DATA_DIR / f"{name}.jsonl").read_bytes(), name
    assert json.loads((DATA_DIR / "SOURCE.json").read_text())["sha256"] == taskdata.text_sha256(text)
    assert set(counts) == set(LOCAL_TASKS) == set(local_task_names())


def test_task_records_are_well_formed():
    text = taskdata.read_heldout_text()
    chapters = taskdata.split_chapters(text)
    assert len(chapters) == 24 and chapters[0].paragraphs[0].startswith("Sir Walter Elliot")
    assert chapters[-1].paragraphs[-1].endswith("national importance.")
    for rec in _records("persuasion_nextsent", 50):
        true = rec["choices"][rec["label"]]
        assert len(rec["choices"]) == 4 and len(set(rec["choices"])) == 4
        paragraph = chapters[rec["chapter"] - 1].paragraphs[rec["paragraph"]]
        assert rec["context"] + " " + true in paragraph  # context is immediately followed by the truth
        assert all(c not in paragraph for c in rec["choices"] if c != true)
    for rec in _records("persuasion_lastword", 50):
        assert rec["target"].isalpha() and rec["target"].lower() in rec["context"].lower()
        assert (rec["context"] + " " + rec["target"]).split("\n\n")[-1] in chapters[rec["chapter"] - 1].paragraphs[
            rec["paragraph"]]
    ppl_text = " ".join(r["text"] for r in _records("persuasion_ppl", 1000))
    assert len(ppl_text) >= 0.95 * sum(len(p) for c in chapters for p in c.paragraphs)  # the whole novel


def test_split_sentences_keeps_titles_and_quotes():
    got = taskdata.split_sentences('Mr. Elliot came. "Did he?" said Anne. She smiled at F. W. Wentworth.')
    assert got == ["Mr. Elliot came.", '"Did he?" said Anne.', "She smiled at F. W. Wentworth."]


# -- lm-eval end to end on the tiny model ------------------------------------------------------
@pytest.fixture(scope="module")
def local_run(tiny):
    from conftest import compose_config
    from stages.evaluate import evaluate

    model, tokenizer, _ = tiny
    cfg, _ = compose_config(["model=tiny_random", "eval=local", "eval.limit=3", "eval.batch_size=4",
                             "eval.perplexity.seqlen=64", "eval.perplexity.stride=32",
                             "eval.perplexity.max_windows=3"])
    text = taskdata.read_heldout_text()[:20000]
    return evaluate(_target(model, tokenizer), cfg.eval, text), cfg.eval


def test_local_tasks_end_to_end_keys(local_run):
    outcome, _ = local_run
    m = outcome.metrics
    for key in ["persuasion_ppl.word_perplexity", "persuasion_ppl.byte_perplexity", "persuasion_ppl.bits_per_byte",
                "persuasion_lastword.perplexity", "persuasion_lastword.acc", "persuasion_nextsent.acc",
                "persuasion_nextsent.acc_norm", "ppl", "ppl.nll", "ppl.tokens", "ppl.windows"]:
        assert key in m and math.isfinite(m[key]), key
    for task in LOCAL_TASKS:
        assert m[f"{task}.samples"] == 3
    assert 0 <= m["persuasion_nextsent.acc"] <= 1 and m["ppl.windows"] == 3
    # nearly uniform random model: perplexity close to the vocabulary size
    assert 0.5 * 49152 < m["ppl"] < 2 * 49152
    assert set(outcome.lm_eval_results["results"]) == set(LOCAL_TASKS)


def test_lm_eval_bits_per_byte_matches_perplexity_core(local_run, tiny):
    """lm-eval's rolling loglikelihood of each passage == our core over [BOS] + passage."""
    outcome, _ = local_run
    model, tokenizer, _ = tiny
    nll, n_bytes, words = 0.0, 0, 0
    for rec in _records("persuasion_ppl", 3):
        ids = tokenize_text(tokenizer, rec["text"], add_bos=True)
        nll += perplexity(model, ids, seqlen=len(ids), stride=len(ids))["nll_sum"]
        n_bytes += len(rec["text"].encode("utf-8"))
        words += len(rec["text"].split())
    m = outcome.metrics
    assert m["persuasion_ppl.bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)
    assert m["persuasion_ppl.word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-3)


class OracleLM:
    """Builds a model that knows every (context + true next sentence) of the multiple-choice task."""

    ORDER = 3

    @classmethod
    def build(cls, tokenizer, records):
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.modeling_outputs import CausalLMOutputWithPast

        table: dict[tuple, int] = {}
        for rec in records:
            ids = tokenizer(rec["context"] + " " + rec["choices"][rec["label"]], add_special_tokens=False)["input_ids"]
            for t in range(len(ids) - 1):
                table[tuple(ids[max(0, t - cls.ORDER + 1):t + 1])] = ids[t + 1]

        class Oracle(LlamaForCausalLM):
            def forward(self, input_ids=None, **kwargs):
                rows = input_ids.tolist()
                logits = torch.zeros(len(rows), len(rows[0]), self.config.vocab_size)
                for b, row in enumerate(rows):
                    for t in range(len(row)):
                        nxt = table.get(tuple(row[max(0, t - cls.ORDER + 1):t + 1]))
                        if nxt is not None:
                            logits[b, t, nxt] = 30.0
                return CausalLMOutputWithPast(logits=logits)

        config = LlamaConfig(vocab_size=49152, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=1, num_key_value_heads=1, bos_token_id=1, eos_token_id=2)
        return Oracle(config).eval()


def test_perfect_knowledge_model_beats_random_on_multiple_choice(tiny, compose):
    from stages.evaluate import evaluate

    model, tokenizer, _ = tiny
    cfg = _eval_cfg(compose, ["persuasion_nextsent"], 8, enabled="false")
    oracle = OracleLM.build(tokenizer, _records("persuasion_nextsent", 8))
    knows = evaluate(_target(oracle, tokenizer), cfg, None).metrics
    guesses = evaluate(_target(model, tokenizer), cfg, None).metrics
    assert knows["persuasion_nextsent.acc"] == 1.0 and knows["persuasion_nextsent.acc_norm"] == 1.0
    assert guesses["persuasion_nextsent.acc"] < knows["persuasion_nextsent.acc"]
    assert "ppl" not in knows  # perplexity evaluator disabled


# -- metrics ----------------------------------------------------------------------------------
RAW = {"results": {"t1": {"alias": "t1", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75},
                   "t2": {"bits_per_byte,none": 1.25, "bits_per_byte_stderr,none": "N/A",
                          "exact_match,strict-match": 0.125}},
       "n-samples": {"t1": {"original": 10, "effective": 4}, "t2": {"original": 3, "effective": 3}}}


def test_flatten_lm_eval_results():
    assert flatten_lm_eval(RAW) == {"t1.acc": 0.5, "t1.acc_stderr": 0.1, "t1.acc_norm": 0.75, "t1.samples": 4.0,
                                    "t2.bits_per_byte": 1.25, "t2.exact_match.strict-match": 0.125,
                                    "t2.samples": 3.0}


def test_deltas_and_summary_table():
    metrics = {"ppl": 12.0, "ppl.nll": 2.5, "ppl.stderr": 0.5, **flatten_lm_eval(RAW)}
    baseline = {"ppl": 10.0, "ppl.stderr": 0.25, "t1.acc": 0.625, "t1.acc_stderr": 0.125, "t2.bits_per_byte": 1.0}
    deltas = deltas_vs_baseline(metrics, baseline)
    assert deltas == {"ppl.delta_vs_baseline": 2.0, "t1.delta_vs_baseline": -0.125, "t2.delta_vs_baseline": 0.25}
    table = summary_table({**metrics, **deltas}, baseline)
    assert table.splitlines()[0].split("|")[1:-1] == [" task ", " metric        ", " value     ", " baseline     ",
                                                      " delta  "]
    assert "| t1   | acc           | 0.5 ± 0.1 | 0.625 ± 0.12 | -0.125 |" in table
    assert "| ppl  | ppl           | 12 ± 0.5  | 10 ± 0.25    | 2      |" in table
    assert "| t2   | bits_per_byte | 1.25      | 1            | 0.25   |" in table  # lm-eval gave no stderr ("N/A")
    assert short_summary({**metrics, **deltas}) == {"ppl": "12 ± 0.5", "ppl.delta": "2", "t1.acc": "0.5 ± 0.1",
                                                    "t1.delta": "-0.125", "t2.bits_per_byte": "1.25", "t2.delta": "0.25"}


def test_perplexity_metrics_carry_the_windows_standard_error():
    out = {"ppl": 20.0, "nll": 3.0, "tokens": 90, "windows": 3, "nll_stderr": 0.05}
    assert perplexity_metrics(out) == {"ppl": 20.0, "ppl.nll": 3.0, "ppl.tokens": 90.0, "ppl.windows": 3.0,
                                       "ppl.nll_stderr": 0.05, "ppl.stderr": pytest.approx(1.0)}
    assert "ppl.stderr" not in perplexity_metrics({**out, "windows": 1, "nll_stderr": None})


def test_paired_perplexity_ratio_over_the_same_windows():
    base = {"window_nll_sum": [30.0, 20.0, 25.0], "window_tokens": [10, 10, 10]}
    quant = {"window_nll_sum": [31.0, 22.0, 26.5], "window_tokens": [10, 10, 10]}
    got = paired_ppl_ratio(quant, base)
    diffs = [0.1, 0.2, 0.15]  # per-token NLL difference of each window
    assert got["ppl.ratio_vs_baseline"] == pytest.approx(math.exp(0.15), rel=1e-12)
    assert got["ppl.ratio_vs_baseline_stderr"] == pytest.approx(
        math.exp(0.15) * statistics.stdev(diffs) / math.sqrt(3), rel=1e-9)
    # different windows (or a baseline without per-window numbers): no paired ratio
    assert paired_ppl_ratio(quant, {**base, "window_tokens": [10, 10, 9]}) == {}
    assert paired_ppl_ratio(quant, {"ppl": 3.0}) == {}
    table = summary_table({"ppl": 12.0, **got}, {"ppl": 10.0})
    assert "| ppl  | ratio_vs_baseline | 1.162 ± 0.034 | -        | -     |" in table
    assert short_summary({"ppl": 12.0, **got})["ppl/baseline"] == "1.162 ± 0.034"


def test_limit_conversion():
    assert lm_eval_limit(None) is None and lm_eval_limit(0.25) == 0.25
    assert lm_eval_limit(50.0) == 50 and isinstance(lm_eval_limit(50.0), int)


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.slow  # builds lm-eval's whole task index (about 20 s): -m slow keeps the default suite under 10 minutes
def test_unknown_task_lists_close_matches():
    with pytest.raises(ConfigError, match=r"eval.tasks=persuasion_nextsentence is not a known task.*"
                                          r"did you mean persuasion_nextsent"):
        check_task_names(["persuasion_nextsentence"], "local", offline=True)


def test_hub_task_offline_says_it_needs_network():
    with pytest.raises(ConfigError, match=r"needs network.*run.offline=false.*eval=local"):
        check_task_names(["persuasion_ppl", "winogrande"], "hub", offline=True)
    with pytest.raises(ConfigError, match=r"eval.task_source=local does not include hub tasks"):
        check_task_names(["winogrande"], "local", offline=False)
    check_task_names(["winogrande", "persuasion_ppl"], "hub", offline=False)  # allowed online


@pytest.mark.parametrize("preset", ["paper", "wikitext"])
def test_hub_presets_compose_and_refuse_offline(compose, preset):
    from pipeline.dag import SPECS
    from pipeline.validate import validate_config
    from stages.evaluate import preflight

    cfg, _ = compose(["model=tiny_random", f"eval={preset}"])
    validate_config(cfg)
    assert cfg.eval.task_source == "hub" and cfg.eval.num_fewshot == 0
    with pytest.raises(ConfigError, match=r"needs network.*eval=local"):
        preflight(cfg, None, SPECS["baseline_evaluate"])


def test_hub_dataset_text_offline_needs_network(compose):
    from stages.eval.texts import check_text_source

    cfg, _ = compose(["eval=wikitext"])
    with pytest.raises(ConfigError, match=r"eval.perplexity.text=Salesforce/wikitext needs network.*eval=local"):
        check_text_source(cfg.eval.perplexity, offline=True)


def test_model_folder_without_tokenizer(tmp_path, compose):
    from pipeline.dag import SPECS
    from core.models import ModelHandle
    from stages.evaluate import preflight

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"has no tokenizer.*save_pretrained"):
        check_tokenizer_files(tmp_path, "model folder")
    cfg, _ = compose(["model=tiny_random"])
    handle = ModelHandle("x", str(tmp_path), None, "fp")
    with pytest.raises(InputError, match=str(tmp_path)):
        preflight(cfg, handle, SPECS["baseline_evaluate"])


def test_vllm_backend_without_vllm(compose, monkeypatch):
    import importlib.util

    from stages.eval.harness import check_vllm_available

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"eval.backend=vllm is not available.*eval.backend=hf"):
        check_vllm_available("cuda:0")


def test_nothing_to_evaluate(compose):
    from pipeline.dag import SPECS
    from stages.evaluate import preflight

    cfg, _ = compose(["model=tiny_random", "eval.tasks=[]", "eval.perplexity.enabled=false"])
    with pytest.raises(ConfigError, match="leaves nothing to evaluate"):
        preflight(cfg, None, SPECS["baseline_evaluate"])


@pytest.mark.parametrize("override,match", [("eval.limit=2.5", "whole number"), ("eval.limit=0", "fraction"),
                                            ("eval.task_source=web", "choose from local, hub"),
                                            ("eval.num_fewshot=-1", "integer >= 0")])
def test_eval_field_rules(compose, override, match):
    from pipeline.validate import validate_config

    cfg, _ = compose([override])
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


# -- the stage in the pipeline ---------------------------------------------------------------
def _runner(overrides, compose):
    from pipeline.runner import PipelineRunner
    from pipeline.runtime import setup_runtime

    cfg, _ = compose(overrides)
    return PipelineRunner(cfg, setup_runtime(cfg, lambda m: None))


STAGE_EVAL = ["eval.limit=2", "eval.batch_size=4", "eval.perplexity.seqlen=32", "eval.perplexity.max_windows=2",
              "eval.perplexity.stride=32"]


def test_baseline_is_cached_on_second_run(tiny_overrides, compose):
    overrides = tiny_overrides + ["eval=local"] + STAGE_EVAL + ["run.stages=[baseline_evaluate]"]
    first = _runner(overrides, compose).run()
    assert [(o.name, o.status) for o in first] == [("baseline_evaluate", "ran")]
    folder = first[0].path
    saved = json.loads((folder / "metrics.json").read_text())
    raw = json.loads((folder / "lm_eval_results.json").read_text())
    assert set(raw["results"]) == set(LOCAL_TASKS)
    assert saved["metrics"]["persuasion_nextsent.samples"] == 2 and saved["variant"] == "baseline"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["ppl"] == saved["metrics"]["ppl"]
    assert "| persuasion_nextsent | acc" in (folder / "summary.md").read_text()
    second = _runner(overrides, compose).run()
    assert [(o.name, o.status) for o in second] == [("baseline_evaluate", "cached")]
    assert second[0].metrics["ppl"] == saved["metrics"]["ppl"]


def test_packed_checkpoint_is_scored_with_deltas(tiny_overrides, compose):
    """calibrate -> quantize (RTN) -> pack -> evaluate scores the checkpoint loaded back from disk."""
    from transformers import AutoTokenizer

    from stages.evaluate import densify_quant_linears
    from stages.formats.artifact import checkpoint_dir
    from stages.formats.qlinear import iter_quant_linears, load_quantized_model

    overrides = tiny_overrides + STAGE_EVAL + ["quant=rtn", "eval.tasks=[persuasion_lastword]",
                                               "run.stages=[calibrate,quantize,pack,baseline_evaluate,evaluate]"]
    out = {o.name: o for o in _runner(overrides, compose).run()}
    ev, base = out["evaluate"].metrics, out["baseline_evaluate"].metrics
    folder = checkpoint_dir(out["pack"].path)
    model = load_quantized_model(folder, "cpu", torch.float32)
    ids = tokenize_text(AutoTokenizer.from_pretrained(folder), taskdata.read_heldout_text())
    # the stage scores dense dequantized weights (eval.dense_weights): the same numbers as the packed modules
    assert ev["ppl"] == perplexity(model, ids, 32, 32, batch_size=4, max_windows=2)["ppl"]
    assert ev["ppl"] != base["ppl"]  # 4-bit weights, not the baseline's
    dense = load_quantized_model(folder, "cpu", torch.float32)
    assert densify_quant_linears(dense, torch.float32) == 4 * 2 + 3 * 2  # q,k,v,o + gate,up,down per block
    assert not list(iter_quant_linears(dense))
    with torch.no_grad():
        assert torch.equal(dense(ids[None, :40]).logits, model(ids[None, :40]).logits)
    assert ev["ppl.delta_vs_baseline"] == pytest.approx(ev["ppl"] - base["ppl"])
    # paired over the same 2 windows: the ratio of the perplexities, with a standard error from the windows
    assert ev["ppl.ratio_vs_baseline"] == pytest.approx(ev["ppl"] / base["ppl"], rel=1e-9)
    assert ev["ppl.ratio_vs_baseline_stderr"] > 0 and base["ppl.stderr"] > 0
    assert out["evaluate"].summary["ppl/baseline"].startswith(f"{ev['ppl.ratio_vs_baseline']:.4g} ± ")
    assert ev["persuasion_lastword.delta_vs_baseline"] == pytest.approx(
        ev["persuasion_lastword.acc"] - base["persuasion_lastword.acc"])
    files = sorted(p.name for p in out["evaluate"].path.iterdir())
    assert {"lm_eval_results.json", "metrics.json", "summary.md"} <= set(files)
    assert "| ppl " in (out["evaluate"].path / "summary.md").read_text()
