"""What a benchmark backend is asked to run: the target folder and the resolved options."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from stages.bench.workload import Workload

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass(frozen=True)
class BenchTarget:
    """A model folder to benchmark: the packed checkpoint (QUANTIZED) or the unquantized model (BASELINE)."""

    path: str
    variant: str  # core.context.QUANTIZED | BASELINE
    trust_remote_code: bool = False
    adapter: Optional[str] = None  # a PEFT LoRA adapter folder to apply (recover.mode=lora)

    def config(self) -> dict[str, Any]:
        return json.loads((Path(self.path) / "config.json").read_text())


@dataclass(frozen=True)
class BenchOptions:
    """Backend settings after `auto` values are resolved for the device (see stages.benchmark)."""

    device: str  # "cpu" or "cuda:N"
    dtype: str  # torch dtype name
    compile: bool = False
    cuda_graphs: bool = False
    linear_kernel: str = "auto"
    kernel_tuning: str = "full"  # full | quick
    kernel_batch1_weight: float = 1.0  # weight of batch 1 in auto's one-format-per-group choice
    measure_bf16_kernels: bool = False
    gpu_memory_utilization: float = 0.85
    vllm_enforce_eager: bool = False
    vllm_cudagraph_sizes: bool = True  # capture graphs only for the benchmark's batch sizes (faster start)
    vllm_timeout_s: int = 1800


class Backend(Protocol):
    name: str

    def run(self, target: BenchTarget, workload: Workload, options: BenchOptions,
            log: Callable[[str], None]) -> dict[str, Any]: ...


def special_token_ids(config: dict[str, Any]) -> set[int]:
    """bos/eos/pad ids named in a config.json (ints or lists), kept out of the prompts."""
    out: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int):
                out.add(v)
    return out


def folder_size(path: str) -> dict[str, int]:
    """Bytes on disk of a model folder: all files, and the weight files alone."""
    files = [p for p in Path(path).iterdir() if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    weights = sum(p.stat().st_size for p in files if p.suffix in WEIGHT_SUFFIXES)
    return {"size_on_disk_bytes": total, "weights_on_disk_bytes": weights}


def text_vocab_size(config: dict[str, Any]) -> int:
    cfg = config.get("text_config", config)
    return int(cfg["vocab_size"])
