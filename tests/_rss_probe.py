"""Run quantize-stage jobs one after another in a fresh process; print the RSS before them and the peak RSS
after each (JSON), for tests/test_stream.py.

  python tests/_rss_probe.py '<[QuantizeJob as JSON, ...]>'
Everything the jobs import is imported first, so `before` covers the interpreter, torch and
transformers. The peak (getrusage's high-water mark) never goes down, so a later job's peak is
only visible where it exceeds the earlier ones: run the job that sets the budget first.
"""

from __future__ import annotations

import json
import resource
import sys

import psutil
import torch
import transformers  # noqa: F401
from transformers.models.llama import modeling_llama  # noqa: F401

import stages.calibrate  # noqa: F401
import stages.quant.autoround  # noqa: F401
import stages.quant.driver  # noqa: F401
import stages.quant.gptq  # noqa: F401
from stages.quant.job import QuantizeJob, run_job


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    before = psutil.Process().memory_info().rss
    peaks = []
    for job in json.loads(argv[0]):
        run_job(QuantizeJob(**job), log=lambda m: None)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"before": before, "peaks": peaks}))


if __name__ == "__main__":
    main(sys.argv[1:])
