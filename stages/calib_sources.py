"""Where calibration text comes from: document loaders for each `calib.source`.

Every loader takes the `CalibConfig` and returns the corpus as a list of `Document`s (non-empty
texts in a fixed, machine-independent order), or raises one clear `ConfigError`/`InputError`
for a bad input. Loaders never tokenize; `stages.calibrate` samples token sequences from them.

How a text file becomes documents (`calib.text_split`, sources `austen` and `text`):

* `chapter` (default): a line that is only `CHAPTER <n>` / `Chapter <n>` (roman or arabic
  numeral, optional trailing period) starts a new document; lines that are only
  `VOLUME|BOOK|PART <n>` are dropped; the text before the first heading (a title page) is a
  document of its own. A file without chapter headings is one document.
* `paragraph`: every block separated by blank lines is a document.
* `file`: each file is one document.

The Austen corpus vendored in `stages/data/austen/` holds four novels (214 chapters). The fifth,
Persuasion, lives in `stages/data/heldout/` for evaluation; no loader here reads it, and the
`text` source refuses it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from core.errors import ConfigError, InputError
from core.schema import CalibConfig
from core.store import sha256_file

DATA_DIR = Path(__file__).resolve().parent / "data"
AUSTEN_DIR = DATA_DIR / "austen"
AUSTEN_FILES = ("emma.txt", "mansfieldpark.txt", "prideprejudice.txt", "sensesensibility.txt")
HELDOUT_DIR = DATA_DIR / "heldout"
HELDOUT_TEXT = HELDOUT_DIR / "persuasion.txt"

_NUMERAL = r"(?:[IVXLCDM]+|\d+)\.?"
CHAPTER_RE = re.compile(rf"^[ \t]*(?:CHAPTER|Chapter)[ \t]+{_NUMERAL}[ \t]*$", re.MULTILINE)
PART_RE = re.compile(rf"^[ \t]*(?:VOLUME|Volume|BOOK|Book|PART|Part)[ \t]+{_NUMERAL}[ \t]*$\n?", re.MULTILINE)
BLANK_LINES_RE = re.compile(r"\n[ \t]*\n\s*")


@dataclass(frozen=True)
class Document:
    """One document of the corpus: where it came from (for samples.json) and its text."""

    origin: str
    text: str


# -- splitting a text file into documents ------------------------------------------------

def _clean(pieces: list[str]) -> list[str]:
    return [p.strip() for p in pieces if p.strip()]


def split_chapters(text: str) -> list[str]:
    """Documents = chapters (see the module docstring); no headings -> the whole text."""
    return _clean(CHAPTER_RE.split(PART_RE.sub("", text)))


def split_paragraphs(text: str) -> list[str]:
    """Documents = blocks separated by one or more blank lines."""
    return _clean(BLANK_LINES_RE.split(text))


def split_file(text: str) -> list[str]:
    """The whole file is one document."""
    return _clean([text])


def _splitter(cfg: CalibConfig) -> Callable[[str], list[str]]:
    from stages.registry import CALIB_TEXT_SPLITS, resolve

    return resolve(CALIB_TEXT_SPLITS, "calib.text_split", cfg.text_split)


def _read_text(path: Path, shown: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise InputError(f"calib.paths: {shown} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "convert it to UTF-8 or leave it out") from exc


def _empty_file(shown: str) -> ConfigError:
    return ConfigError("calib.paths", shown, "a file with text in it", "fill it or leave it out of calib.paths",
                       problem="is empty")


def _documents_of_files(files: list[tuple[Path, str]], split: Callable[[str], list[str]],
                        named: tuple[str, ...] = ()) -> list[Document]:
    """Documents of each file in order; a file named directly (in `named`) must not be empty."""
    docs: list[Document] = []
    for path, shown in files:
        pieces = split(_read_text(path, shown))
        if not pieces and shown in named:
            raise _empty_file(shown)
        docs += [Document(f"{shown}#{i}", t) for i, t in enumerate(pieces)]
    return docs


# -- finding user files -------------------------------------------------------------------

def _require_paths(cfg: CalibConfig, kind: str) -> None:
    if not cfg.paths:
        raise ConfigError("calib.paths", [], f"one or more {kind} files or folders",
                          "e.g. calib=text calib.paths=[/data/my_corpus]" if kind == "text"
                          else "e.g. calib=jsonl calib.paths=[/data/corpus.jsonl]",
                          problem=f"is required when calib.source={cfg.source}")


def _expand(paths: list[str], suffix: str) -> list[tuple[Path, str]]:
    """Files named in calib.paths (folders searched recursively for `suffix`), in sorted order."""
    files: list[tuple[Path, str]] = []
    for given in paths:
        p = Path(os.path.expanduser(given))
        if p.is_file():
            files.append((p, given))
        elif p.is_dir():
            found = sorted(q for q in p.rglob(f"*{suffix}") if q.is_file())
            if not found:
                raise ConfigError("calib.paths", given, f"a folder holding *{suffix} files (searched recursively)",
                                  f"put {suffix} files there or name the files directly",
                                  problem=f"contains no {suffix} files")
            files += [(q, f"{given.rstrip('/')}/{q.relative_to(p).as_posix()}") for q in found]
        else:
            raise ConfigError("calib.paths", given, "existing files or folders",
                              f"check the path (relative paths start from {Path.cwd()})", problem="does not exist")
    return files


def _refuse_heldout(files: list[tuple[Path, str]]) -> None:
    """The held-out evaluation novel (or a copy of it) must never be calibration text."""
    size = HELDOUT_TEXT.stat().st_size if HELDOUT_TEXT.is_file() else -1
    digest = None
    for path, shown in files:
        if path.resolve() == HELDOUT_TEXT or path.stat().st_size == size:
            digest = digest or sha256_file(HELDOUT_TEXT)
            if sha256_file(path) == digest:
                raise ConfigError("calib.paths", shown, "text other than the held-out evaluation novel",
                                  "leave persuasion.txt out: it is what evaluation scores on",
                                  problem="is the held-out evaluation text")


def _no_text(where: str) -> InputError:
    return InputError(f"calib: {where} holds no text (every document is empty); point calib at a corpus with text")


# -- loaders (registry: stages.registry.CALIB_SOURCES) -------------------------------------

def load_austen_documents(cfg: CalibConfig) -> list[Document]:
    """The four vendored Austen novels (never Persuasion), split by `calib.text_split`."""
    missing = [name for name in AUSTEN_FILES if not (AUSTEN_DIR / name).is_file()]
    if missing:
        raise InputError(f"calib.source=austen: the packaged corpus is incomplete ({', '.join(missing)} missing in "
                         f"{AUSTEN_DIR}); reinstall the package or use calib=text calib.paths=[...]")
    return _documents_of_files([(AUSTEN_DIR / n, n) for n in AUSTEN_FILES], _splitter(cfg))


def load_text_documents(cfg: CalibConfig) -> list[Document]:
    """Local text files and folders (*.txt, recursively), split by `calib.text_split`."""
    _require_paths(cfg, "text")
    files = _expand(cfg.paths, ".txt")
    _refuse_heldout(files)
    docs = _documents_of_files(files, _splitter(cfg), tuple(cfg.paths))
    if not docs:
        raise _no_text(f"calib.paths=[{','.join(cfg.paths)}]")
    return docs


def _jsonl_records(path: Path, shown: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"calib.paths: {shown}:{number} is not valid JSON ({exc.msg}); "
                                 "each line of a JSONL file must be one JSON object") from exc
            if not isinstance(record, dict):
                raise InputError(f"calib.paths: {shown}:{number} is a JSON {type(record).__name__}, not an object; "
                                 "each line must be an object with a text field")
            yield number, record


def _field_error(cfg: CalibConfig, where: str, fields: list[str], problem: str) -> ConfigError:
    example = fields[0] if fields else "text"
    return ConfigError("calib.text_field", cfg.text_field, f"{where} has fields: {', '.join(fields) or '(none)'}",
                       f"e.g. calib.text_field={example}", problem=problem)


def load_jsonl_documents(cfg: CalibConfig) -> list[Document]:
    """Local JSONL files/folders (*.jsonl, recursively): one document per record's `calib.text_field`."""
    _require_paths(cfg, "JSONL")
    files = _expand(cfg.paths, ".jsonl")
    docs: list[Document] = []
    for path, shown in files:
        records = 0
        for number, record in _jsonl_records(path, shown):
            records += 1
            if cfg.text_field not in record:
                raise _field_error(cfg, f"{shown}:{number}", list(record), "is not a field of the JSONL records")
            text = record[cfg.text_field]
            if not isinstance(text, str):
                raise _field_error(cfg, f"{shown}:{number}", [k for k, v in record.items() if isinstance(v, str)],
                                   f"is not text ({type(text).__name__}) in the JSONL records")
            if text.strip():
                docs.append(Document(f"{shown}:{number}", text))
        if records == 0 and shown in cfg.paths:
            raise _empty_file(shown)
    if not docs:
        raise _no_text(f"calib.paths=[{','.join(cfg.paths)}] (field {cfg.text_field})")
    return docs


def _load_dataset(cfg: CalibConfig) -> Any:
    import datasets

    try:
        return datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split, data_files=cfg.data_files)
    except Exception as exc:  # datasets raises many types (connection, missing split/config, missing files)
        offline = " (the pipeline runs offline by default: add run.offline=false to download it)" \
            if os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0") else ""
        raise InputError(f"calib.dataset={cfg.dataset} (config {cfg.dataset_config}, split {cfg.split}) could not be "
                         f"loaded: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{offline}; "
                         "or calibrate offline on the bundled novels with calib=austen calib.mode=random_window "
                         "(any nsamples x seqlen up to about 1M tokens) or on your own text with calib=text "
                         "calib.paths=[...]") from exc


def load_hub_documents(cfg: CalibConfig) -> list[Document]:
    """A dataset through `datasets.load_dataset(dataset, dataset_config, split=...)`, field `calib.text_field`."""
    if not cfg.dataset:
        raise ConfigError("calib.dataset", cfg.dataset, "a Hugging Face dataset name or a local dataset folder",
                          "e.g. calib=pile10k (calib.dataset=NeelNanda/pile-10k)",
                          problem="is required when calib.source=hub")
    ds = _load_dataset(cfg)
    columns = list(ds.column_names)
    if cfg.text_field not in columns:
        raise _field_error(cfg, f"dataset {cfg.dataset}", columns, "is not a field of the dataset")
    dtype = getattr(ds.features[cfg.text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        text_cols = [c for c in columns if getattr(ds.features[c], "dtype", None) in ("string", "large_string")]
        raise _field_error(cfg, f"dataset {cfg.dataset} (text columns)", text_cols,
                           f"is not a text field (its type is {ds.features[cfg.text_field]})")
    name = cfg.dataset.rstrip("/").split("/")[-1]
    docs = [Document(f"{name}[{i}]", t) for i, t in enumerate(ds[cfg.text_field]) if t and t.strip()]
    if not docs:
        raise _no_text(f"calib.dataset={cfg.dataset} (split {cfg.split}, field {cfg.text_field})")
    return docs


def load_documents(cfg: CalibConfig) -> list[Document]:
    """The corpus of `calib.source`, after the checks that the source reads only its own keys."""
    from stages.registry import CALIB_SOURCES, resolve

    check_source_keys(cfg)
    return resolve(CALIB_SOURCES, "calib.source", cfg.source)(cfg)


def check_source_keys(cfg: CalibConfig) -> None:
    """A key that the chosen source would not read is an error, never silently ignored."""
    if cfg.paths and cfg.source not in ("text", "jsonl"):
        raise ConfigError("calib.paths", cfg.paths, "read only by calib.source=text or jsonl",
                          "use calib=text (or calib=jsonl) with these paths, or drop calib.paths",
                          problem=f"is not used by calib.source={cfg.source}")
    if cfg.dataset and cfg.source != "hub":
        raise ConfigError("calib.dataset", cfg.dataset, "read only by calib.source=hub",
                          "use calib.source=hub, or drop calib.dataset (e.g. calib.dataset=null)",
                          problem=f"is not used by calib.source={cfg.source}")


def source_identity(cfg: CalibConfig) -> dict[str, Any]:
    """What identifies the calibration text beyond the config (for the stage fingerprint).

    Returns:
        austen: sha256 of each vendored file; text/jsonl: size and mtime of each file found;
        hub: {} (the dataset name, config and split are already in the config).
    """
    if cfg.source == "austen":
        return {"austen": {n: sha256_file(AUSTEN_DIR / n) for n in AUSTEN_FILES if (AUSTEN_DIR / n).is_file()}}
    if cfg.source in ("text", "jsonl") and cfg.paths:
        files = _expand(cfg.paths, ".txt" if cfg.source == "text" else ".jsonl")
        return {"files": {shown: [p.stat().st_size, p.stat().st_mtime_ns] for p, shown in files}}
    return {}
