"""A prepared model's handle and the loaders every stage uses (config, tokenizer, weights).

Where the model comes from (hub, local folder, GGUF, random) is the orchestrator's concern
(`pipeline.models`); stages receive a `ModelHandle` and load through these functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelHandle:
    """Where a model can be loaded from with `from_pretrained`, and its identity."""

    name: str
    path: str  # hub id or local folder
    revision: Optional[str]
    fingerprint: str
    trust_remote_code: bool = False


def resolve_dtype(name: str, device: str) -> "torch.dtype":
    """Map model.dtype to a torch dtype; auto = bfloat16 on CUDA, float32 on CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_config(handle: ModelHandle):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(handle.path, revision=handle.revision, trust_remote_code=handle.trust_remote_code)


def load_tokenizer(handle: ModelHandle):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(handle.path, revision=handle.revision, trust_remote_code=handle.trust_remote_code)


def load_model(handle: ModelHandle, dtype: "torch.dtype", device: str = "cpu"):
    """Load the unquantized model in `dtype` on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        handle.path, revision=handle.revision, dtype=dtype, trust_remote_code=handle.trust_remote_code,
    )
    return model.to(device).eval()


def offline_env() -> dict[str, str]:
    """Environment variables that keep Hugging Face libraries off the network."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
