"""The pack artifact's contract: where the checkpoint folder and the compatibility report live,
and the dtype of the unquantized tensors. Every format writer and every consumer reads these."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHECKPOINT_DIR = "checkpoint"
REPORT_FILE = "compat.json"


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
