"""The nodes other than node 0 of a multi-node run (run.node_rank > 0): join the quantize stage's launch, nothing else.

Node 0 runs the pipeline: every stage, the store entry, MLflow. The same command on node k
(with run.node_rank=k) plans the same DAG (same fingerprints, the same store on a shared
filesystem), then starts its torchrun agent for the quantize stage's ranks k * nproc_per_node ...;
its workers read the job node 0 writes into the stage's work folder. The static rendezvous at
run.rdzv_endpoint holds every node until node 0's stage starts its own agent.
"""

from __future__ import annotations

from core.launch import launch, launch_env, torchrun_command
from pipeline.runner import PipelineRunner
from pipeline.runtime import Runtime
from core.schema import PipelineConfig

STAGE = "quantize"


def follow(cfg: PipelineConfig, runtime: Runtime) -> None:
    """Join node 0's data-parallel quantize stage (returns at once when there is nothing to join)."""
    from stages.quant.launch import WORKER_MODULE, job_file

    runner = PipelineRunner(cfg, runtime)
    plan = runner.plan()
    if STAGE not in {s.name for s in plan.selected}:
        runtime.log(f"[node {cfg.run.node_rank}] the quantize stage is not selected: nothing to join")
        return
    entry = runner.store.entry(STAGE, plan.fps[STAGE])
    if entry.is_complete():
        runtime.log(f"[node {cfg.run.node_rank}] the quantize stage is already complete ({entry.path})")
        return
    cmd = torchrun_command(cfg.run, WORKER_MODULE, [str(job_file(entry.partial.resolve()))])
    runtime.log(f"[node {cfg.run.node_rank}] joining the quantize stage: {' '.join(cmd)}")
    code = launch(cmd, launch_env(cfg.run))
    if code != 0:
        raise RuntimeError(f"this node's quantize workers failed (torchrun exit code {code}); node 0's log "
                           "names the cause. Run the same commands again to resume at the first unfinished block")
