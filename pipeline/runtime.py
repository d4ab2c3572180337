"""Process-level choices made once by the runner: device, dtype, seeds, environment, logging."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Callable

from pipeline.errors import ConfigError
from pipeline.models import offline_env, resolve_dtype
from pipeline.schema import PipelineConfig

log = logging.getLogger("pipeline")


def resolve_device(requested: str) -> str:
    """`auto` -> cuda:0 when available else cpu; an explicit CUDA device must exist."""
    import torch

    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("run.device", requested, "auto or cpu on this machine (no CUDA device is visible)",
                              "e.g. run.device=auto", problem="is not available")
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise ConfigError("run.device", requested, f"cuda:0..cuda:{torch.cuda.device_count() - 1}",
                              "e.g. run.device=cuda:0", problem="does not exist")
        return f"cuda:{index}"
    return "cpu"


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Runtime:
    device: str
    dtype_name: str
    log: Callable[[str], None] = log.info


def setup_runtime(cfg: PipelineConfig, log_fn: Callable[[str], None] = log.info) -> Runtime:
    """Apply the process-wide settings the config asks for and report them."""
    for key, value in (offline_env() if cfg.run.offline else {}).items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = resolve_device(cfg.run.device)
    dtype = str(resolve_dtype(cfg.model.dtype, device)).replace("torch.", "")
    seed_everything(cfg.run.seed)
    rt = Runtime(device=device, dtype_name=dtype, log=log_fn)
    log_fn(f"device={device} dtype={dtype} seed={cfg.run.seed} offline={cfg.run.offline}")
    return rt
