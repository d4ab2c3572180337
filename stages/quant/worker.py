"""One rank of a data-parallel quantize launch:
`python -m torch.distributed.run --nproc-per-node N ... -m stages.quant.worker <workdir>/dist/job.json`.

Joins the process group torchrun set up (NCCL on CUDA with cuda:LOCAL_RANK, gloo on the CPU),
runs stages.quant.job.run_job with it, and on rank 0 writes the run's metrics to result.json
beside the job file. A bad input is written to error-rank<r>.json there (exit status 2) for the
launching stage to report; between blocks every rank stops when the launching pipeline is gone.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

JOB_WAIT_SECONDS = 120  # a shared filesystem may show node 0's job file to other nodes late


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + JOB_WAIT_SECONDS
    while not path.is_file():
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"{path} did not appear within {JOB_WAIT_SECONDS} s: is run.outputs_dir on a "
                                    "filesystem every node sees?")
        time.sleep(1.0)


def _stop_if_orphaned() -> None:
    from core.launch import launcher_alive

    if not launcher_alive():
        print("[quantize worker] the launching pipeline is gone: stopping before the next block", flush=True)
        raise SystemExit(3)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def main(argv: Optional[list[str]] = None) -> int:
    import torch

    from core.errors import ConfigError, InputError
    from stages.quant.distributed import init_from_env
    from stages.quant.job import QuantizeJob, run_job
    from stages.quant.launch import error_file, result_file

    path = Path((argv if argv is not None else sys.argv[1:])[0])
    _wait_for(path)
    job = QuantizeJob.load(path)
    comm, device = init_from_env(torch.device(job.device).type)
    job = replace(job, device=str(device))
    try:
        metrics = run_job(job, comm, log=(lambda m: print(m, flush=True)) if comm.is_main else (lambda m: None),
                          after_block=_stop_if_orphaned)
        if comm.is_main:
            _write_json(result_file(path), metrics)
        return 0
    except (ConfigError, InputError) as exc:
        _write_json(error_file(path, comm.rank), {"message": str(exc)})
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        comm.close()


if __name__ == "__main__":
    raise SystemExit(main())
