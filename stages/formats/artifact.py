"""The pack artifact's contract: where the checkpoint folder and the compatibility report live,
the dtype of the unquantized tensors, and the model evaluate and benchmark score. Every format
writer and every consumer reads these."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from core.context import BASELINE

if TYPE_CHECKING:
    from core.context import StageContext

CHECKPOINT_DIR = "checkpoint"
REPORT_FILE = "compat.json"
SIZE_METRIC = "size_mb"  # the checkpoint folder's size on disk (10^6 bytes), a metric of every pack format


@dataclass(frozen=True)
class ModelUnderTest:
    """What an evaluate or benchmark node scores: the unquantized model (a BASELINE node) or this run's
    packed checkpoint, with what the pack stage left beside it."""

    path: str  # the model folder to load
    quantized: bool
    adapter: Optional[str] = None  # a PEFT LoRA adapter folder beside the checkpoint (recover.mode=lora)
    compat: Optional[dict] = None  # the pack stage's compat.json (which loaders take the checkpoint)


def model_under_test(ctx: "StageContext") -> ModelUnderTest:
    """The model ctx.variant names: ctx.model for a BASELINE node, else the checkpoint in ctx.inputs["pack"]."""
    if ctx.variant == BASELINE:
        return ModelUnderTest(ctx.model.path, quantized=False)
    from stages.recovery.adapter import find_adapter

    pack = Path(ctx.inputs["pack"].path)
    adapter = find_adapter(pack)
    compat = json.loads((pack / REPORT_FILE).read_text()) if (pack / REPORT_FILE).is_file() else None
    return ModelUnderTest(str(checkpoint_dir(pack)), quantized=True, adapter=None if adapter is None else str(adapter),
                          compat=compat)


def checkpoint_dir(pack_artifact_path: Path) -> Path:
    """The checkpoint folder inside a pack artifact (what evaluate/benchmark load)."""
    return Path(pack_artifact_path) / CHECKPOINT_DIR


def checkpoint_dtype(model_dtype: str, source_dtype: Any) -> Any:
    """Dtype of the unquantized tensors (embeddings, norms, lm_head): model.dtype when it names one, else
    (`auto`) the source's own dtype when it is 16-bit, and bfloat16 for a float32 source.

    `auto` does not follow the device (float32 on CPU) so that the same fingerprint always names the
    same files, and a shipped checkpoint never carries float32 copies of its unquantized tensors.
    """
    import torch

    if model_dtype != "auto":
        return getattr(torch, model_dtype)
    return source_dtype if source_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
