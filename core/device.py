"""Which torch device a requested name means on this machine."""

from __future__ import annotations

from core.errors import ConfigError


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
