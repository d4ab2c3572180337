"""One attempt of the quantize stage in its work folder: in the pipeline's process, or as one rank of a torchrun launch.

`QuantizeJob` is everything an attempt needs, as JSON: the stage writes it for a data-parallel
launch and every rank reads it (stages.quant.worker). `run_job` streams the model from its
safetensors shards (stages.quant.stream: a meta skeleton, one block in memory at a time),
replays the blocks an earlier attempt finished (their files in blocks/), quantizes the rest;
rank 0 alone writes: each finished block's file, then qstate.safetensors + layers.json
(merged from the block files, stages.quant.progress) and block_metrics.json.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

from core.schema import QuantScheme, quant_config

BLOCK_METRICS_FILE = "block_metrics.json"


@dataclass
class QuantizeJob:
    """What one attempt needs (paths are absolute; `device` is this process's: ranks use cuda:LOCAL_RANK)."""

    workdir: str
    model_path: str  # a local model folder or a hub id
    revision: Optional[str]
    trust_remote_code: bool
    calib_dir: Optional[str]  # the calibrate artifact (None for methods without calibration)
    device: str
    dtype: str  # torch dtype name of the tuning weights
    quant: dict[str, Any]
    seed: int
    progress: bool
    resumed: bool

    def quant_config(self) -> QuantScheme:
        return quant_config(**self.quant)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "QuantizeJob":
        data = json.loads(Path(path).read_text())
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def model_folder(path: str, revision: Optional[str]) -> Path:
    """A local folder as is; a hub id through the Hugging Face cache (downloading only when online)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    return Path(snapshot_download(repo_id=str(path), revision=revision, allow_patterns=patterns))


def open_source(job: QuantizeJob) -> Any:
    """The model as a checked StreamedBlocks over its shards (stages.quant.stream)."""
    import torch
    from transformers import AutoConfig

    from stages.quant.stream import open_model_folder

    folder = model_folder(job.model_path, job.revision)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=job.trust_remote_code)
    return open_model_folder(folder, config, getattr(torch, job.dtype), job.trust_remote_code)


def _merge_resumed(block_metrics: list[dict], done: Any) -> None:
    for m in block_metrics:
        if m["block"] in done:
            m.update({k: v for k, v in done.metrics(m["block"]).items() if k not in m})


def run_job(job: QuantizeJob, comm: Any = None, log: Callable[[str], None] = print,
            on_block: Optional[Callable[[int, dict], None]] = None,
            after_block: Optional[Callable[[], None]] = None) -> dict[str, float]:
    """Quantize into job.workdir (see the module docstring).

    Args:
        comm: the data-parallel group (stages.quant.distributed); None = one process.
        on_block: rank 0: callback(index, metrics) after each newly written block file.
        after_block: every rank: called between blocks (e.g. to stop when the launcher is gone).
    Returns:
        The run's metrics (seconds_total, num_layers, peak_gpu_mem_gb on CUDA).
    """
    import torch

    from stages.calibrate import load_calibration
    from stages.quant.distributed import LOCAL
    from stages.quant.driver import quantize_model, quantizer_class
    from stages.quant.progress import FinishedBlocks, HEAD_FILE, PROGRESS_DIR, finished_indices, merge_qstate
    from stages.quant.progress import save_block, save_layers

    comm = comm or LOCAL
    cfg, workdir = job.quant_config(), Path(job.workdir)
    indices = comm.broadcast_object(finished_indices(workdir) if job.resumed and comm.is_main else [])
    done = FinishedBlocks(workdir, indices)
    if indices:
        log(f"[quantize] resuming: blocks {indices} were finished by an earlier attempt")
    input_ids = load_calibration(Path(job.calib_dir)) if quantizer_class(cfg).uses_calibration else None
    source = open_source(job)

    def on_block_done(index: int, result: Any, seconds: float) -> None:
        if comm.is_main:
            save_block(workdir, index, result, seconds)
            if on_block is not None:
                on_block(index, {**result.metrics, "seconds": seconds})
        if after_block is not None:
            after_block()

    torch.manual_seed(job.seed)
    result = quantize_model(source, input_ids, cfg, torch.device(job.device), seed=job.seed,
                            progress=job.progress and comm.is_main, done=done, on_block_done=on_block_done,
                            log=log, comm=comm, keep_layers=False)
    _merge_resumed(result.block_metrics, done)
    if comm.is_main:
        if result.layers:  # the quantized lm_head (the blocks are in their files already)
            save_layers(workdir / PROGRESS_DIR / HEAD_FILE, result.layers, {})
        merge_qstate(workdir, result.meta["blocks"], result.meta["num_blocks"], result.meta)
        (workdir / BLOCK_METRICS_FILE).write_text(json.dumps(result.block_metrics, indent=2))
        shutil.rmtree(workdir / PROGRESS_DIR, ignore_errors=True)
    comm.barrier()
    return result.metrics
