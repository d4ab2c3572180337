"""What the student is trained towards, per batch: the teacher's distribution (cached top-k or on the fly) or the text.

A `TargetSource` (built by a factory registered in stages.registry.RECOVER_LOSSES) hands the
trainer, for a batch of calibration samples, a `BatchTargets` whose `loss(logits, sl)` scores
the student's logits at the flattened positions `sl` of that batch. Positions are
0..seqlen-2 of every sample (each predicts the next token), flattened sample-major.

The top-k cache holds, for every calibration sample, the teacher's top-k log-probabilities,
token ids and rest mass at those positions; it is computed once with the unquantized model
(before that same model object is turned into the student) and saved in the stage's work
folder so a resumed run does not recompute it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from stages.recovery.losses import TopK, kl_full, kl_topk, lm_ce, teacher_topk

# Logits are computed for this many (positions x vocabulary) elements at a time.
LOGIT_CHUNK_ELEMENTS = 1 << 26


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the decoder stack returning last hidden states, the output projection) of a causal LM."""
    return getattr(model, model.base_model_prefix), model.get_output_embeddings()


def hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states [b, T-1, H] at the positions that predict a next token."""
    body, _ = body_and_head(model)
    return body(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]


def chunk_slices(positions: int, vocab: int) -> list[slice]:
    step = max(1, LOGIT_CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(i, min(i + step, positions)) for i in range(0, positions, step)]


class BatchTargets:
    """Targets for one batch; `loss(logits [n, V], sl)` -> sum of the loss over positions sl."""

    def loss(self, logits: torch.Tensor, sl: slice) -> torch.Tensor:  # pragma: no cover - protocol
        raise NotImplementedError


@dataclass
class _LabelTargets(BatchTargets):
    labels: torch.Tensor  # [N]

    def loss(self, logits, sl):
        return lm_ce(logits, self.labels[sl])


@dataclass
class _TopKTargets(BatchTargets):
    topk: TopK

    def loss(self, logits, sl):
        t = self.topk
        return kl_topk(logits, TopK(t.logp[sl], t.index[sl], t.logp_rest[sl]))


@dataclass
class _OnlineTargets(BatchTargets):
    hidden: torch.Tensor  # teacher hidden states [N, H]
    head: nn.Module

    def loss(self, logits, sl):
        with torch.no_grad():
            teacher = self.head(self.hidden[sl])
        return kl_full(logits, teacher)


class TargetSource:
    """Builds BatchTargets for batches of calibration samples (by index)."""

    def batch(self, index: torch.Tensor, input_ids: torch.Tensor) -> BatchTargets:  # pragma: no cover
        raise NotImplementedError


class LabelSource(TargetSource):
    def batch(self, index, input_ids):
        return _LabelTargets(input_ids[:, 1:].reshape(-1))


class TopKSource(TargetSource):
    def __init__(self, cache: TopK):
        self.cache = cache  # [n, T-1, k] / [n, T-1] on the CPU

    def batch(self, index, input_ids):
        c, dev = self.cache, input_ids.device
        k = c.logp.shape[-1]
        return _TopKTargets(TopK(c.logp[index].reshape(-1, k), c.index[index].reshape(-1, k),
                                 c.logp_rest[index].reshape(-1)).to(dev))


class OnlineSource(TargetSource):
    def __init__(self, teacher: nn.Module, autocast: Callable[[], Any]):
        self.teacher, self.autocast = teacher, autocast
        _, self.head = body_and_head(teacher)

    def batch(self, index, input_ids):
        with torch.no_grad(), self.autocast():
            h = hidden_states(self.teacher, input_ids)
        return _OnlineTargets(h.reshape(-1, h.shape[-1]), self.head)


@torch.no_grad()
def compute_topk_cache(model: nn.Module, input_ids: torch.Tensor, k: int, batch_size: int, device: torch.device,
                       autocast: Callable[[], Any], progress: bool = False) -> TopK:
    """The teacher's top-k distribution at every position of every sample: TopK of [n, T-1, k] on the CPU."""
    n, seqlen = input_ids.shape
    _, head = body_and_head(model)
    parts: list[TopK] = []
    for start in tqdm(range(0, n, batch_size), desc="teacher top-k", unit="batch", disable=not progress):
        ids = input_ids[start:start + batch_size].to(device)
        with autocast():
            h = hidden_states(model, ids)
        flat = h.reshape(-1, h.shape[-1])
        chunks = []
        for sl in chunk_slices(flat.shape[0], head.out_features):
            with autocast():
                logits = head(flat[sl])
            t = teacher_topk(logits, k)
            chunks.append(TopK(t.logp.cpu(), t.index.to(torch.int32).cpu(), t.logp_rest.cpu()))
        b = ids.shape[0]
        parts.append(TopK(torch.cat([c.logp for c in chunks]).view(b, seqlen - 1, k),
                          torch.cat([c.index for c in chunks]).view(b, seqlen - 1, k),
                          torch.cat([c.logp_rest for c in chunks]).view(b, seqlen - 1)))
    return TopK(torch.cat([p.logp for p in parts]), torch.cat([p.index for p in parts]),
                torch.cat([p.logp_rest for p in parts]))


@dataclass
class TargetInputs:
    """What the target factories may use; the teacher is built lazily (only KL needs it)."""

    input_ids: torch.Tensor
    device: torch.device
    autocast: Callable[[], Any]
    fp_model: nn.Module  # the unquantized model that becomes the student afterwards (usable until then)
    load_teacher: Callable[[], nn.Module]  # a separate frozen unquantized copy (loaded when called)
    cached_topk: Optional[TopK] = None  # from an interrupted earlier attempt
    on_topk: Optional[Callable[[TopK], None]] = None  # persists a freshly computed cache
    progress: bool = False


def distillation_targets(cfg: Any, inputs: TargetInputs) -> TargetSource:
    """recover.loss=kl: the teacher's distribution, cached top-k (recover.teacher=topk) or on the fly (online)."""
    if cfg.teacher == "online":
        return OnlineSource(inputs.load_teacher(), inputs.autocast)
    cache = inputs.cached_topk
    if cache is None:
        cache = compute_topk_cache(inputs.fp_model, inputs.input_ids, cfg.topk, cfg.batch_size, inputs.device,
                                   inputs.autocast, inputs.progress)
        if inputs.on_topk is not None:
            inputs.on_topk(cache)
    return TopKSource(cache)


def lm_targets(cfg: Any, inputs: TargetInputs) -> TargetSource:
    """recover.loss=lm: the calibration text's next tokens (no teacher)."""
    return LabelSource()
