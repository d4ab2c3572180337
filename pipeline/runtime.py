"""Process-level choices made once by the runner: device, dtype, seeds, environment, logging."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Callable

from core.device import resolve_device
from core.models import offline_env, resolve_dtype
from core.schema import PipelineConfig

log = logging.getLogger("pipeline")


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
