"""Files that let an interrupted recover stage resume: the training state and the teacher's top-k cache.

Both live in `progress/` inside the stage's work folder (kept across a crash by the store),
are written to a temporary name and renamed, and are removed once the stage finishes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stages.recovery.losses import TopK
from stages.recovery.trainer import TrainState

PROGRESS_DIR = "progress"
STATE_FILE = "train_state.safetensors"
TOPK_FILE = "teacher_topk.safetensors"
INIT_FILE = "init_metrics.json"
_PARTS = ("param", "exp_avg", "exp_avg_sq")


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_state(folder: Path, state: TrainState) -> None:
    tensors = {}
    for part, values in zip(_PARTS, (state.params, state.exp_avg, state.exp_avg_sq)):
        tensors.update({f"{part}/{name}": t for name, t in values.items()})
    _save(tensors, Path(folder) / PROGRESS_DIR / STATE_FILE,
          {"step": str(state.step), "curve": json.dumps(state.curve)})


def load_state(folder: Path) -> Optional[TrainState]:
    path = Path(folder) / PROGRESS_DIR / STATE_FILE
    if not path.is_file():
        return None
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in _PARTS}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        for key in f.keys():
            part, _, name = key.partition("/")
            parts[part][name] = f.get_tensor(key)
    return TrainState(int(meta["step"]), parts["param"], parts["exp_avg"], parts["exp_avg_sq"],
                      json.loads(meta["curve"]))


def save_topk(folder: Path, cache: TopK) -> None:
    _save({"logp": cache.logp, "index": cache.index, "logp_rest": cache.logp_rest},
          Path(folder) / PROGRESS_DIR / TOPK_FILE)


def load_topk(folder: Path, k: int, shape: tuple[int, int]) -> Optional[TopK]:
    """The cache of an earlier attempt, if it exists and fits (k, [n, seqlen - 1])."""
    path = Path(folder) / PROGRESS_DIR / TOPK_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        cache = TopK(f.get_tensor("logp"), f.get_tensor("index"), f.get_tensor("logp_rest"))
    return cache if tuple(cache.logp.shape) == (*shape, k) else None


def save_init(folder: Path, metrics: dict[str, float]) -> None:
    path = Path(folder) / PROGRESS_DIR / INIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))


def load_init(folder: Path) -> Optional[dict[str, float]]:
    path = Path(folder) / PROGRESS_DIR / INIT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
