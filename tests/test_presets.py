"""Every preset in conf/experiment/ composes, validates, and calibrates offline on the tiny model, or says
precisely which override makes it work."""

from __future__ import annotations

import re

import pytest

from core.errors import ConfigError, InputError
from pipeline.overrides import group_options
from pipeline.validate import validate_config

from conftest import CONF_DIR

EXPERIMENTS = group_options(CONF_DIR, "experiment")
# Presets that calibrate from the hub: offline they must name both ways out, then work with the offline one.
HUB_CALIBRATED = {"llama3_w2_g64": (512, 512), "llama3_w4_g128": (128, 512),
                  "compare_reference_table_llama3": (128, 512)}
OFFLINE_CALIB = ["calib=austen", "calib.mode=random_window"]
# Calibrating a preset takes seconds; the default suite calibrates one of each kind (every preset's sweep
# cells compose in test_config), the rest run with -m slow.
DEFAULT_CALIBRATED = {"quickstart", "smollm2_w2_g64", "llama3_w2_g64"}


def _param(experiment: str):
    return pytest.param(experiment, marks=() if experiment in DEFAULT_CALIBRATED else pytest.mark.slow)


def _calibrate(compose, experiment: str, tiny_outputs, extra=()):
    from pipeline.runner import PipelineRunner
    from pipeline.runtime import Runtime

    cfg, _ = compose([f"+experiment={experiment}", "model=tiny_random", f"run.outputs_dir={tiny_outputs}",
                      "tracking.enabled=false", "run.progress=false", "run.device=cpu", "run.offline=true",
                      "run.stages=[calibrate]", *extra])
    validate_config(cfg)
    outcomes = PipelineRunner(cfg, Runtime("cpu", "float32", log=lambda m: None)).run()
    return cfg, outcomes


def test_the_presets_are_all_checked():
    assert {"quickstart", "llama3_w2_g64", "llama3_w4_g128"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", [_param(e) for e in EXPERIMENTS if e not in HUB_CALIBRATED])
def test_offline_preset_calibrates_as_written(compose, tiny_outputs, experiment):
    cfg, outcomes = _calibrate(compose, experiment, tiny_outputs)
    [calib] = outcomes
    assert calib.status == "ran"
    assert (calib.metrics["nsamples"], calib.metrics["seqlen"]) == (cfg.calib.nsamples, cfg.calib.seqlen)


@pytest.mark.parametrize("experiment", [_param(e) for e in sorted(HUB_CALIBRATED)])
def test_hub_calibrated_preset_names_the_offline_override_and_then_calibrates(compose, tiny_outputs, experiment):
    cfg, _ = compose([f"+experiment={experiment}"])
    assert (cfg.calib.source, cfg.calib.dataset, cfg.run.offline) == ("hub", "NeelNanda/pile-10k", False)
    assert (cfg.pack.format, cfg.quant.sym) == ("auto", False)  # asym: packed exactly, never GPTQ v1
    with pytest.raises((InputError, ConfigError)) as err:
        _calibrate(compose, experiment, tiny_outputs)
    msg = str(err.value)
    assert "calib.dataset=NeelNanda/pile-10k" in msg and "run.offline=false" in msg
    assert re.search(r"calib=austen calib.mode=random_window", msg), msg
    cfg, [calib] = _calibrate(compose, experiment, tiny_outputs, OFFLINE_CALIB)
    assert calib.status == "ran"
    assert (calib.metrics["nsamples"], calib.metrics["seqlen"]) == HUB_CALIBRATED[experiment]


def test_doc_prefix_that_the_corpus_cannot_fill_names_random_window(compose, tiny_outputs):
    """512 x 512 from the bundled novels in doc_prefix mode is more than they hold: the error says what works."""
    with pytest.raises(ConfigError, match=r"calib.nsamples=512 is more than the corpus can give .*"
                                          r"calib.mode=random_window"):
        _calibrate(compose, "llama3_w2_g64", tiny_outputs, ["calib=austen"])


@pytest.mark.parametrize("quant,compile_", [("autoround", "auto"), ("autoround_best", "auto"), ("autoround_cpu", "auto")])
def test_compile_defaults_to_auto(compose, quant, compile_):
    from core.schema import switch_enabled

    cfg, _ = compose([f"quant={quant}"])
    assert cfg.quant.compile == compile_
    assert switch_enabled(cfg.quant.compile, "cuda:0") and not switch_enabled(cfg.quant.compile, "cpu")
    with pytest.raises(ConfigError, match=r"quant.compile=maybe is not supported \(choose from auto, on, off\)"):
        validate_config(compose([f"quant={quant}", "quant.compile=maybe"])[0])
