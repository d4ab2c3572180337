"""Calibrate stage: sample `nsamples` token sequences of `seqlen` tokens from a text corpus.

Core: `sample_calibration(texts, tokenizer, cfg) -> LongTensor[nsamples, seqlen]` (and
`draw_calibration`, which also returns the counts the manifest reports). Two sampling modes
(`calib.mode`, registry `stages.registry.CALIB_MODES`):

* `doc_prefix` (the reference AutoRound behaviour): documents are visited in an order shuffled
  with `calib.seed`; each document with at least seqlen tokens gives one sample, its first seqlen
  tokens; shorter documents are dropped, and so is a sample in which one token fills more than
  half of the positions (padding-like runs). Documents are tokenized one at a time and only until
  nsamples are found.
* `random_window` (GPTQ style): all documents are tokenized and joined in corpus order with the
  tokens of a blank line ("\\n\\n") between them; each sample is the window of seqlen tokens at a
  start drawn uniformly with `calib.seed` (windows may overlap; repetitive windows are redrawn).

With `calib.add_bos` the tokenizer's BOS token is the first position and the text fills the other
seqlen - 1. Text is tokenized without special tokens. Randomness comes only from Python's
`random.Random(seed)`, whose sequences are the same on every platform, so one config gives
byte-identical samples everywhere (for the same tokenizer and corpus).

Stage I/O (`run`): `calib.safetensors` with `input_ids` int32 [nsamples, seqlen], `samples.json`
(where each sample came from) and metrics (documents used / too short / repetitive, unique tokens,
seed). `preflight` runs every input check before any model work.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from core.errors import ConfigError, InputError
from core.schema import CalibConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

    from core.context import StageContext, StageResult
    from core.models import ModelHandle
    from core.schema import PipelineConfig

CALIB_FILE = "calib.safetensors"
SAMPLES_FILE = "samples.json"
WINDOW_SEPARATOR = "\n\n"
# random_window redraws a repetitive window; give up after this many draws per requested sample
MAX_DRAWS_PER_SAMPLE = 20

Encode = Callable[[str], list]


@dataclass
class CalibSample:
    """Sampled token ids and what it took to find them."""

    input_ids: "torch.Tensor"  # int64 [nsamples, seqlen]
    documents: int  # documents in the corpus
    documents_examined: int = 0  # tokenized (doc_prefix stops once nsamples are found)
    documents_too_short: int = 0  # examined and shorter than the sample length
    samples_repetitive: int = 0  # candidate samples dropped: one token fills more than half
    corpus_tokens: int = 0  # random_window: tokens of the joined corpus
    rows_document: list[int] = field(default_factory=list)  # doc_prefix: document index of each row
    rows_start: list[int] = field(default_factory=list)  # random_window: token offset of each row
    documents_used: int = 0  # documents that give tokens to at least one row


def is_repetitive(row: Sequence[int]) -> bool:
    """True when one token id fills more than half of the row (e.g. padding or a repeated character)."""
    return len(row) > 2 and Counter(row).most_common(1)[0][1] > len(row) // 2


def _text_length(cfg: CalibConfig, bos_id: Optional[int]) -> int:
    return cfg.seqlen - (1 if bos_id is not None else 0)


def _row(ids: Sequence[int], bos_id: Optional[int]) -> list[int]:
    return ([bos_id] if bos_id is not None else []) + [int(i) for i in ids]


def _too_few(cfg: CalibConfig, found: int, detail: str) -> ConfigError:
    alternatives = "lower calib.nsamples or calib.seqlen"
    if cfg.mode == "doc_prefix":
        alternatives += ", use calib.mode=random_window (windows over the joined text)"
    return ConfigError("calib.nsamples", cfg.nsamples, f"only {found} usable: {detail}",
                       f"{alternatives}, or calibrate on more text (docs/calibration.md)",
                       problem="is more than the corpus can give")


def sample_doc_prefix(texts: Sequence[str], encode: Encode, bos_id: Optional[int], cfg: CalibConfig) -> CalibSample:
    """First seqlen tokens of each long-enough document, documents in seeded shuffled order.

    Args:
        texts: the corpus documents.
        encode: text -> token ids (no special tokens).
        bos_id: BOS token id to put first, or None.
        cfg: nsamples, seqlen, seed.

    Returns:
        CalibSample; raises ConfigError when fewer than nsamples documents are usable.
    """
    import torch

    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    need = _text_length(cfg, bos_id)
    out = CalibSample(torch.empty(0), documents=len(texts))
    rows: list[list[int]] = []
    for index in order:
        if len(rows) == cfg.nsamples:
            break
        ids = encode(texts[index])
        out.documents_examined += 1
        if len(ids) < need:
            out.documents_too_short += 1
            continue
        row = _row(ids[:need], bos_id)
        if is_repetitive(row):
            out.samples_repetitive += 1
            continue
        rows.append(row)
        out.rows_document.append(index)
    if len(rows) < cfg.nsamples:
        raise _too_few(cfg, len(rows), f"{len(texts)} documents, {out.documents_too_short} shorter than "
                                       f"{need} tokens (calib.seqlen={cfg.seqlen}), {out.samples_repetitive} repetitive")
    out.input_ids = torch.tensor(rows, dtype=torch.long)
    out.documents_used = len(rows)
    return out


def _join_corpus(texts: Sequence[str], encode: Encode) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """Token ids of the documents joined with the separator, and each document's [start, end) span."""
    import numpy as np

    separator = np.asarray(encode(WINDOW_SEPARATOR), dtype=np.int64)
    parts: list[np.ndarray] = []
    starts, ends, offset = [], [], 0
    for i, text in enumerate(texts):
        if i:
            parts.append(separator)
            offset += len(separator)
        parts.append(np.asarray(encode(text), dtype=np.int64))
        starts.append(offset)
        offset += len(parts[-1])
        ends.append(offset)
    corpus = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return corpus, np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def _documents_touched(starts: "np.ndarray", ends: "np.ndarray", windows: list[int], length: int) -> int:
    """How many documents share at least one token with a window [w, w + length)."""
    import numpy as np

    touched = np.zeros(len(starts), dtype=bool)
    for w in windows:
        touched |= (starts < w + length) & (ends > w) & (ends > starts)
    return int(np.count_nonzero(touched))


def sample_random_window(texts: Sequence[str], encode: Encode, bos_id: Optional[int],
                         cfg: CalibConfig) -> CalibSample:
    """Windows of seqlen tokens at seeded uniform random starts over the joined corpus.

    Args:
        texts: the corpus documents (joined in this order with a blank line between them).
        encode: text -> token ids (no special tokens).
        bos_id: BOS token id to put first, or None.
        cfg: nsamples, seqlen, seed.

    Returns:
        CalibSample; raises ConfigError when the whole corpus is shorter than one window.
    """
    import torch

    corpus, doc_starts, doc_ends = _join_corpus(texts, encode)
    need = _text_length(cfg, bos_id)
    out = CalibSample(torch.empty(0), documents=len(texts), documents_examined=len(texts), corpus_tokens=len(corpus))
    if len(corpus) < need:
        raise ConfigError("calib.seqlen", cfg.seqlen, f"the joined corpus of {len(texts)} documents has only "
                          f"{len(corpus)} tokens, fewer than one window of {need}",
                          "lower calib.seqlen or calibrate on more text (docs/calibration.md)",
                          problem="is longer than the whole corpus")
    rng = random.Random(cfg.seed)
    rows: list[list[int]] = []
    for _ in range(MAX_DRAWS_PER_SAMPLE * cfg.nsamples):
        if len(rows) == cfg.nsamples:
            break
        start = rng.randint(0, len(corpus) - need)
        row = _row(corpus[start:start + need].tolist(), bos_id)
        if is_repetitive(row):
            out.samples_repetitive += 1
            continue
        rows.append(row)
        out.rows_start.append(start)
    out.documents_used = _documents_touched(doc_starts, doc_ends, out.rows_start, need)
    if len(rows) < cfg.nsamples:
        raise InputError(f"calib: {out.samples_repetitive} of {out.samples_repetitive + len(rows)} random windows were "
                         "repetitive (one token fills more than half); the corpus is mostly one repeated token: "
                         "use other text")
    out.input_ids = torch.tensor(rows, dtype=torch.long)
    return out


def _bos_id(tokenizer: Any, cfg: CalibConfig) -> Optional[int]:
    if not cfg.add_bos:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ConfigError("calib.add_bos", True, "false for this tokenizer: it defines no BOS token",
                          "set calib.add_bos=false", problem="cannot be used")
    return int(bos)


def draw_calibration(texts: Sequence[str], tokenizer: Any, cfg: CalibConfig) -> CalibSample:
    """Sample calibration token ids with the sampler of `cfg.mode`, keeping the counts.

    Args:
        texts: the corpus documents.
        tokenizer: a Hugging Face tokenizer (called with add_special_tokens=False; bos_token_id).
        cfg: the calibration config.

    Returns:
        CalibSample with input_ids int64 [cfg.nsamples, cfg.seqlen].
    """
    from stages.registry import CALIB_MODES, resolve

    sampler = resolve(CALIB_MODES, "calib.mode", cfg.mode)
    bos_id = _bos_id(tokenizer, cfg)

    def encode(text: str) -> list:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    return sampler(texts, encode, bos_id, cfg)


def sample_calibration(texts: Sequence[str], tokenizer: Any, cfg: CalibConfig) -> "torch.Tensor":
    """Calibration token ids, LongTensor [cfg.nsamples, cfg.seqlen] (see the module docstring).

    Args:
        texts: the corpus documents.
        tokenizer: a Hugging Face tokenizer.
        cfg: the calibration config (mode, nsamples, seqlen, seed, add_bos).

    Returns:
        int64 tensor [nsamples, seqlen]; the same inputs give the same tensor on any machine.
    """
    return draw_calibration(texts, tokenizer, cfg).input_ids


# -- files --------------------------------------------------------------------------------

def save_calibration(path: Path, input_ids: "torch.Tensor") -> None:
    """Write `input_ids` as int32 [n, seqlen] into a safetensors file (no metadata: byte-stable)."""
    import torch
    from safetensors.torch import save_file

    save_file({"input_ids": input_ids.to(torch.int32).contiguous()}, str(path))


def load_calibration(path: Path | str) -> "torch.Tensor":
    """Read a calibration file (or the calibrate artifact folder) back as int64 [n, seqlen]."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / CALIB_FILE
    return load_file(str(path))["input_ids"].to(torch.long)


# -- stage --------------------------------------------------------------------------------

def model_context_length(model: "ModelHandle") -> Optional[int]:
    """The model's maximum positions (max_position_embeddings of its text config), if it declares one."""
    from core.models import load_config

    config = load_config(model)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def check_context(cfg: CalibConfig, model: "ModelHandle") -> None:
    """calib.seqlen must fit the model's context."""
    limit = model_context_length(model)
    if limit is not None and cfg.seqlen > limit:
        raise ConfigError("calib.seqlen", cfg.seqlen, f"at most the model's context: max_position_embeddings={limit} "
                          f"for {model.name}", f"e.g. calib.seqlen={min(2048, limit)}",
                          problem="is longer than the model's context")


def preflight(cfg: "PipelineConfig", model: Optional["ModelHandle"], spec: Any = None) -> None:
    """Every calibration input check, before any model work: keys, files, fields, context, enough text.

    Args:
        cfg: the pipeline config (reads cfg.calib).
        model: the model handle (its config gives the context length, its tokenizer the token counts).
        spec: the DAG node (unused).
    """
    from core.models import load_tokenizer
    from stages.calib_sources import check_source_keys, load_documents

    check_source_keys(cfg.calib)
    if model is None:
        raise InputError("calibrate needs the model's tokenizer; no model was prepared")
    check_context(cfg.calib, model)
    docs = load_documents(cfg.calib)
    draw_calibration([d.text for d in docs], load_tokenizer(model), cfg.calib)


def calibration_metrics(sample: CalibSample, cfg: CalibConfig) -> dict[str, float]:
    """Manifest/MLflow metrics of a sample: counts of documents, unique tokens, the seed."""
    metrics = {
        "nsamples": sample.input_ids.shape[0], "seqlen": sample.input_ids.shape[1], "seed": cfg.seed,
        "documents": sample.documents, "documents_examined": sample.documents_examined,
        "documents_used": sample.documents_used,
        "documents_too_short": sample.documents_too_short, "samples_repetitive": sample.samples_repetitive,
        "unique_tokens": int(sample.input_ids.unique().numel()),
    }
    if cfg.mode == "random_window":
        metrics["corpus_tokens"] = sample.corpus_tokens
    return metrics


def _origins(sample: CalibSample, docs: Sequence[Any]) -> list[dict[str, Any]]:
    if sample.rows_document:
        return [{"row": r, "document": docs[i].origin} for r, i in enumerate(sample.rows_document)]
    return [{"row": r, "start_token": s} for r, s in enumerate(sample.rows_start)]


def run(ctx: "StageContext") -> "StageResult":
    """Load the corpus, sample it with the model's tokenizer, write calib.safetensors + samples.json."""
    from core.context import StageResult
    from core.models import load_tokenizer
    from stages.calib_sources import load_documents

    cfg = ctx.cfg.calib
    docs = load_documents(cfg)
    ctx.log(f"[calibrate] {len(docs)} documents from calib.source={cfg.source}; sampling {cfg.nsamples} x "
            f"{cfg.seqlen} tokens ({cfg.mode}, seed {cfg.seed})")
    sample = draw_calibration([d.text for d in docs], load_tokenizer(ctx.model), cfg)
    save_calibration(ctx.workdir / CALIB_FILE, sample.input_ids)
    with open(ctx.workdir / SAMPLES_FILE, "w") as f:
        json.dump({"source": cfg.source, "mode": cfg.mode, "seed": cfg.seed, "samples": _origins(sample, docs)}, f,
                  indent=1)
    metrics = calibration_metrics(sample, cfg)
    summary = {"source": cfg.dataset or cfg.source, "mode": cfg.mode, "samples": f"{cfg.nsamples}x{cfg.seqlen}",
               "unique_tokens": metrics["unique_tokens"]}
    return StageResult(metrics=metrics, summary=summary, artifacts=[SAMPLES_FILE])
