"""lm-eval glue: what model is scored (EvalTarget), the backends that wrap it, and the task run."""

from __future__ import annotations

import gc
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from core.errors import ConfigError, InputError
from core.schema import EvalConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def check_tokenizer_files(path: str | Path, what: str) -> None:
    """Raise InputError when a local model folder holds no tokenizer files.

    Args:
        path: a model folder (hub ids, which are not local folders, are left alone).
        what: how to name the folder in the message.
    """
    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{what} {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                         "save the tokenizer next to the weights (tokenizer.save_pretrained(folder)) "
                         "or re-run the pack stage, which copies it")


@dataclass
class EvalTarget:
    """The model being scored: a folder plus loaders; the torch model is loaded at most once.

    Args:
        path: folder (or hub id) with config and tokenizer: the packed checkpoint or the model.
        load_model: () -> torch model on the target device, in eval mode.
        load_tokenizer: () -> tokenizer.
        device: "cpu" / "cuda:N".
        dtype: torch dtype name, e.g. "bfloat16".
        quantized: whether `path` is a packed quantized checkpoint.
    """

    path: str
    load_model: Callable[[], Any]
    load_tokenizer: Callable[[], Any]
    device: str
    dtype: str
    quantized: bool = False
    trust_remote_code: bool = False
    adapter: Optional[str] = None  # a PEFT LoRA adapter folder applied on top (recover.mode=lora)
    _model: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    def model(self) -> Any:
        if self._model is None:
            self._model = self.load_model()
        return self._model

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.load_tokenizer()
        return self._tokenizer

    def release(self) -> None:
        """Drop the torch model (before another engine loads the same weights)."""
        self._model = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def build_hf_lm(target: EvalTarget, cfg: EvalConfig) -> Any:
    """lm-eval's HFLM around the already loaded model object (packed checkpoint or baseline)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=target.model(), tokenizer=target.tokenizer(), batch_size=cfg.batch_size,
                max_length=cfg.max_length)


def check_vllm_available(device: str) -> None:
    """ConfigError unless lm-eval's vLLM model can run here (vllm importable, a CUDA device)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("eval.backend", "vllm", "hf, or vllm once the vllm package is installed",
                          "install vLLM on a CUDA machine (see docs/gpu.md) or use eval.backend=hf",
                          problem="is not available (vllm is not installed)")
    if not device.startswith("cuda"):
        raise ConfigError("eval.backend", "vllm", "hf on a CPU-only run", "use eval.backend=hf or run.device=cuda",
                          problem=f"needs a CUDA device (run.device resolved to {device})")


def build_vllm_lm(target: EvalTarget, cfg: EvalConfig) -> Any:
    """lm-eval's vLLM model over the folder (vLLM reads the GPTQ quantization_config itself)."""
    check_vllm_available(target.device)
    from lm_eval.models.vllm_causallms import VLLM

    target.release()  # vLLM allocates most of the GPU; free the torch copy first
    lora = {}
    if target.adapter is not None:  # vLLM's LoRA layers wrap any quantized linear method (GPTQ, AWQ, Marlin)
        from stages.recovery.adapter import read_adapter_config, vllm_max_lora_rank

        lora = {"lora_local_path": target.adapter,
                "max_lora_rank": vllm_max_lora_rank(int(read_adapter_config(target.adapter)["r"]))}
    return VLLM(pretrained=target.path, tokenizer=target.path, dtype=target.dtype, batch_size=cfg.batch_size,
                max_length=cfg.max_length, trust_remote_code=target.trust_remote_code,
                enforce_eager=cfg.vllm_enforce_eager, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                **lora)


def close_lm(lm: Any) -> None:
    """Stop a vLLM engine's core process (its GPU memory) once the tasks ran; nothing to do for hf."""
    engine = getattr(getattr(getattr(lm, "model", None), "llm_engine", None), "engine_core", None)
    if engine is not None and hasattr(engine, "shutdown"):
        engine.shutdown()


def lm_eval_limit(limit: Optional[float]) -> Optional[float | int]:
    """eval.limit as lm-eval wants it: an int count, or a float fraction below 1."""
    if limit is None or limit < 1:
        return limit
    return int(limit)


def run_lm_eval(lm: Any, task_manager: Any, cfg: EvalConfig) -> dict[str, Any]:
    """Run cfg.tasks through lm_eval.simple_evaluate (no per-sample logs kept).

    Args:
        lm: an lm-eval LM (from a backend builder).
        task_manager: an lm-eval TaskManager (stages.eval.tasks).
        cfg: task list, num_fewshot, limit.

    Returns:
        lm-eval's results dict ("results", "n-samples", "configs", versions, ...).
    """
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                                   limit=lm_eval_limit(cfg.limit), task_manager=task_manager,
                                   log_samples=False)
