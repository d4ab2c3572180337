#!/usr/bin/env python
"""The headline command end to end at 8B scale: `python -m pipeline +experiment=<preset>`.

Runs the preset as a user would (a subprocess of `python -m pipeline`, every stage, MLflow on) on a
Llama-3-8B-shaped model with random bf16 weights (`model=llama3_8b_random`: the real weights cannot
be downloaded on an offline machine, and random weights cost the same time and memory), with the
documented offline calibration (`calib=austen calib.mode=random_window`) and the local evaluation
tasks (`eval=local`). Records per stage the wall time (the pipeline's own summary), the peak host
RSS of the process tree and the peak GPU memory in use (nvidia-smi, sampled every 0.2 s), the
checkpoint's size and format, the quantize stage's tuning seconds (to extrapolate a lowered
`quant.iters` to the preset's own count), the benchmark records and the MLflow run's status.

Usage (GPU machine):
  python benchmarks/headline_e2e.py --preset llama3_w2_g64 --outputs /tmp/e2e --out $OUT/e2e \
      --set quant.iters=100 bench=torch
  python benchmarks/headline_e2e.py --preset llama3_w4_g128 --outputs /tmp/e2e --out $OUT/e2e
  python benchmarks/headline_e2e.py --small --out /tmp/e2e-small      # CPU check on the tiny model
A run too long for one call can be split with --set run.stages=[...] over several invocations into
the same --outputs and --out: stages that ran are merged into the record (cached ones keep the earlier
measurement), peaks are the maxima over the invocations.
Writes <out>/headline_<preset>.json and .md; published_results.py --parts results merges them.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, Path(__file__).parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from scale_common import tree_rss  # noqa: E402

OFFLINE_8B = ["model=llama3_8b_random", "run.offline=true", "calib=austen", "calib.mode=random_window",
              "eval=local", "bench.num_prompts=1", "bench.input_len=8", "bench.output_len=128"]
SMALL = ["model=tiny_random", "run.offline=true", "calib=austen", "calib.mode=random_window", "calib.nsamples=8",
         "calib.seqlen=64", "quant.iters=4", "quant.batch_size=4", "quant.grad_accum=1", "quant.group_size=32",
         "run.device=cpu", "eval=local", "eval.limit=4", "eval.perplexity.max_windows=2", "bench=torch", "bench.num_prompts=2",
         "bench.input_len=8", "bench.output_len=8", "bench.repeats=1", "bench.warmup=0"]
SUMMARY_ROW = re.compile(r"^\|\s*(\w+)\s*\|\s*(\w+)\s*\|\s*([\d.]+)\s*\|")


class Sampler:
    """Peak host RSS of a process tree (scale_common.tree_rss) and peak GPU memory in use (nvidia-smi), sampled
    in a thread."""

    def __init__(self, pid: int, period: float = 0.2):
        self.pid, self.period = pid, period
        self.peak_rss = 0
        self.peak_gpu_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _gpu(self) -> int:
        if not shutil.which("nvidia-smi"):
            return 0
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        return max((int(x) for x in out.split()), default=0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, tree_rss(self.pid))
            self.peak_gpu_mib = max(self.peak_gpu_mib, self._gpu())
            self._stop.wait(self.period)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def newest(store: Path, stage: str, name: str) -> Optional[dict]:
    """The JSON file `name` of the most recently finished artifact of `stage` in the store."""
    found = sorted(store.glob(f"{stage}/*/{name}"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def mlflow_status(outputs: Path) -> Optional[str]:
    try:
        import mlflow
    except ImportError:
        return None
    mlflow.set_tracking_uri(f"sqlite:///{outputs / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"], max_results=1)
    return None if runs.empty else str(runs.iloc[0]["status"])


def run_preset(args: argparse.Namespace) -> dict[str, Any]:
    outputs = Path(args.outputs)
    overrides = [f"+experiment={args.preset}", *(SMALL if args.small else OFFLINE_8B),
                 f"run.outputs_dir={outputs}", *args.set]
    cmd = [sys.executable, "-m", "pipeline", *overrides]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with Sampler(proc.pid) as sampler:
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
        rc = proc.wait()
    from pipeline.dag import STAGE_NAMES

    stages = {m.group(1): {"status": m.group(2), "seconds": float(m.group(3))}
              for m in map(SUMMARY_ROW.match, lines) if m and m.group(1) in STAGE_NAMES}
    store = outputs / "store"
    manifests = {s: newest(store, s, "manifest.json") for s in ("quantize", "pack", "evaluate", "baseline_evaluate")}
    return {"preset": args.preset, "overrides": overrides, "returncode": rc, "wall_seconds": time.perf_counter() - t0,
            "stages": stages, "peak_host_rss_gib": sampler.peak_rss / 2**30,
            "peak_gpu_used_gib": sampler.peak_gpu_mib / 1024,
            "metrics": {s: (m or {}).get("metrics", {}) for s, m in manifests.items()},
            "compat": newest(store, "pack", "compat.json"),
            "benchmark": newest(store, "benchmark", "throughput.json"),
            "baseline_benchmark": newest(store, "baseline_benchmark", "throughput.json"),
            "mlflow_status": mlflow_status(outputs), "log_tail": "".join(lines[-60:]), "machine": machine()}


def machine() -> dict[str, Any]:
    import torch
    from bench_common import environment

    return environment(torch.device("cuda:0" if torch.cuda.is_available() else "cpu"), False)


def merge_records(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One record from invocations that ran different stages into the same outputs folder."""
    stages = dict(old.get("stages", {}))
    for name, row in new["stages"].items():
        if row["status"] == "ran" or name not in stages:
            stages[name] = row
    invocations = old.get("invocations") or [old["overrides"]]
    merged = {**new, "stages": stages, "invocations": invocations + [new["overrides"]],
              "wall_seconds": old["wall_seconds"] + new["wall_seconds"],
              "peak_host_rss_gib": max(old["peak_host_rss_gib"], new["peak_host_rss_gib"]),
              "peak_gpu_used_gib": max(old["peak_gpu_used_gib"], new["peak_gpu_used_gib"])}
    return merged


def extrapolated_quantize_seconds(record: dict[str, Any], target_iters: int, iters: int) -> Optional[float]:
    """Quantize time at the preset's own iteration count: the tuning loop scales linearly, the rest stays."""
    q = record["metrics"].get("quantize", {})
    if "seconds" not in q or "tune_seconds" not in q or not iters:
        return None
    return q["seconds"] - q["tune_seconds"] + q["tune_seconds"] * target_iters / iters


def markdown(record: dict[str, Any]) -> str:
    q, p = record["metrics"].get("quantize", {}), record["metrics"].get("pack", {})
    compat = record.get("compat") or {}
    where = record["machine"].get("card") or f"CPU {record['machine'].get('cpu', '')}"
    runs = record.get("invocations") or [record["overrides"]]
    lines = [f"### `{record['preset']}` ({where}, {record['machine'].get('date', '')})", "",
             "Random bf16 weights in the Llama-3-8B shape (the real weights cannot be downloaded on the offline "
             "GPU machine; time and memory are the same, scores are meaningless), the documented offline "
             "calibration and the local evaluation tasks.", "",
             *[f"- `python -m pipeline {' '.join(ov)}`" for ov in runs],
             f"- last exit status {record['returncode']}, MLflow run {record.get('mlflow_status')}", "",
             "| stage | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s} | {v['status']} | {v['seconds']:.1f} |" for s, v in record["stages"].items()]
    lines += ["", f"- wall time {record['wall_seconds']:.0f} s over all invocations (beyond the stages: start-up, "
                  f"planning and, when the store does not hold it yet, drawing and saving the random model); peak host RSS of the process tree "
                  f"{record['peak_host_rss_gib']:.1f} GiB; peak GPU memory in use {record['peak_gpu_used_gib']:.1f} GiB "
                  "(vLLM reserves bench.gpu_memory_utilization of the card when it runs)",
              f"- checkpoint: {compat.get('format', '?')}, {p.get('size_mb', 0) / 1000:.2f} GB on disk, "
              f"{int(p.get('verified_layers', 0))} layers verified bit for bit; vLLM 0.26: "
              f"{'loads' if (compat.get('vllm') or {}).get('loads') else 'refuses'}"]
    if record.get("extrapolated_quantize_seconds"):
        lines.append(f"- quantize {q.get('seconds', 0):.0f} s at quant.iters={record['iters']} (tuning "
                     f"{q.get('tune_seconds', 0):.0f} s); at the preset's {record['preset_iters']} iterations: "
                     f"about {record['extrapolated_quantize_seconds']:.0f} s (tuning scaled linearly)")
    bench = record.get("benchmark") or {}
    if bench.get("results"):
        base = record.get("baseline_benchmark") or {}
        lines += ["", f"Decode throughput ({bench.get('backend')}, {bench.get('backend_choice', '')}):", "",
                  "| batch | bf16 tok/s | quantized tok/s | speedup |", "| --- | --- | --- | --- |"]
        base_by_b = {r["batch_size"]: r for r in (bench.get("baseline_same_backend") or base).get("results", [])}
        for r in bench["results"]:
            b = base_by_b.get(r["batch_size"], {})
            lines.append(f"| {r['batch_size']} | {b.get('output_tokens_per_s', {}).get('median', float('nan')):.1f} | "
                         f"{r['output_tokens_per_s']['median']:.1f} | "
                         f"{bench.get('speedup_vs_baseline', {}).get(str(r['batch_size']), float('nan')):.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3_w2_g64")
    p.add_argument("--outputs", default="/tmp/headline-outputs", help="the pipeline's run.outputs_dir")
    p.add_argument("--out", required=True, help="folder for headline_<preset>.json/.md")
    p.add_argument("--set", nargs="*", default=[], help="extra pipeline overrides, e.g. quant.iters=100 bench=torch")
    p.add_argument("--small", action="store_true", help="tiny random model on the CPU (a check of this script)")
    p.add_argument("--merge", action="store_true", help="merge into an existing record of the same preset in --out")
    args = p.parse_args()
    from pipeline.app import compose_job_config

    preset_cfg, _ = compose_job_config([f"+experiment={args.preset}"])
    run_cfg, _ = compose_job_config([f"+experiment={args.preset}", *(SMALL if args.small else OFFLINE_8B), *args.set])
    record = run_preset(args)
    record.update(preset_iters=preset_cfg.quant.iters, iters=run_cfg.quant.iters)
    record["extrapolated_quantize_seconds"] = extrapolated_quantize_seconds(record, preset_cfg.quant.iters,
                                                                            run_cfg.quant.iters)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"headline_{args.preset}.json"
    if args.merge and path.is_file():
        record = merge_records(json.loads(path.read_text()), record)
    path.write_text(json.dumps(record, indent=1, default=str))
    text = markdown(record)
    (out / f"headline_{args.preset}.md").write_text(text)
    print(text)
    if record["returncode"] != 0:
        raise SystemExit(record["returncode"])


if __name__ == "__main__":
    main()
