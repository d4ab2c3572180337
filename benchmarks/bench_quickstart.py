#!/usr/bin/env python
"""Time the quickstart as a new user runs it: `python -m pipeline` in a fresh folder, N times.

Each run is a subprocess started in its own new, empty working folder (so `outputs/` is fresh:
the GGUF -> safetensors model conversion, the MLflow database and every stage run from
scratch), with this repository first on PYTHONPATH and no overrides unless --set gives some.
Per run it records the wall time of the whole command, each stage's seconds (its manifest), the
model conversion (its manifest's timestamps, 1 s resolution), the rest (Python start, imports,
MLflow set-up, checks before work, final logging), the peak RSS of the largest process (exact,
from the kernel) and of the whole process tree (sampled), the CPU seconds used and the load
average before and after (other jobs on the machine inflate every wall time).

Writes quickstart_cpu.json (every run) and quickstart_cpu.md (min / median / max per row, and the
summary table the pipeline printed in the median run) to --out:

    python benchmarks/bench_quickstart.py                       # 3 runs
    python benchmarks/bench_quickstart.py --runs 1 --set quant.iters=8 --out /tmp/qs   # try a variant
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

from scale_common import run_measured  # noqa: E402  (exit code, seconds, peak RSS of a child and its tree)

DEFAULT_OUT = REPO / "benchmarks" / "results" / "published" / "quickstart_cpu"
STEM = "quickstart_cpu"
SAMPLE_S = 0.2
OTHER = "other (start-up, imports, MLflow, checks, final logging)"
CONVERSION = "model conversion (GGUF -> safetensors)"


def stage_order(overrides: list[str]) -> list[str]:
    """The DAG's stages that this job runs (nodes switched off by its config left out), in run order."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from pipeline.app import compose_job_config
    from pipeline.dag import DAG

    cfg, _ = compose_job_config(list(overrides))
    return [s.name for s in DAG.topological_order() if s.enabled(cfg)]


def run_once(workdir: Path, overrides: list[str], timeout_s: float) -> dict[str, Any]:
    """`python -m pipeline <overrides>` in `workdir`; wall time, exit code, memory, CPU, log."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    log = workdir / "pipeline.log"
    load_before = os.getloadavg()[0]
    with open(log, "w") as out:
        m = run_measured([sys.executable, "-m", "pipeline", *overrides], timeout_s, env, workdir, out, SAMPLE_S)
    return {"exit_code": m["rc"], "wall_s": m["seconds"], "peak_rss_gib": m["maxrss_gib"],
            "peak_tree_rss_gib": m["tree_peak_gib"], "cpu_s": m["cpu_s"], "load_before": load_before,
            "load_after": os.getloadavg()[0], "log": log.read_text(errors="replace")}


def _seconds_between(manifest: dict) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(manifest["ended"]) - datetime.fromisoformat(manifest["started"])).total_seconds()


def read_stages(store: Path, order: list[str]) -> dict[str, float]:
    """Seconds per stage from the manifests of a fresh store, plus the model conversion."""
    found: dict[str, float] = {}
    for path in store.glob("*/*/manifest.json"):
        manifest = json.loads(path.read_text())
        stage = manifest["stage"]
        if stage == "model":
            found[CONVERSION] = _seconds_between(manifest)
        elif stage in found:
            raise RuntimeError(f"two {stage} artifacts in {store}: not a single fresh run")
        else:
            found[stage] = float(manifest["metrics"]["seconds"])
    missing = [s for s in order if s not in found]
    if missing or CONVERSION not in found:
        raise RuntimeError(f"the run left no manifest for {missing or ['model']} in {store}")
    return {name: found[name] for name in [CONVERSION, *order]}


def printed_summary(log: str) -> str:
    """The stage table and the "Next:" block the pipeline printed at the end of its output."""
    lines = log.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| stage "))
    return "\n".join(lines[start:]).strip()


def measure(args: argparse.Namespace, order: list[str]) -> list[dict[str, Any]]:
    runs = []
    for i in range(args.runs):
        workdir = Path(tempfile.mkdtemp(prefix="quickstart-"))
        print(f"run {i + 1}/{args.runs} in {workdir} ...", flush=True)
        rec = run_once(workdir, args.set, args.timeout)
        if rec["exit_code"] != 0:
            raise SystemExit(f"run {i + 1} failed (exit {rec['exit_code']}); its output:\n{rec['log'][-4000:]}")
        rec["stages"] = read_stages(workdir / "outputs" / "store", order)
        rec["stages"][OTHER] = rec["wall_s"] - sum(rec["stages"].values())
        rec["printed"] = printed_summary(rec.pop("log"))
        print(f"  {rec['wall_s']:.1f} s, peak RSS {rec['peak_rss_gib']:.2f} GiB, load {rec['load_before']:.1f} -> "
              f"{rec['load_after']:.1f}", flush=True)
        runs.append(rec)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return runs


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """min / median / max of every stage, the total, memory and CPU over the runs."""
    rows = {name: spread([r["stages"][name] for r in runs]) for name in runs[0]["stages"]}
    return {"stages": rows, "total_s": spread([r["wall_s"] for r in runs]),
            "peak_rss_gib": spread([r["peak_rss_gib"] for r in runs]),
            "peak_tree_rss_gib": spread([r["peak_tree_rss_gib"] for r in runs]),
            "cpu_s": spread([r["cpu_s"] for r in runs]),
            "load": spread([r["load_before"] for r in runs] + [r["load_after"] for r in runs])}


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    import psutil

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "host": platform.node()}


def _row(name: str, s: dict[str, float], digits: int = 1) -> str:
    return f"| {name} | {s['min']:.{digits}f} | {s['median']:.{digits}f} | {s['max']:.{digits}f} |"


def markdown(record: dict[str, Any]) -> str:
    """The results as Markdown: machine, command, the timing table and the median run's printout."""
    m, summary, runs = record["machine"], record["summary"], record["runs"]
    load = summary["load"]
    lines = ["# The quickstart on a CPU: `python -m pipeline` from a fresh outputs folder", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['system']}, Python {m['python']}, "
             f"torch {m['torch']} (host {m['host']}), {m['date']}.",
             f"Command: `{record['command']}` ({len(runs)} runs, each in a new empty folder; overrides: "
             f"{' '.join(record['overrides']) or 'none'}).",
             f"Load average (1 min) around the runs: {load['min']:.1f} to {load['max']:.1f}"
             f"{'' if load['max'] < 1.5 else ' -- other jobs shared the cores, so every time is an upper bound'}.",
             "", "| seconds | min | median | max |", "|---|---|---|---|"]
    lines += [_row(name, s) for name, s in summary["stages"].items()]
    lines += [_row("**total (wall)**", summary["total_s"]),
              _row("CPU seconds (all cores)", summary["cpu_s"]),
              "", "| memory, GiB | min | median | max |", "|---|---|---|---|",
              _row("peak RSS, largest process", summary["peak_rss_gib"], digits=2),
              _row(f"peak RSS, process tree (sampled every {SAMPLE_S} s)", summary["peak_tree_rss_gib"], digits=2)]
    median_run = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    lines += ["", f"What the pipeline printed at the end of the median run ({median_run['wall_s']:.1f} s):", "",
              "```", median_run["printed"], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for quickstart_cpu.json / .md")
    p.add_argument("--set", nargs="*", default=[], help="pipeline overrides for every run (default: none)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is killed")
    p.add_argument("--keep", action="store_true", help="keep each run's folder (printed) instead of deleting it")
    args = p.parse_args()
    if args.runs < 1:
        p.error(f"--runs={args.runs}: need at least 1 run")
    order = stage_order(args.set)
    runs = measure(args, order)
    record = {"machine": machine(), "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
              "overrides": args.set, "summary": summarize(runs), "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{STEM}.json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(record)
    (out / f"{STEM}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
