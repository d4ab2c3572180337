#!/usr/bin/env python
"""Run the README's "Use the checkpoint" snippets, exactly as written, on a packed checkpoint.

Every fenced block of that README section runs with `/path/to/checkpoint` replaced by --checkpoint:
python blocks with this interpreter, bash blocks line by line (a continued line joins the next); a
`vllm serve` line starts the server in the background and the next lines run once it answers
/health; the server is stopped (by PID) after the block. Blocks tagged `text` are not run.
Records per block: exit status, seconds, output tail; writes JSON + Markdown.

Usage (GPU machine with vLLM and lm-eval installed):
  python benchmarks/usage_check.py --checkpoint /tmp/e2e/store/pack/<fp>/checkpoint --out $OUT/usage
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Use the checkpoint"
PLACEHOLDER = "/path/to/checkpoint"
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)


def snippets(readme: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block in the README section."""
    text = readme.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return FENCE.findall(text[start:end if end != -1 else None])


def _commands(code: str) -> list[str]:
    out, pending = [], ""
    for line in code.splitlines():
        pending += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            if pending.strip() and not pending.lstrip().startswith("#"):
                out.append(pending.strip())
            pending = ""
    return out


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"vllm serve did not answer /health within {timeout:.0f} s")


def run_bash(code: str, timeout: float) -> tuple[int, str]:
    log, server = [], None
    try:
        for cmd in _commands(code):
            if cmd.startswith("vllm serve"):
                port = int(re.search(r"--port (\d+)", cmd).group(1))
                server = subprocess.Popen(cmd, shell=True, cwd=REPO, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
                _wait_healthy(port, server, timeout)
                log.append(f"$ {cmd}\n(serving on 127.0.0.1:{port})\n")
                continue
            proc = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            log.append(f"$ {cmd}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
            if proc.returncode:
                return proc.returncode, "".join(log)
        return 0, "".join(log)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def run_python(code: str, timeout: float) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout[-2000:] + proc.stderr[-2000:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--readme", default=str(REPO / "README.md"))
    p.add_argument("--timeout", type=float, default=420.0, help="seconds per command")
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    for lang, code in snippets(Path(args.readme)):
        if lang not in ("python", "bash"):
            continue
        code = code.replace(PLACEHOLDER, args.checkpoint)
        t0 = time.perf_counter()
        try:
            rc, out = (run_python if lang == "python" else run_bash)(code, args.timeout)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
            rc, out = 1, f"{type(exc).__name__}: {exc}"
        rows.append({"lang": lang, "code": code, "returncode": rc, "seconds": time.perf_counter() - t0,
                     "output_tail": out[-3000:]})
        print(f"[{lang}] exit {rc} in {rows[-1]['seconds']:.0f} s\n{out[-800:]}", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "usage_check.json").write_text(json.dumps({"checkpoint": args.checkpoint, "rows": rows}, indent=1))
    md = ["| snippet | exit | seconds |", "| --- | --- | --- |"]
    md += [f"| `{r['code'].strip().splitlines()[0][:80]}` | {r['returncode']} | {r['seconds']:.0f} |" for r in rows]
    (out_dir / "usage_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
