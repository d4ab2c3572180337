"""Errors found before Hydra starts: override types and syntax, an unusable outputs folder.

Each gives exit code 2 and one line `error: key=value <problem> (<allowed>); <fix>`, and nothing
is written (no outputs folder, no Hydra run folder).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import ConfigError
from pipeline.overrides import check_cli_overrides

from conftest import CONF_DIR, REPO

FIX = "choose another folder, e.g. run.outputs_dir=/tmp/autoround-outputs"


def run_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))


@pytest.mark.parametrize("override,expected", [
    ("quant.sym=maybe", "quant.sym=maybe is not supported (true or false); e.g. quant.sym=true"),
    ("run.progress=sometimes", "run.progress=sometimes is not supported (true or false); e.g. run.progress=true"),
    ("quant.lr=fast", "quant.lr=fast is not supported (a number > 0, or null for the default); e.g. quant.lr=0.005"),
    ("calib.add_bos=often", "calib.add_bos=often is not supported (true or false); e.g. calib.add_bos=false"),
    ("run.stages=calibrate", "run.stages=calibrate is not supported (a list such as [calibrate,quantize]); "
                             "e.g. run.stages=[calibrate]"),
    ("+quant.overrides=[{pattern: x, bits: maybe}]",
     "quant.overrides=[{'pattern': 'x', 'bits': 'maybe'}] is not supported (a list of mappings with keys pattern, "
     "bits, group_size, sym, skip); e.g. quant.overrides=[]"),
    ("quant.bits=[1,", "quant.bits=[1, cannot be parsed (Hydra's override syntax: no viable alternative at input "
                       "'[1,'); write key=value; quote values with spaces or special characters, lists are [a,b], "
                       "a sweep is a,b (see python -m pipeline --help)"),
    ("quant.bits", "quant.bits=(no value) cannot be parsed (Hydra's override syntax: missing EQUAL at '<EOF>'); "
                   "write key=value"),
])
def test_override_type_and_syntax_errors_name_key_value_allowed_and_fix(override, expected):
    with pytest.raises(ConfigError) as err:
        check_cli_overrides([override], CONF_DIR)
    assert str(err.value).startswith(expected)


def test_a_method_option_is_type_checked_against_the_chosen_methods_config():
    with pytest.raises(ConfigError) as err:
        check_cli_overrides(["quant=gptq", "quant.damp_percent=lots"], CONF_DIR)
    assert str(err.value) == "quant.damp_percent=lots is not supported (a number in (0, 1]); e.g. quant.damp_percent=0.01"


def test_values_hydra_accepts_pass_the_type_check():
    check_cli_overrides(["quant.sym=false", "quant.sym=yes", "quant.lr=null", "quant.lr=0.01", "run.stages=[calibrate]",
                         "-m", "quant.sym=true,false", "+quant.overrides=[{pattern: x, bits: 8}]"], CONF_DIR)


def test_unparsable_override_exits_2_with_one_line_and_writes_nothing(tmp_path):
    proc = run_cli(["quant.sym=maybe", f"run.outputs_dir={tmp_path}/out"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: quant.sym=maybe is not supported (true or false); e.g. quant.sym=true"
    assert list(tmp_path.iterdir()) == []


def test_outputs_dir_under_proc_fails_in_under_a_second_before_hydra(monkeypatch, tmp_path):
    from pipeline.app import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pipeline", "run.outputs_dir=/proc/autoround-outputs"])
    t0 = time.process_time()  # CPU time, not wall time: a busy machine must not fail the test
    with pytest.raises(SystemExit) as exc:
        main()
    assert time.process_time() - t0 < 1.0
    assert exc.value.code == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("outputs,message", [
    ("/proc/autoround-outputs", "run.outputs_dir=/proc/autoround-outputs is not writable (creating a file there "
                                "failed: No such file or directory); " + FIX),
    ("{tmp}/missing/outputs", "run.outputs_dir={tmp}/missing/outputs cannot be created (its parent folder "
                              "{tmp}/missing does not exist); create the parent first (mkdir -p {tmp}/missing) "
                              "or " + FIX),
])
def test_unusable_outputs_dir_exits_2_with_one_line(tmp_path, outputs, message):
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli([f"run.outputs_dir={outputs.format(tmp=tmp_path)}"], cwd=work)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: " + message.format(tmp=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and list(work.iterdir()) == []


def test_outputs_dir_from_an_interpolation_is_checked_before_hydra_creates_folders(tmp_path):
    """Not a literal on the command line: the Hydra callback checks the composed value (run and multirun)."""
    for mode in ([], ["-m", "quant.bits=2,4"]):
        proc = run_cli([*mode, "run.outputs_dir=${oc.env:AUTOROUND_TEST_OUT}"], cwd=tmp_path,
                       env={"AUTOROUND_TEST_OUT": "/proc/autoround-outputs"})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == (
            "error: run.outputs_dir=/proc/autoround-outputs is not writable (creating a file there failed: "
            "No such file or directory); " + FIX)
        assert list(tmp_path.iterdir()) == []
