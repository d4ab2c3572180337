"""Starting a stage's data-parallel work with torch.distributed.run (torchrun) and waiting for it.

The pipeline stays one process per node; a stage that runs data-parallel (quantize, with
run.nproc_per_node > 1 or run.nnodes > 1) starts `python -m torch.distributed.run ... -m
<worker module> <args>` through `launch` and waits. One node: `--standalone` (a local rendezvous
on a free port, so parallel sweep jobs never collide). Several nodes: a static rendezvous at
run.rdzv_endpoint (host:port on node 0), so global rank = node_rank * nproc_per_node + local
rank, and rank 0, the only writer, runs on node 0, whose pipeline holds the stage's store entry.
Workers see the launching pipeline's pid in PIPELINE_LAUNCHER_PID and stop between blocks when
it is gone (a killed pipeline leaves no orphan writing into the store).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Callable

from core.errors import ConfigError
from core.schema import RunConfig

LAUNCHER_PID_ENV = "PIPELINE_LAUNCHER_PID"
POLL_SECONDS = 2.0


def world_size(run: RunConfig) -> int:
    """How many processes a data-parallel stage runs on (all nodes)."""
    return run.nproc_per_node * run.nnodes


def torchrun_command(run: RunConfig, module: str, args: list[str]) -> list[str]:
    """The torch.distributed.run command line for `python -m module args` on this node's share of ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={run.nproc_per_node}"]
    if run.nnodes == 1:
        cmd.append("--standalone")
    else:
        host, _, port = str(run.rdzv_endpoint).rpartition(":")
        cmd += [f"--nnodes={run.nnodes}", f"--node-rank={run.node_rank}", f"--master-addr={host}",
                f"--master-port={port}"]
    return cmd + ["-m", module, *args]


def launch_env(run: RunConfig) -> dict[str, str]:
    """The workers' environment: ours, the launcher's pid, and a fair share of CPU threads per rank."""
    env = dict(os.environ)
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // run.nproc_per_node)))
    return env


def launch(cmd: list[str], env: dict[str, str], poll: Callable[[], None] = lambda: None,
           poll_seconds: float = POLL_SECONDS) -> int:
    """Run `cmd` (its output goes to ours), calling `poll` every poll_seconds; returns its exit code.

    Ctrl-C (or any error here) interrupts the workers and waits for them before re-raising.
    """
    proc = subprocess.Popen(cmd, env=env)
    try:
        while True:
            try:
                return proc.wait(timeout=poll_seconds)
            except subprocess.TimeoutExpired:
                poll()
    except BaseException:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # torchrun forwards it to its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def launcher_alive() -> bool:
    """Inside a worker: is the pipeline process that launched us still running?"""
    pid = os.environ.get(LAUNCHER_PID_ENV)
    if not pid:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_world(run: RunConfig, device: str, visible_gpus: int) -> None:
    """run.nproc_per_node must fit the visible GPUs on CUDA (one GPU per rank).

    Args:
        device: the resolved run device ("cpu" or "cuda:N").
        visible_gpus: torch.cuda.device_count().
    Raises:
        ConfigError naming run.nproc_per_node, the GPUs there are and the fix.
    """
    if device.startswith("cuda") and run.nproc_per_node > visible_gpus:
        raise ConfigError("run.nproc_per_node", run.nproc_per_node,
                          f"at most the {visible_gpus} visible GPU(s) on this node (one GPU per rank)",
                          f"e.g. run.nproc_per_node={max(1, visible_gpus)}, or make more GPUs visible "
                          "(CUDA_VISIBLE_DEVICES, the job's GPU request)", problem="exceeds the visible GPUs")
