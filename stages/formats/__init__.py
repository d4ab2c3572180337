"""Packed checkpoint formats and their loader.

gptq.py        GPTQ layout (qweight/qzeros/scales/g_idx), v1 and v2, `pack_gptq` / `pack_gptq_v2`
auto_round.py  Intel auto-round's native format and `pack_auto_round`
qlinear.py     `load_quantized_model`: a packed folder back as a transformers model (QuantLinear)
source.py      reading the qstate and the source model's files; input checks
writer.py      the shared folder writer (shards, config files, atomic commit)
choice.py      pack.format=auto: the exact layout for the run's schemes
compat.py      which engines/kernels load a checkpoint, and the pack-time exactness check

This module itself stays torch-free so config validation can use `parse_size` cheaply.
"""

from __future__ import annotations

import re

from core.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, key: str = "pack.max_shard_size") -> int:
    """'4GB' -> 4_000_000_000, '500MiB' -> 524_288_000, 1000 -> 1000 bytes (Hugging Face conventions).

    Raises:
        ConfigError naming `key` for anything else.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text > 0:
            return text
        raise ConfigError(key, text, "a positive size such as 4GB, 500MB or 2GiB", f"e.g. {key}=4GB")
    m = _SIZE_RE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(key, text, "a size such as 4GB, 500MB or 2GiB", f"e.g. {key}=4GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
