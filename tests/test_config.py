"""Config composition of every group option and experiment, and the validation errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigError
from pipeline.overrides import check_cli_overrides, config_groups, group_options
from core.schema import GROUP_SCHEMAS, QUANT_CONFIGS, PipelineConfig
from pipeline.validate import validate_config

from conftest import CONF_DIR, REPO

GROUP_CASES = [(g, o) for g in GROUP_SCHEMAS for o in group_options(CONF_DIR, g)]
EXPERIMENTS = group_options(CONF_DIR, "experiment")


def test_every_group_has_options():
    for group in GROUP_SCHEMAS:
        assert group_options(CONF_DIR, group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("group,option", GROUP_CASES, ids=[f"{g}={o}" for g, o in GROUP_CASES])
def test_group_option_composes_to_typed_config(compose, group, option):
    cfg, dcfg = compose([f"{group}={option}"])
    assert isinstance(cfg, PipelineConfig)
    assert dcfg.hydra.runtime.choices[group] == option
    assert isinstance(getattr(cfg, group), GROUP_SCHEMAS[group])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(compose, experiment):
    cfg, _ = compose([f"+experiment={experiment}"])
    assert isinstance(cfg, PipelineConfig)


def _sweep_cells() -> list[tuple[str, str]]:
    """(experiment, group=option) for every option an experiment's sweeper lists for a config group."""
    import yaml

    cells = []
    for experiment in EXPERIMENTS:
        data = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text())
        params = ((data.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
        for group, values in params.items():
            if "." not in group:
                cells += [(experiment, f"{group}={v.strip()}") for v in str(values).split(",")]
    return cells


@pytest.mark.parametrize("experiment,choice", _sweep_cells())
def test_every_sweep_cell_of_an_experiment_composes(compose, experiment, choice):
    cfg, dcfg = compose([f"+experiment={experiment}", choice])
    group, _, option = choice.partition("=")
    assert dcfg.hydra.runtime.choices[group] == option
    assert type(cfg.quant) is QUANT_CONFIGS[cfg.quant.method]  # every key the cell sets is one its method has


def test_default_is_the_quickstart_recipe(compose):
    cfg, _ = compose([])
    assert cfg.model.source == "gguf" and cfg.calib.source == "austen"
    assert (cfg.quant.method, cfg.quant.bits, cfg.quant.group_size, cfg.quant.sym) == ("autoround", 4, 64, True)
    explicit, _ = compose(["+experiment=quickstart"])
    assert explicit == cfg


def test_quickstart_evaluates_a_small_slice_and_only_checks_the_benchmark_path(compose):
    cfg, dcfg = compose([])
    assert (dcfg.hydra.runtime.choices["eval"], dcfg.hydra.runtime.choices["bench"]) == ("quick", "path_check")
    assert (cfg.eval.task_source, cfg.eval.tasks, cfg.eval.limit) == ("local", ["persuasion_lastword"], 16)
    assert (cfg.eval.perplexity.seqlen, cfg.eval.perplexity.max_windows) == (512, 6)
    w = cfg.bench
    assert (w.num_prompts, w.input_len, w.output_len, w.batch_sizes, w.warmup, w.repeats) == (2, 16, 16, [1], 0, 1)


@pytest.mark.parametrize("experiment", ["smollm2_w2_g64", "smollm2_w4_g64", "compare_methods"])
def test_gpu_presets_choose_the_fuller_eval_and_bench(compose, experiment):
    _, dcfg = compose([f"+experiment={experiment}"])
    assert (dcfg.hydra.runtime.choices["eval"], dcfg.hydra.runtime.choices["bench"]) == ("local", "auto")


def test_quant_recipes_set_reference_values(compose):
    cfg, _ = compose(["quant=autoround"])
    assert (cfg.quant.iters, cfg.calib.nsamples, cfg.calib.seqlen, cfg.quant.batch_size) == (200, 128, 2048, 8)
    assert compose(["quant=autoround_light"])[0].quant.iters == 50
    best, _ = compose(["quant=autoround_best"])
    assert (best.quant.iters, best.calib.nsamples) == (1000, 512)
    assert compose(["quant=rtn"])[0].quant.tuning_iters == 0


def test_group_choice_keeps_command_line_scheme(compose):
    cfg, _ = compose(["quant=autoround", "quant.bits=2", "quant.group_size=32"])
    assert (cfg.quant.bits, cfg.quant.group_size, cfg.quant.iters) == (2, 32, 200)


@pytest.mark.parametrize("override,expected", [
    ("quant.bits=5", "quant.bits=5 is not supported (choose from 2, 3, 4, 8); e.g. quant.bits=4"),
    ("quant.group_size=0", "quant.group_size=0 is not supported (-1 for per-output-channel"),
    ("quant.iters=-1", "quant.iters=-1 is not supported (an integer >= 0)"),
    ("calib.nsamples=0", "calib.nsamples=0 is not supported (an integer >= 1)"),
    ("calib.seqlen=4", "calib.seqlen=4 is not supported (an integer >= 8)"),
    ("run.stages=[calibrat]", "did you mean calibrate"),
    ("run.device=tpu", "run.device=tpu is not supported (auto, cpu, cuda or cuda:N)"),
])
def test_bad_values_name_key_value_allowed_and_fix(compose, override, expected):
    with pytest.raises(ConfigError) as err:
        check_cli_overrides([override], CONF_DIR)
    assert expected in str(err.value)
    # the same rule fires on a composed config (e.g. a value set in a YAML file)
    cfg, _ = compose([override])
    with pytest.raises(ConfigError) as err2:
        validate_config(cfg)
    assert expected in str(err2.value)


def test_unknown_method_fails_before_and_after_composition(compose):
    expected = "quant.method=awq is not supported (choose from rtn, gptq, autoround, bnb_nf4, bnb_int8)"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_cli_overrides(["quant.method=awq"], CONF_DIR)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        compose(["quant.method=awq"])  # typing the composed config needs the method's class


def test_unknown_key_lists_keys_and_closest_match():
    with pytest.raises(ConfigError) as err:
        check_cli_overrides(["quant.bitz=3"], CONF_DIR)
    msg = str(err.value)
    assert msg.startswith("quant.bitz=3 is not a key of quant.method=autoround (the keys of quant.method=autoround: "
                          "method, bits, group_size, sym, ")
    assert "did you mean quant.bits" in msg


def test_unknown_group_option_lists_options():
    with pytest.raises(ConfigError) as err:
        check_cli_overrides(["quant=autorund"], CONF_DIR)
    msg = str(err.value)
    assert "quant=autorund is not an option of config group quant" in msg and "autoround_best" in msg
    assert "did you mean autoround" in msg


def test_every_sweep_value_is_checked_before_launch():
    with pytest.raises(ConfigError, match="quant.bits=5 is not supported"):
        check_cli_overrides(["-m", "quant.bits=2,5"], CONF_DIR)
    check_cli_overrides(["-m", "quant.bits=2,3,4", "quant=rtn,autoround"], CONF_DIR)


def test_hydra_flags_are_not_mistaken_for_overrides():
    check_cli_overrides(["--config-name", "config", "-m", "--cfg", "job", "quant.bits=4"], CONF_DIR)
    assert "experiment" in config_groups(CONF_DIR)


def test_batch_larger_than_nsamples_is_rejected(compose):
    cfg, _ = compose(["calib.nsamples=4", "quant.batch_size=8"])
    with pytest.raises(ConfigError, match="quant.batch_size=8 exceeds the number of calibration samples"):
        validate_config(cfg)


def test_override_regex_and_bits_are_checked(compose):
    cfg, _ = compose(["+quant.overrides=[{pattern: '.*down_proj', bits: 5}]"])
    with pytest.raises(ConfigError, match=r"quant.overrides\[0\].bits=5 is not supported"):
        validate_config(cfg)
    cfg, _ = compose(["+quant.overrides=[{pattern: '(unclosed', bits: 8}]"])
    with pytest.raises(ConfigError, match="a valid regular expression"):
        validate_config(cfg)


def test_missing_model_path_is_rejected(compose, tmp_path):
    cfg, _ = compose(["model=hf_local", f"model.name_or_path={tmp_path}/nope"])
    with pytest.raises(ConfigError, match="is not a model folder"):
        validate_config(cfg)
    cfg, _ = compose(["model=hf_local"])
    with pytest.raises(ConfigError, match="model.name_or_path=None is required when model.source=hf"):
        validate_config(cfg)


def test_missing_gguf_is_rejected(compose):
    cfg, _ = compose(["model.gguf_file=/nonexistent/model.gguf", "model.gguf_package=null"])
    with pytest.raises(ConfigError, match="model.gguf_file=/nonexistent/model.gguf does not exist"):
        validate_config(cfg)


def test_unwritable_outputs_dir_is_rejected(compose, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg, _ = compose([f"run.outputs_dir={blocker}/sub"])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert str(err.value) == (f"run.outputs_dir={blocker}/sub cannot be created (its parent {blocker} is a file); "
                              "choose another folder, e.g. run.outputs_dir=/tmp/autoround-outputs")


def test_cli_reports_one_clean_error_and_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "quant.bits=7", f"run.outputs_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: quant.bits=7 is not supported (choose from 2, 3, 4, 8); e.g. quant.bits=4"
    assert not list(Path(tmp_path).iterdir())  # no work started
