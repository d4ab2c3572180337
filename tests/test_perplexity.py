"""The perplexity core against straightforward reference computations."""

from __future__ import annotations

import copy
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from stages.eval.perplexity import Window, bits_per_byte, make_windows, perplexity, tokenize_text, window_stderr


class BigramLM(torch.nn.Module):
    """logits[t] = table[ids[t]]: a model whose next-token distribution depends on the last token only."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def tiny_lm(tiny_store):
    """(model, tokenizer) of the tiny random Llama, loaded once for this module."""
    from conftest import compose_config
    from core.models import load_model, load_tokenizer
    from pipeline.models import prepare_model
    from core.store import ArtifactStore

    cfg, _ = compose_config(["model=tiny_random"])
    handle = prepare_model(cfg.model, ArtifactStore(tiny_store), log=lambda m: None)
    return load_model(handle, torch.float32, "cpu"), load_tokenizer(handle)


def reference_perplexity(model, ids, seqlen, stride):
    """The textbook loop: each window, each scored position, one log-softmax at a time."""
    n = len(ids)
    nll, count, prev_end, begin = 0.0, 0, 0, 0
    while True:
        end = min(begin + seqlen, n)
        logits = model(input_ids=ids[begin:end].unsqueeze(0)).logits[0].double()
        for t in range(max(prev_end, begin + 1), end):
            nll -= torch.log_softmax(logits[t - 1 - begin], dim=-1)[ids[t]].item()
            count += 1
        if end == n:
            break
        prev_end, begin = end, begin + stride
    return math.exp(nll / count), count


def test_windows_score_every_token_once_when_overlapping():
    windows = make_windows(10, seqlen=4, stride=2)
    assert windows == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert scored == list(range(1, 10))


def test_windows_non_overlapping_skip_each_window_start():
    windows = make_windows(10, seqlen=4, stride=4)
    assert windows == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    assert make_windows(10, seqlen=4, stride=4, max_windows=2) == windows[:2]


def test_windows_reject_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        make_windows(10, seqlen=4, stride=5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        make_windows(1, seqlen=4, stride=4)


def test_bigram_perplexity_is_exact():
    """A bigram model ignores context, so every token's NLL is known in closed form."""
    torch.manual_seed(0)
    model = BigramLM(11)
    ids = torch.randint(0, 11, (57,))
    logp = torch.log_softmax(model.table.detach().double(), dim=-1)
    per_token = [-logp[ids[t - 1], ids[t]].item() for t in range(1, 57)]
    out = perplexity(model, ids, seqlen=8, stride=3, batch_size=4)
    assert out["tokens"] == 56
    assert out["nll"] == pytest.approx(sum(per_token) / 56, rel=1e-6)
    assert out["ppl"] == pytest.approx(math.exp(sum(per_token) / 56), rel=1e-6)
    # non-overlapping: window starts 0, 8, ..., 56 are not scored
    out = perplexity(model, ids, seqlen=8, stride=8)
    kept = [per_token[t - 1] for t in range(1, 57) if t % 8 != 0]
    assert out["tokens"] == len(kept) == 49
    assert out["nll_sum"] == pytest.approx(sum(kept), rel=1e-6)


def test_per_window_numbers_and_their_standard_error_on_the_bigram_model():
    """Each window's NLL is the sum of its targets' closed-form NLLs; the standard error treats windows as units."""
    torch.manual_seed(1)
    model = BigramLM(13)
    ids = torch.randint(0, 13, (50,))
    logp = torch.log_softmax(model.table.detach().double(), dim=-1)
    windows = make_windows(50, seqlen=10, stride=10)
    expected = [sum(-logp[ids[t - 1], ids[t]].item() for t in range(w.first_target, w.end)) for w in windows]
    out = perplexity(model, ids, seqlen=10, stride=10, batch_size=2)
    assert out["window_tokens"] == [w.n_targets for w in windows] == [9] * 5
    assert out["window_nll_sum"] == pytest.approx(expected, rel=1e-6)
    assert sum(out["window_nll_sum"]) == pytest.approx(out["nll_sum"], rel=1e-12)
    # equal windows: the standard error of the mean of the per-window means
    means = [s / 9 for s in expected]
    assert out["nll_stderr"] == pytest.approx(statistics.stdev(means) / math.sqrt(5), rel=1e-6)


def test_window_stderr_weights_unequal_windows_like_a_ratio_mean():
    sums, counts = [10.0, 4.0, 9.0], [4, 2, 3]
    m = 23.0 / 9
    # cluster-robust standard error of sum(sums) / sum(counts), written out term by term
    expected = math.sqrt(3 / 2 * ((10 - 4 * m) ** 2 + (4 - 2 * m) ** 2 + (9 - 3 * m) ** 2)) / 9
    assert window_stderr(sums, counts) == pytest.approx(expected, rel=1e-12)
    assert window_stderr([6.0, 6.0], [3, 3]) == 0.0
    assert window_stderr([6.0], [3]) is None


@pytest.mark.parametrize("seqlen,stride,batch_size", [(16, 16, 1), (16, 16, 3), (16, 5, 2), (13, 7, 4), (8, 1, 8)])
def test_matches_reference_on_tiny_llama(tiny_lm, seqlen, stride, batch_size):
    model, tokenizer = tiny_lm
    ids = tokenize_text(tokenizer, "It was a truth universally acknowledged, that a single man in possession "
                        "of a good fortune, must be in want of a wife. However little known the feelings.")
    expected, count = reference_perplexity(model, ids, seqlen, stride)
    out = perplexity(model, ids, seqlen, stride, batch_size=batch_size)
    assert out["tokens"] == count
    assert out["ppl"] == pytest.approx(expected, rel=1e-5)
    assert out["windows"] == len(make_windows(len(ids), seqlen, stride))


def test_trimmed_logits_match_full_logits(tiny_lm):
    """The logits_to_keep fast path gives the same numbers as the full forward."""
    model, tokenizer = tiny_lm
    ids = tokenize_text(tokenizer, "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, "
                        "for his own amusement, never took up any book but the Baronetage.")
    fast = perplexity(model, ids, seqlen=12, stride=5, batch_size=2)
    full = perplexity(lambda input_ids: model(input_ids=input_ids), ids, seqlen=12, stride=5, batch_size=2)
    assert fast["nll_sum"] == pytest.approx(full["nll_sum"], rel=1e-6)


def test_tokenize_text_adds_bos_once(tiny_lm):
    _, tokenizer = tiny_lm
    plain = tokenize_text(tokenizer, "Anne Elliot", add_bos=False)
    with_bos = tokenize_text(tokenizer, "Anne Elliot", add_bos=True)
    assert with_bos[0].item() == tokenizer.bos_token_id
    assert torch.equal(with_bos[1:], plain)


def test_bits_per_byte():
    assert bits_per_byte(100 * math.log(2), 50) == pytest.approx(2.0)


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_lm):
    """Same numbers on CUDA (float32 exactly to tolerance; bfloat16 within 2%)."""
    model, tokenizer = tiny_lm
    ids = tokenize_text(tokenizer, "Captain Wentworth had no fortune. He had been lucky in his profession; "
                        "but spending freely what had come freely, had realized nothing.")
    cpu = perplexity(model, ids, seqlen=16, stride=8, batch_size=2)
    on_gpu = copy.deepcopy(model).to("cuda")  # a copy: the module-scoped model stays float32 on the CPU
    gpu = perplexity(on_gpu, ids, seqlen=16, stride=8, batch_size=2, device="cuda")
    assert gpu["ppl"] == pytest.approx(cpu["ppl"], rel=1e-4)
    bf16 = perplexity(on_gpu.to(torch.bfloat16), ids, seqlen=16, stride=8, batch_size=2, device="cuda")
    assert bf16["ppl"] == pytest.approx(cpu["ppl"], rel=2e-2)
