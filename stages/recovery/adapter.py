"""The PEFT LoRA adapter folder: `adapter_config.json` + `adapter_model.safetensors`, written and read without PEFT.

Files as PEFT writes them for a causal LM: tensor names
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]; the config
names peft_type LORA, task_type CAUSAL_LM, r, lora_alpha and the target module names (matched
by PEFT as "the module name equals it or ends with '.' + it"). `PeftModel.from_pretrained`
loads the folder onto the packed checkpoint; the benchmark's torch backend reads it with
`read_adapter` and adds the low-rank term to its kernels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from core.errors import InputError

ADAPTER_DIR = "adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass
class LoraAdapter:
    """Per module: A [r, in], B [out, r]; the output gains scaling * (x @ A^T) @ B^T."""

    rank: int
    alpha: float
    target_modules: list[str]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def adapter_config(adapter: LoraAdapter, base_model: str) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(adapter.target_modules), "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def write_adapter(folder: Path, adapter: LoraAdapter, base_model: str, dtype: torch.dtype = torch.float32) -> list[str]:
    """Write the two files into `folder` (each to a temporary name, then renamed). Returns the file names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in sorted(adapter.weights.items()):
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.detach().to(dtype).contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.detach().to(dtype).contiguous().cpu()
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_FILE)
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(adapter_config(adapter, base_model), indent=2) + "\n")
    os.replace(tmp, folder / CONFIG_FILE)
    return [CONFIG_FILE, WEIGHTS_FILE]


def read_adapter(folder: Path) -> LoraAdapter:
    """Read an adapter folder (ours or any plain PEFT LoRA adapter without per-module ranks)."""
    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise InputError(f"{folder} is not a PEFT adapter folder: {name} is missing")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise InputError(f"{folder}: only plain LoRA adapters are supported (peft_type LORA, no DoRA, "
                         "no per-module rank/alpha patterns)")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX):-len(".lora_A.weight")] if key.startswith(PREFIX) else key
            weights[module] = (a, tensors[key.replace(".lora_A.", ".lora_B.")])
    targets = cfg.get("target_modules") or []
    return LoraAdapter(int(cfg["r"]), float(cfg["lora_alpha"]), list(targets) if isinstance(targets, list) else [targets],
                       weights)


def read_adapter_config(folder: Path | str) -> dict:
    return json.loads((Path(folder) / CONFIG_FILE).read_text())


# vLLM's LoRAConfig.max_lora_rank takes one of these values; an adapter needs one >= its rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise InputError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def apply_adapter_with_peft(model: Any, folder: Path | str) -> Any:
    """`model` with the adapter folder loaded by PEFT (LoRA layers injected in place; the model object is returned)."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise InputError("the packed checkpoint has a LoRA adapter (recover.mode=lora), which needs the peft "
                         "package: pip install peft==0.21.2") from exc
    wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    return wrapped.base_model.model.eval()


def find_adapter(pack_artifact: Path) -> Optional[Path]:
    """The adapter folder beside a pack artifact's checkpoint, or None when the run has no adapter."""
    folder = Path(pack_artifact) / ADAPTER_DIR
    return folder if (folder / CONFIG_FILE).is_file() else None
