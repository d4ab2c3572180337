"""The benchmark workload (seeded prompt token ids, batches) and the measurement loop.

Both backends run the same thing: for batch size B, the `num_prompts` prompts are served in
ceil(num_prompts / B) batches of exactly B requests (prompt i of batch j is prompt
(j*B + i) mod num_prompts), each generating exactly `output_len` tokens (no early stop).
One *pass* = all batches; `warmup` passes are run first and discarded, then `repeats`
passes are timed and reported as median, min and max.

Per batch the backend reports the time to first token (prefill + first token) and the
total time; from them: output tokens/s = B*output_len / total, requests/s = B / total,
per-token latency (TPOT) = (total - ttft) / (output_len - 1), decode tokens/s =
B*(output_len - 1) / (total - ttft).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch


@dataclass(frozen=True)
class Workload:
    num_prompts: int
    input_len: int
    output_len: int
    batch_sizes: tuple[int, ...]
    warmup: int = 1
    repeats: int = 3
    seed: int = 0

    @property
    def max_len(self) -> int:
        return self.input_len + self.output_len

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        return d


def prompt_token_ids(w: Workload, vocab_size: int, exclude: Iterable[int] = ()) -> torch.Tensor:
    """int64 [num_prompts, input_len], uniform over the vocabulary minus `exclude` (special tokens).

    Deterministic: depends only on (seed, num_prompts, input_len, vocab_size, exclude).
    """
    excluded = torch.tensor(sorted({int(t) for t in exclude if 0 <= int(t) < vocab_size}), dtype=torch.long)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[excluded] = False
    pool = allowed.nonzero().flatten()
    if pool.numel() == 0:
        raise ValueError("no token ids left to build prompts from")
    gen = torch.Generator().manual_seed(w.seed)
    picks = torch.randint(0, pool.numel(), (w.num_prompts, w.input_len), generator=gen)
    return pool[picks]


def batches_for(w: Workload, batch_size: int) -> list[list[int]]:
    """Prompt indices of each batch for one batch size (see module doc)."""
    n = math.ceil(w.num_prompts / batch_size)
    return [[(j * batch_size + i) % w.num_prompts for i in range(batch_size)] for j in range(n)]


@dataclass
class BatchTiming:
    ttft_s: float
    total_s: float


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize_pass(timings: list[BatchTiming], batch_size: int, output_len: int) -> dict[str, float]:
    """Metrics of one pass over all batches of one batch size."""
    total = sum(t.total_s for t in timings)
    requests = batch_size * len(timings)
    decode_s = sum(t.total_s - t.ttft_s for t in timings)
    out = {
        "output_tokens_per_s": requests * output_len / total,
        "requests_per_s": requests / total,
        "ttft_ms": 1000 * statistics.median(t.ttft_s for t in timings),
        "latency_ms": 1000 * statistics.median(t.total_s for t in timings),
    }
    if output_len > 1 and decode_s > 0:
        out["tpot_ms"] = 1000 * decode_s / (len(timings) * (output_len - 1))
        out["decode_tokens_per_s"] = requests * (output_len - 1) / decode_s
    return out


def measure(run_batch: Callable[[list[int]], BatchTiming], w: Workload, batch_size: int,
            on_pass: Optional[Callable[[str, dict], None]] = None) -> dict:
    """Warm-up passes, then `repeats` timed passes -> the record of one batch size.

    Args:
        run_batch: runs one batch (list of prompt indices) and returns its timing.
    Returns:
        {"batch_size", "batches", "requests", "output_tokens", <metric>: {"median","min","max"}, "passes": [...]}
    """
    batches = batches_for(w, batch_size)
    for _ in range(w.warmup):
        for b in batches:
            run_batch(b)
    passes = []
    for r in range(w.repeats):
        passes.append(summarize_pass([run_batch(b) for b in batches], batch_size, w.output_len))
        if on_pass:
            on_pass(f"b{batch_size} pass {r + 1}/{w.repeats}", passes[-1])
    record: dict = {"batch_size": batch_size, "batches": len(batches), "requests": batch_size * len(batches),
                    "output_tokens": batch_size * len(batches) * w.output_len}
    for key in passes[0]:
        record[key] = _stats([p[key] for p in passes])
    record["passes"] = passes
    return record


def speedups(quantized: list[dict], baseline: list[dict], key: str = "output_tokens_per_s") -> dict[int, float]:
    """Per batch size: median `key` of the packed model over the baseline's (same batch sizes only)."""
    base = {r["batch_size"]: r[key]["median"] for r in baseline if key in r}
    return {r["batch_size"]: r[key]["median"] / base[r["batch_size"]]
            for r in quantized if key in r and base.get(r["batch_size"])}
