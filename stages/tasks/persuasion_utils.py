"""Helpers the local task YAMLs reference with `!function` (lm-eval imports this file by path).

Data lives in data/<task>.jsonl beside this file (built by scripts/build_eval_tasks.py), so the
tasks work from any working directory and never touch the network or the datasets cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def load_split(file: str, **_lm_eval_metadata):
    """A DatasetDict with one `test` split read from data/<file>.

    lm-eval calls a task's custom_dataset with the task metadata and dataset_kwargs as keyword
    arguments; only `file` (from dataset_kwargs) matters here.
    """
    import datasets

    with open(DATA_DIR / file, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def ppl_process_results(doc: dict, results: list) -> dict:
    """Per-document (loglikelihood, weight) pairs for word/byte perplexity and bits per byte."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
