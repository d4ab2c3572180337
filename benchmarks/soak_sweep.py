"""Soak test of parallel sweeps with MLflow on: fresh folder, rerun, random SIGKILLs, rerun.

    python benchmarks/soak_sweep.py            # 24 jobs, 4 at a time, 3 kill rounds (about 20 min on 2 cores)
    python benchmarks/soak_sweep.py --small    # 4 jobs, 2 at a time, 1 kill round: a quick check of the script

Every pass is one `python -m pipeline -m hydra/launcher=joblib_local` multirun on the tiny random
Llama over quant.bits x quant.group_size x quant.iters (stages calibrate, quantize, pack; the
default sqlite MLflow database), all in one fresh outputs folder:

  fresh  everything is computed (calibrate once, shared by every job);
  again  the same sweep: everything is reused from the store;
  kill-N new work (run.seed=1 changes every quantize and pack fingerprint); a random 0-20 s after
         quantize work started, the killer SIGKILLs a random joblib worker (by PID, one of this
         script's own descendants), which aborts the multirun (loky stops the other workers too);
         N rounds;
  finish the same sweep once more, without kills, to completion.

Recorded per pass: wall time, exit code, jobs finished (job.json COMPLETED), each stage's artifacts
computed vs reused. At the end: MLflow runs by status (a SIGKILLed job's run stays RUNNING),
sqlite `PRAGMA integrity_check`, every stored artifact re-hashed in full against its manifest,
leftover partial folders, and the cells that a kill interrupted recomputed without interruption
in a second folder, which must give byte-identical quantize and pack outputs. Writes --json and
--markdown (default benchmarks/results/soak_cpu.{json,md}), plus each pass's log in the work folder.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAGES = ("calibrate", "quantize", "pack")
COMMON = ["model=tiny_random", f"run.stages=[{','.join(STAGES)}]", "calib.nsamples=8", "calib.seqlen=32",
          "quant.batch_size=4", "run.device=cpu", "run.progress=false"]
GRIDS = {"full": {"quant.bits": [2, 3, 4, 8], "quant.group_size": [32, 64], "quant.iters": [0, 2, 4]},
         "small": {"quant.bits": [2, 4], "quant.group_size": [32], "quant.iters": [0, 2]}}


def grid_args(grid: dict[str, list]) -> list[str]:
    return [f"{k}={','.join(map(str, v))}" for k, v in grid.items()]


def cells(grid: dict[str, list]) -> list[dict[str, Any]]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                out += kids
                todo += kids
    return out


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def kill_a_worker(proc: subprocess.Popen, store: Path, delay: float, rng: random.Random) -> Optional[dict]:
    """`delay` seconds after quantize work started (a .partial folder appears), SIGKILL one random
    joblib worker of `proc` (one of ours, by PID)."""
    t0 = time.time()
    while not any(p.stat().st_mtime >= t0 for p in store.glob("quantize/.partial-*")):
        if proc.poll() is not None:
            return None
        time.sleep(0.1)
    deadline = time.time() + delay
    while time.time() < deadline:
        if proc.poll() is not None:
            return None
        time.sleep(0.1)
    workers = [p for p in descendants(proc.pid) if "popen_loky_posix" in cmdline(p)]
    if not workers:
        return None
    victim = rng.choice(workers)
    os.kill(victim, signal.SIGKILL)
    return {"pid": victim, "after_s": round(delay, 1), "workers": len(workers)}


def job_records(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/job.json"))}


def overrides_of(sweep: Path, job: str) -> dict[str, str]:
    """A job's task overrides from Hydra's record (also for a job that never wrote job.json)."""
    path = sweep / job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    lines = [ln[2:].strip() for ln in path.read_text().splitlines() if ln.startswith("- ")]
    return dict(ln.split("=", 1) for ln in lines if "=" in ln)


def run_pass(name: str, work: Path, grid: dict, n_jobs: int, extra: list[str], kill_delay: Optional[float],
             rng: random.Random) -> dict:
    outputs, sweep = work / "outputs", work / "outputs" / "sweeps" / name
    cmd = [sys.executable, "-m", "pipeline", "-m", "hydra/launcher=joblib_local", f"hydra.launcher.n_jobs={n_jobs}",
           *COMMON, f"run.outputs_dir={outputs}", f"hydra.sweep.dir={sweep}", *grid_args(grid), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.time()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        killed = kill_a_worker(proc, outputs / "store", kill_delay, rng) if kill_delay is not None else None
        rc = proc.wait(timeout=3600)
    records = job_records(sweep)
    started = sorted(p.parent.parent.name for p in sweep.glob("*/.hydra/overrides.yaml"))
    interrupted = [j for j in started if j not in records]
    stages: dict[str, dict[str, int]] = {s: {"ran": 0, "cached": 0} for s in STAGES}
    resumed = 0
    for rec in records.values():
        for stage, info in rec["stages"].items():
            stages[stage][info["status"]] += 1
        q = rec["stages"].get("quantize", {})
        if q.get("status") == "ran":
            metrics = json.loads((Path(q["path"]) / "manifest.json").read_text())["metrics"]
            resumed += metrics.get("blocks_resumed", 0) > 0
    row = {"pass": name, "seconds": round(time.time() - t0, 1), "exit_code": rc, "jobs": len(cells(grid)),
           "jobs_finished": sum(r["status"] == "COMPLETED" for r in records.values()),
           "jobs_interrupted": len(interrupted), "stages": stages, "quantize_resumed": resumed, "killed": killed,
           "interrupted_cells": [overrides_of(sweep, j) for j in interrupted],
           "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(f"[soak] {name}: {row['jobs_finished']}/{row['jobs']} jobs finished in {row['seconds']} s (exit {rc}), "
          f"killed={killed}, stages={stages}", flush=True)
    return row


def mlflow_counts(db: Path) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        parents = {r[0] for r in con.execute("SELECT run_uuid FROM tags WHERE key='sweep' AND value='parent'")}
        runs = list(con.execute("SELECT run_uuid, status FROM runs"))
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    jobs = [s for r, s in runs if r not in parents]
    by = lambda xs: {s: xs.count(s) for s in sorted(set(xs))}  # noqa: E731
    return {"job_runs": by(jobs), "parent_runs": by([s for r, s in runs if r in parents]),
            "integrity_check": integrity}


def store_check(store_root: Path) -> dict[str, Any]:
    """Every complete artifact re-hashed in full against its manifest; leftover work folders."""
    from core import store as store_mod

    store_mod.HASH_CHECK_MAX_BYTES = 1 << 62  # hash every file, not only the small ones
    checked, bad = 0, []
    for stage_dir in sorted(p for p in store_root.iterdir() if p.is_dir()):
        for entry in store_mod.ArtifactStore(store_root).complete_entries(stage_dir.name):
            checked += 1
            problem = entry.problem()
            if problem:
                bad.append(f"{stage_dir.name}/{entry.fingerprint}: {problem}")
    leftovers = sorted(str(p.relative_to(store_root)) for p in store_root.glob("*/.*")
                       if p.is_dir() and p.name.startswith((".partial-", ".trash-", ".import-")))
    return {"artifacts_checked": checked, "corrupted": bad, "leftover_folders": leftovers}


# Outputs that legitimately differ between two runs of the same cell: per-block wall times.
NOT_COMPARED = {"block_metrics.json"}


def output_hashes(path: Path) -> dict[str, str]:
    manifest = json.loads((path / "manifest.json").read_text())
    return {o["path"]: o["sha256"] for o in manifest["outputs"] if o["path"] not in NOT_COMPARED}


def cell_key(overrides: dict[str, str], grid: dict) -> tuple:
    return tuple((k, str(overrides.get(k))) for k in grid)


def reference_check(work: Path, final: Path, grid: dict, interrupted: list[dict[str, str]], extra: list[str]) -> dict:
    """Recompute each interrupted cell without interruption in a second folder; its quantize and
    pack outputs must be byte-identical to the soaked store's."""
    import shutil

    ref = work / "reference"
    shutil.copytree(work / "outputs" / "store" / "model", ref / "store" / "model", copy_function=os.link,
                    dirs_exist_ok=True)
    finals = {cell_key(dict(o.split("=", 1) for o in r["overrides"]), grid): r for r in job_records(final).values()}
    same, differ = 0, []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in sorted({cell_key(c, grid) for c in interrupted}):
        args = [f"{k}={v}" for k, v in key]
        proc = subprocess.run([sys.executable, "-m", "pipeline", *COMMON, *args, *extra, f"run.outputs_dir={ref}",
                               "tracking.enabled=false"], cwd=work, env=env, capture_output=True, text=True,
                              timeout=1800)
        record = finals.get(key)
        for stage in ("quantize", "pack"):
            fp = record["stages"][stage]["fingerprint"] if record else "missing"
            soaked, clean = work / "outputs" / "store" / stage / fp, ref / "store" / stage / fp
            if proc.returncode == 0 and clean.is_dir() and soaked.is_dir() and \
                    output_hashes(soaked) == output_hashes(clean):
                same += 1
            else:
                differ.append(f"{' '.join(args)} {stage}: differs from an uninterrupted run (exit {proc.returncode})")
    return {"artifacts_compared": same + len(differ), "identical": same, "different": differ}


def machine() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor() or platform.machine())
    import mlflow
    import torch

    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "mlflow": mlflow.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def markdown(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    lines = [f"Soak run: {m['date']}, {m['cpu']} ({m['cores']} cores), torch {m['torch']}, MLflow {m['mlflow']}; "
             f"load average at start {m['load_average_at_start']} (the machine is shared: other work ran "
             "concurrently, so the wall times are as measured, not a speed claim).",
             f"Command: `{result['command']}`. {cfg['jobs']} jobs ({cfg['grid']}), {cfg['n_jobs']} at a time, "
             f"stages {', '.join(STAGES)}, tiny random Llama, MLflow sqlite in a fresh folder.", "",
             "| pass | wall s | exit | jobs finished | interrupted | calibrate ran/reused | quantize ran/reused "
             "| pack ran/reused | SIGKILL |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["passes"]:
        st = row["stages"]
        kill = f"pid {row['killed']['pid']}, {row['killed']['after_s']} s in" if row["killed"] else "-"
        lines.append(f"| {row['pass']} | {row['seconds']} | {row['exit_code']} | {row['jobs_finished']}/{row['jobs']} "
                     f"| {row['jobs_interrupted']} | " + " | ".join(f"{st[s]['ran']}/{st[s]['cached']}" for s in STAGES)
                     + f" | {kill} |")
    ml, store, ref = result["mlflow"], result["store"], result["reference"]
    lines += ["", "SIGKILL: one random joblib worker, that many seconds after the pass's quantize work began; "
              "loky then stops the other workers, so every job in flight is interrupted and the multirun exits 1. "
              "kill-N and finish use run.seed=1: new quantize and pack artifacts, the same calibration.",
              "", f"- MLflow job runs by status: {ml['job_runs']} (a SIGKILLed job's run stays RUNNING); parent runs: "
              f"{ml['parent_runs']} (an aborted multirun never closes its parent); sqlite integrity_check: "
              f"{ml['integrity_check']}.",
              f"- Store: {store['artifacts_checked']} complete artifacts re-hashed in full against their manifests, "
              f"{len(store['corrupted'])} corrupted; leftover partial/trash folders: {len(store['leftover_folders'])}.",
              f"- Interrupted cells recomputed without interruption in a second folder: {ref['identical']}/"
              f"{ref['artifacts_compared']} quantize/pack artifacts byte-identical (every output but the per-block "
              "timings in block_metrics.json); quantize artifacts that resumed from a killed job's partial folder "
              f"in the finish pass: {result['passes'][-1]['quantize_resumed']}.",
              f"- Verdict: {'no corruption' if result['ok'] else 'CORRUPTION OR UNFINISHED JOBS: see the JSON'}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="4 jobs, 2 at a time, 1 kill round")
    p.add_argument("--kill-rounds", type=int, default=None, help="default 3 (1 with --small)")
    p.add_argument("--seed", type=int, default=0, help="the killer's random seed")
    p.add_argument("--work", type=Path, default=None, help="fresh work folder (default: a new temporary one)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "soak_cpu.json")
    p.add_argument("--markdown", type=Path, default=REPO / "benchmarks" / "results" / "soak_cpu.md")
    p.add_argument("--render", type=Path, default=None, help="only rewrite --markdown from this JSON result")
    args = p.parse_args(argv)
    if args.render:
        args.markdown.write_text(markdown(json.loads(args.render.read_text())))
        return 0
    grid, n_jobs = GRIDS["small" if args.small else "full"], 2 if args.small else 4
    rounds = args.kill_rounds if args.kill_rounds is not None else (1 if args.small else 3)
    delays = (0.0, 5.0) if args.small else (0.0, 20.0)  # seconds after quantize work started
    work = args.work or Path(tempfile.mkdtemp(prefix="autoround-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        p.error(f"--work {work} is not empty: the soak starts in a fresh folder")
    rng = random.Random(args.seed)
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "work": str(work),
                              "config": {"grid": grid_args(grid), "jobs": len(cells(grid)), "n_jobs": n_jobs,
                                         "kill_rounds": rounds, "kill_delay_s": delays, "seed": args.seed}}
    passes = [run_pass(name, work, grid, n_jobs, [], None, rng) for name in ("fresh", "again")]
    for i in range(rounds):
        passes.append(run_pass(f"kill-{i + 1}", work, grid, n_jobs, ["run.seed=1"], rng.uniform(*delays), rng))
    passes.append(run_pass("finish", work, grid, n_jobs, ["run.seed=1"], None, rng))
    interrupted = [c for row in passes if row["pass"].startswith("kill") for c in row["interrupted_cells"]]
    result.update(passes=passes, mlflow=mlflow_counts(work / "outputs" / "mlflow.db"),
                  store=store_check(work / "outputs" / "store"),
                  reference=reference_check(work, work / "outputs" / "sweeps" / "finish", grid, interrupted,
                                            ["run.seed=1"]))
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["ok"] = (passes[0]["jobs_finished"] == passes[1]["jobs_finished"] == passes[-1]["jobs_finished"]
                    == len(cells(grid)) and not result["store"]["corrupted"] and not result["reference"]["different"]
                    and result["mlflow"]["integrity_check"] == "ok")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    args.markdown.write_text(markdown(result))
    print(markdown(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
