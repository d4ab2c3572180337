"""DAG declaration, ordering, fingerprints and the runner's caching / refusal behaviour."""

from __future__ import annotations

import pytest

from pipeline import dag
from core.context import StageResult
from pipeline.dag import StageSpec
from core.errors import InputError
from pipeline.runner import PipelineRunner
from pipeline.runtime import Runtime


def test_topological_order_respects_dependencies():
    order = [s.name for s in dag.DAG.topological_order()]
    assert order == ["calibrate", "quantize", "recover", "pack", "baseline_evaluate", "evaluate", "baseline_benchmark",
                     "benchmark", "report"]
    for spec in dag.STAGES:
        for dep in spec.needs + spec.optional_needs:
            assert order.index(dep) < order.index(spec.name)


def test_cycle_is_rejected():
    a = StageSpec("a", "x:run", needs=("b",))
    b = StageSpec("b", "x:run", needs=("a",))
    with pytest.raises(ValueError, match="cycle"):
        dag.Graph((a, b)).topological_order()


def test_select_subset_keeps_order():
    assert [s.name for s in dag.DAG.select(["pack", "calibrate"])] == ["calibrate", "pack"]
    assert [s.name for s in dag.DAG.select([])] == list(dag.STAGE_NAMES)


def test_upstream_and_downstream():
    assert dag.DAG.upstream("evaluate") == {"pack", "recover", "quantize", "calibrate", "baseline_evaluate"}
    assert dag.DAG.downstream("quantize") == {"recover", "pack", "evaluate", "benchmark", "report"}
    active = set(dag.STAGE_NAMES) - {"recover"}  # recover.mode=none switches the node off
    assert dag.DAG.upstream("evaluate", active) == {"pack", "quantize", "calibrate", "baseline_evaluate"}
    assert dag.DAG.downstream("quantize", active) == {"pack", "evaluate", "benchmark", "report"}


def test_fingerprint_depends_only_on_declared_params(compose):
    spec = dag.SPECS["quantize"]
    base, _ = compose([])
    fp = dag.stage_fingerprint(spec, base, {"calibrate": "c"}, "m", "cpu", "float32")
    same, _ = compose(["eval.batch_size=3", "bench.repeats=9"])  # other groups: no effect
    assert dag.stage_fingerprint(spec, same, {"calibrate": "c"}, "m", "cpu", "float32") == fp
    bits, _ = compose(["quant.bits=2"])
    assert dag.stage_fingerprint(spec, bits, {"calibrate": "c"}, "m", "cpu", "float32") != fp
    assert dag.stage_fingerprint(spec, base, {"calibrate": "other"}, "m", "cpu", "float32") != fp
    assert dag.stage_fingerprint(spec, base, {"calibrate": "c"}, "m", "cuda:0", "bfloat16") != fp
    # the baseline evaluation does not depend on the quantization config at all
    ev = dag.SPECS["baseline_evaluate"]
    assert dag.stage_fingerprint(ev, base, {}, "m", "cpu", "float32") == \
        dag.stage_fingerprint(ev, bits, {}, "m", "cpu", "float32")


# -- runner behaviour with the fake two-stage graph (conftest.fake_dag; the real stages have their own tests) --
from _fake_stages import CALLS  # noqa: E402


def _runner(compose, tmp_path, graph, *overrides):
    cfg, _ = compose([f"run.outputs_dir={tmp_path}", "run.progress=false", *overrides])
    return PipelineRunner(cfg, Runtime("cpu", "float32", log=lambda m: None), graph=graph)


def test_second_run_is_cached_and_force_recomputes_downstream(compose, tmp_path, fake_dag):
    first = _runner(compose, tmp_path, fake_dag).run()
    assert [(o.name, o.status) for o in first] == [("first", "ran"), ("second", "ran")]
    assert (first[1].path / "out.txt").read_text() == "second:first"
    again = _runner(compose, tmp_path, fake_dag).run()
    assert [o.status for o in again] == ["cached", "cached"] and CALLS == ["first", "second"]
    forced = _runner(compose, tmp_path, fake_dag, "run.force=[first]").run()
    assert [o.status for o in forced] == ["ran", "ran"]


def test_crash_resumes_from_last_complete_stage(compose, tmp_path, fake_dag):
    with pytest.raises(RuntimeError, match="crash in second"):
        _runner(compose, tmp_path, fake_dag, "quant.iters=13").run()
    assert CALLS == ["first", "second"]
    CALLS.clear()
    with pytest.raises(RuntimeError):
        _runner(compose, tmp_path, fake_dag, "quant.iters=13").run()
    assert CALLS == ["second"]  # first is cached, second had no manifest


def test_subset_needs_upstream_in_store(compose, tmp_path, fake_dag):
    with pytest.raises(InputError, match=r"stage 'second' needs 'first'.*run.stages=\[first,second"):
        _runner(compose, tmp_path, fake_dag, "run.stages=[second]").run()
    _runner(compose, tmp_path, fake_dag, "run.stages=[first]").run()
    outcomes = _runner(compose, tmp_path, fake_dag, "run.stages=[second]").run()
    assert [(o.name, o.status) for o in outcomes] == [("second", "ran")]


def test_calibrate_fingerprint_follows_the_local_corpus_bytes(compose, tmp_path):
    corpus = tmp_path / "books"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Chapter 1\n\nSome text.\n")
    cfg, _ = compose(["calib=text", f"calib.paths=[{corpus}]"])
    spec = dag.SPECS["calibrate"]
    before = dag.stage_fingerprint(spec, cfg, {}, "m", "cpu", "float32")
    assert dag.stage_fingerprint(spec, cfg, {}, "m", "cpu", "float32") == before
    (corpus / "a.txt").write_text("Chapter 1\n\nOther text, longer.\n")
    assert dag.stage_fingerprint(spec, cfg, {}, "m", "cpu", "float32") != before
