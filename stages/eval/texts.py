"""The text the perplexity evaluator scores: the held-out novel, a local file, or a hub dataset."""

from __future__ import annotations

from pathlib import Path

from core.errors import ConfigError
from core.schema import PerplexityConfig
from stages.eval.taskdata import read_heldout_text

HELDOUT = "persuasion"


def text_kind(cfg: PerplexityConfig) -> str:
    """"heldout", "file" or "dataset" for eval.perplexity.text."""
    if cfg.text == HELDOUT:
        return "heldout"
    if Path(cfg.text).expanduser().is_file():
        return "file"
    return "dataset"


def check_text_source(cfg: PerplexityConfig, offline: bool) -> None:
    """ConfigError for a text that is neither shipped, a file, nor reachable (a dataset while offline)."""
    if text_kind(cfg) != "dataset":
        return
    if Path(cfg.text).expanduser().is_dir() or cfg.text.startswith(("/", "./", "../", "~")):
        raise ConfigError("eval.perplexity.text", cfg.text, f"{HELDOUT}, a text file, or a Hugging Face dataset name",
                          "point it at an existing .txt file", problem="is not a text file")
    if offline:
        raise ConfigError("eval.perplexity.text", cfg.text,
                          f"{HELDOUT} (shipped) or a local text file while offline",
                          "a hub dataset needs network: add run.offline=false on a machine with internet access; "
                          f"offline, use eval=local (eval.perplexity.text={HELDOUT})", problem="needs network")


def load_perplexity_text(cfg: PerplexityConfig) -> str:
    """The whole text to score; a dataset's records are joined by blank lines (GPTQ's wikitext2 recipe)."""
    kind = text_kind(cfg)
    if kind == "heldout":
        return read_heldout_text()
    if kind == "file":
        return Path(cfg.text).expanduser().read_text(encoding="utf-8")
    import datasets

    data = datasets.load_dataset(cfg.text, cfg.dataset_config, split=cfg.split)
    if cfg.text_field not in data.column_names:
        raise ConfigError("eval.perplexity.text_field", cfg.text_field, f"a column of {cfg.text}: "
                          f"{', '.join(data.column_names)}", f"e.g. eval.perplexity.text_field={data.column_names[0]}",
                          problem="is not a column")
    return "\n\n".join(data[cfg.text_field])
