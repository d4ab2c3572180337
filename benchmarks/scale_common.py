"""What bench_scale.py and bench_dp.py share: peak host memory of a child process, and the result files.

Peak host RSS is measured two ways, both without psutil (a bare GPU machine may lack it):
* `maxrss`: the kernel's high-water mark of the child itself (os.wait4's ru_maxrss), exact, and
  the largest single process of its tree when it started others;
* `tree_peak`: the sum of VmRSS over the child and all its descendants (torchrun ranks,
  torch.compile workers), sampled every 0.1 s from /proc (can miss spikes shorter than that);
  pages the processes share (the libraries every torch process maps) count once per process;
* `tree_pss_peak`: the same sum of the proportional set size (Pss of /proc/<pid>/smaps_rollup), where a
  page shared by k processes counts 1/k in each: the memory the tree really occupies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GIB = 2**30


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _field_bytes(path: str, key: str) -> int:
    """The kB value of the line starting with `key` in a /proc file, in bytes (0 once the process is gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss(pid: int) -> int:
    return _field_bytes(f"/proc/{pid}/status", "VmRSS:")


def _pss(pid: int) -> int:
    return _field_bytes(f"/proc/{pid}/smaps_rollup", "Pss:")


def _tree(root: int) -> list[int]:
    tree, stack, pids = _children(), [root], []
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(tree.get(pid, []))
    return pids


def tree_rss(root: int) -> int:
    """Sum of VmRSS of `root` and all its descendants now."""
    return sum(_rss(pid) for pid in _tree(root))


def current_rss() -> int:
    return _rss(os.getpid())


class TreeSampler:
    """Peaks of the summed VmRSS and the summed Pss of `pid` and its descendants, sampled in a thread."""

    def __init__(self, pid: int, period: float = 0.1):
        self.pid, self.period, self.peak, self.pss_peak = pid, period, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.pid)
            self.peak = max(self.peak, sum(_rss(pid) for pid in pids))
            self.pss_peak = max(self.pss_peak, sum(_pss(pid) for pid in pids))
            self._stop.wait(self.period)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], timeout: Optional[float] = None, env: Optional[dict] = None,
                 cwd: Optional[Path] = None, stdout: Any = None, period: float = 0.1) -> dict[str, Any]:
    """Run `cmd`; its exit code, seconds, CPU seconds and peak host memory (GiB).

    Args:
        cmd: the command line of the child.
        timeout: seconds before the child is killed (its record then says so).
        env: the child's environment (default: ours, with the repository on PYTHONPATH).
        cwd: the child's working folder (default: ours).
        stdout: where the child's stdout and stderr go (default: ours).
        period: seconds between samples of the process tree.
    """
    env = env or {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT if stdout else None)
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer:
        timer.start()
    with TreeSampler(proc.pid, period) as sampler:
        _, status, usage = os.wait4(proc.pid, 0)
    if timer:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 2),
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "maxrss_gib": round(usage.ru_maxrss * 1024 / GIB, 3), "tree_peak_gib": round(sampler.peak / GIB, 3),
            "tree_pss_peak_gib": round(sampler.pss_peak / GIB, 3)}


def python_cmd(script: Path, *args: str) -> list[str]:
    return [sys.executable, str(script), *args]


def save_record(out: Path, name: str, record: dict[str, Any], markdown: str) -> None:
    """<out>/<name>.json and <out>/<name>.md (written after every step, so a cut-short run keeps its numbers)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    (out / f"{name}.md").write_text(markdown)


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)
