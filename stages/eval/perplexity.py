"""Perplexity over rolling windows of one long token stream (torch + transformers only).

GPU benchmark scripts import this module directly, so it must not import lm-eval, Hydra,
MLflow or datasets.

Windowing (the Hugging Face "perplexity of fixed-length models" scheme): windows start at
0, stride, 2*stride, ... and end at min(begin + seqlen, N); the last window ends at N. Each
token at position t >= 1 is scored exactly once, in the first window that contains t and
has at least one token of context before it, conditioned on everything from that window's
start. With stride == seqlen the windows do not overlap and the first token of each window
is not scored (it has no context); with stride < seqlen every token after the first is
scored, with at least seqlen - stride tokens of context once the first window is past.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch


@dataclass(frozen=True)
class Window:
    """Token positions [begin, end) fed to the model; targets are positions [first_target, end)."""

    begin: int
    end: int
    first_target: int

    @property
    def n_targets(self) -> int:
        return self.end - self.first_target


def tokenize_text(tokenizer: Any, text: str, add_bos: bool = False) -> torch.Tensor:
    """Token ids of a whole text as one stream, with an optional BOS token at its start.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the text to score.
        add_bos: prepend `tokenizer.bos_token_id` once (models trained with a BOS at position 0).

    Returns:
        int64 tensor [N].
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id; set add_bos=False")
        ids = [tokenizer.bos_token_id] + list(ids)
    return torch.tensor(ids, dtype=torch.long)


def make_windows(n_tokens: int, seqlen: int, stride: int, max_windows: Optional[int] = None) -> list[Window]:
    """Rolling windows over a stream of `n_tokens` (see the module docstring).

    Args:
        n_tokens: stream length N (>= 2).
        seqlen: window length (>= 2).
        stride: step between window starts, 1 <= stride <= seqlen.
        max_windows: keep only the first this many windows (None: all).

    Returns:
        Windows in stream order; windows with no target are left out.
    """
    if seqlen < 2 or not 1 <= stride <= seqlen:
        raise ValueError(f"need seqlen >= 2 and 1 <= stride <= seqlen, got seqlen={seqlen} stride={stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}")
    windows: list[Window] = []
    begin, prev_end = 0, 0
    while max_windows is None or len(windows) < max_windows:
        end = min(begin + seqlen, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
        if end == n_tokens:
            break
        prev_end, begin = end, begin + stride
    return windows


def _batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of the same length and target count, at most batch_size at a time."""
    batch: list[Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or (w.end - w.begin, w.n_targets) !=
                      (batch[0].end - batch[0].begin, batch[0].n_targets)):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        return False


def _target_logits(model: Any, inputs: torch.Tensor, n_targets: int, trimmed: bool) -> torch.Tensor:
    """Logits [B, n_targets, V] at the positions that predict the last n_targets tokens."""
    if trimmed:  # only compute the lm_head where it is needed (large vocabularies, long windows)
        logits = model(input_ids=inputs, logits_to_keep=n_targets + 1).logits
    else:
        logits = model(input_ids=inputs).logits
    return logits[:, -(n_targets + 1):-1, :]


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, seqlen: int, stride: int, batch_size: int = 1,
               device: str | torch.device = "cpu", max_windows: Optional[int] = None,
               on_window: Optional[Callable[[int, int], None]] = None) -> dict[str, float]:
    """Perplexity of a causal LM over rolling windows of a token stream.

    Args:
        model: a causal LM (`model(input_ids=...).logits` of shape [B, T, V]), already on `device`.
        ids: int tensor [N] (e.g. from `tokenize_text`).
        seqlen: window length in tokens.
        stride: step between window starts (<= seqlen; smaller = more context per scored token).
        batch_size: windows per forward pass.
        device: where to put the inputs.
        max_windows: score only the first this many windows (None: the whole stream).
        on_window: called as on_window(done, total) after each batch (progress).

    Returns:
        dict with ppl (exp of the mean NLL), nll (mean negative log-likelihood per scored token,
        nats), nll_sum (total, nats), tokens (scored tokens), windows (forward windows),
        window_nll_sum / window_tokens (per window, in stream order) and nll_stderr (standard
        error of `nll` with windows as the sampling units, see `window_stderr`; None for one window).
    """
    ids = ids.reshape(-1).long()
    windows = make_windows(int(ids.numel()), seqlen, stride, max_windows)
    trimmed = _accepts_logits_to_keep(model)
    sums: list[float] = []
    counts: list[int] = []
    for batch in _batches(windows, max(1, batch_size)):
        inputs = torch.stack([ids[w.begin:w.end] for w in batch]).to(device)
        n = batch[0].n_targets
        logits = _target_logits(model, inputs, n, trimmed)
        targets = inputs[:, -n:]
        for row in range(len(batch)):  # one row at a time bounds the float32 copy of the logits
            logp = torch.log_softmax(logits[row].float(), dim=-1)
            sums.append(-logp.gather(-1, targets[row].unsqueeze(-1)).double().sum().item())
            counts.append(n)
        if on_window is not None:
            on_window(len(sums), len(windows))
    nll_sum, tokens = sum(sums), sum(counts)
    mean = nll_sum / tokens
    return {"ppl": math.exp(mean), "nll": mean, "nll_sum": nll_sum, "tokens": tokens, "windows": len(windows),
            "window_nll_sum": sums, "window_tokens": counts, "nll_stderr": window_stderr(sums, counts)}


def window_stderr(sums: list[float], counts: list[int]) -> Optional[float]:
    """Standard error of the per-token mean sum(sums) / sum(counts), windows as the sampling units.

    Tokens of one window are not independent, so the windows are the units (the cluster-robust
    standard error of a ratio mean): se = sqrt(k / (k - 1) * sum_w (s_w - m * n_w)^2) / sum_w n_w
    with m the overall mean. For windows of equal length it is stdev(per-window means) / sqrt(k).

    Args:
        sums: per window, the summed quantity (e.g. NLL in nats, or a paired difference of NLLs).
        counts: per window, the scored tokens.

    Returns:
        The standard error, or None with fewer than two windows.
    """
    k = len(sums)
    if k < 2:
        return None
    total = sum(counts)
    mean = sum(sums) / total
    spread = sum((s - mean * n) ** 2 for s, n in zip(sums, counts))
    return math.sqrt(k / (k - 1) * spread) / total


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Total NLL (nats) over a text, expressed in bits per UTF-8 byte of that text."""
    return nll_sum / (n_bytes * math.log(2))
