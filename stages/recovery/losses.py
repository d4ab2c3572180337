"""Recovery losses on one chunk of token positions: distillation (KL) from the unquantized model, or plain LM loss.

Every function takes the student's logits [N, V] (N token positions of the chunk) and what the
teacher or the text says about the same positions, and returns the **sum** over the N
positions (the trainer divides by the number of positions of the whole batch).

* `kl_full`: KL(p_teacher || p_student) over the whole vocabulary (teacher logits on the fly).
* `kl_topk`: the same KL on the coarsened distributions "each of the teacher's top-k tokens,
  plus one bucket for every other token". It needs only the teacher's top-k log-probabilities,
  their token ids and the log-probability of the rest, which can be cached once for the whole
  calibration set (a few MB instead of the full logits). With k large enough the rest bucket
  holds little mass; the bucket keeps the student from piling mass on tokens outside the top k.
* `lm_ce`: cross-entropy of the next token of the calibration text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TopK:
    """The teacher's top-k next-token distribution at N positions."""

    logp: torch.Tensor  # [N, k] float32, log-probabilities of the k most likely tokens
    index: torch.Tensor  # [N, k] int64 token ids
    logp_rest: torch.Tensor  # [N] float32, log of the probability of every other token

    def to(self, device) -> "TopK":
        return TopK(self.logp.to(device), self.index.to(device).long(), self.logp_rest.to(device))


def log_rest(logits: torch.Tensor, index: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log P(token not in `index`) = logsumexp(logits outside index) - logsumexp(all), computed stably."""
    masked = logits.scatter(-1, index, float("-inf"))
    return torch.logsumexp(masked, dim=-1) - lse


def teacher_topk(logits: torch.Tensor, k: int) -> TopK:
    """Top-k log-probabilities, ids and rest mass of teacher logits [N, V] (float32 math)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    values, index = logits.topk(k, dim=-1)
    return TopK(values - lse.unsqueeze(-1), index, log_rest(logits, index, lse))


def kl_topk(student_logits: torch.Tensor, target: TopK) -> torch.Tensor:
    """Sum over positions of KL(teacher || student) on the top-k + rest coarsening."""
    s = student_logits.float()
    lse = torch.logsumexp(s, dim=-1)
    s_logp = s.gather(-1, target.index) - lse.unsqueeze(-1)
    s_rest = log_rest(s, target.index, lse)
    p = target.logp.exp()
    p_rest = target.logp_rest.exp()
    rest = torch.where(p_rest > 0, p_rest * (target.logp_rest - s_rest), torch.zeros_like(p_rest))  # 0 log 0 = 0
    return ((p * (target.logp - s_logp)).sum(-1) + rest).sum()


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(teacher || student) over the whole vocabulary."""
    s_logp = F.log_softmax(student_logits.float(), dim=-1)
    t_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(s_logp, t_logp, reduction="sum", log_target=True)


def lm_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over positions of the next-token cross-entropy."""
    return F.cross_entropy(student_logits.float(), labels.long(), reduction="sum")
