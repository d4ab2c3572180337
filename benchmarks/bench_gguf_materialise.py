#!/usr/bin/env python
"""Time the one-time GGUF -> safetensors model conversion alone, one way or the other.

Each run is a fresh subprocess (imports included, as in a first `python -m pipeline`) that
converts the configured GGUF model into a temporary folder and prints its seconds:

    python benchmarks/bench_gguf_materialise.py                      # the pipeline's path (fast)
    python benchmarks/bench_gguf_materialise.py --loader transformers --runs 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import sys, tempfile, time
from pathlib import Path
t0 = time.perf_counter()
from pipeline.app import compose_job_config
from pipeline import models
cfg, _ = compose_job_config(sys.argv[2:])
t1 = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    if sys.argv[1] == "fast":
        models._materialise_gguf(cfg.model, Path(tmp) / "model")
    else:
        models._materialise_gguf_transformers(models.find_gguf(cfg.model), Path(tmp) / "model")
    print(f"SECONDS {time.perf_counter() - t1:.2f} {t1 - t0:.2f}")
"""


def time_once(loader: str, overrides: list[str]) -> tuple[float, float]:
    """(conversion seconds, start-up seconds) of one fresh process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", _CHILD, loader, *overrides], env=env, cwd=REPO,
                          capture_output=True, text=True, check=True)
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("SECONDS "))
    convert, startup = map(float, line.split()[1:])
    return convert, startup


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loader", choices=("fast", "transformers"), default="fast")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=["model=smollm2_135m"], help="config overrides")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    runs = [time_once(args.loader, args.set) for _ in range(args.runs)]
    converts = [c for c, _ in runs]
    print(f"{args.loader}: conversion {min(converts):.1f} / {statistics.median(converts):.1f} / {max(converts):.1f} s "
          f"(min / median / max of {args.runs}; imports before it {statistics.median(s for _, s in runs):.1f} s; "
          f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}; {time.perf_counter() - t0:.0f} s total)")


if __name__ == "__main__":
    main()
