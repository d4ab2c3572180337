"""Helpers for the quantization tests: tiny random Llama blocks with captured inputs and targets."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from stages.quant.base import BlockInputs, LayerScheme
from stages.quant.blocks import block_linears, block_outputs, capture_first_inputs, capture_kwargs, find_blocks


@pytest.fixture
def one_thread():
    """Tuning many tiny steps on a shared 2-core machine is far faster single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 256, seed: int = 0,
               tie: bool = False):
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                         tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).eval()


def calib_ids(n: int = 16, seqlen: int = 32, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@dataclass
class BlockCase:
    """Block 0 of a tiny model with its inputs and full-precision targets."""

    block: torch.nn.Module
    inputs: BlockInputs
    targets: torch.Tensor

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.block)

    def schemes(self, bits: int, group_size: int, sym: bool) -> dict[str, LayerScheme]:
        return {n: LayerScheme(bits, group_size, sym) for n in block_linears(self.block)}

    def mse(self, block: torch.nn.Module) -> float:
        return block_outputs(block, self.inputs.hidden, self.inputs.kwargs, "cpu", 8, targets=self.targets)[1]

    def tuning_loss(self, block: torch.nn.Module) -> float:
        """The AutoRound loss over all samples: MSE without the last position of each sample."""
        out, _ = block_outputs(block, self.inputs.hidden, self.inputs.kwargs, "cpu", 8)
        return float((out[:, :-1].double() - self.targets[:, :-1].double()).pow(2).mean())


def block_case(n: int = 16, seqlen: int = 32) -> BlockCase:
    model = tiny_llama()
    _, blocks = find_blocks(model)
    kwargs = capture_kwargs(model, blocks, seqlen, "cpu")[0]
    hidden = capture_first_inputs(model, blocks, calib_ids(n, seqlen), "cpu")
    targets, _ = block_outputs(blocks[0], hidden, kwargs, "cpu", 8)
    return BlockCase(blocks[0], BlockInputs(hidden, kwargs), targets)


class RecordingTracker:
    """A tracker that keeps the metrics a stage logs (step metrics as (key, value, step))."""

    def __init__(self):
        self.metrics: list[tuple[str, float, int | None]] = []

    def log_metric(self, key, value, step=None):
        self.metrics.append((key, value, step))

    def log_stage(self, prefix, manifest, path, status):
        pass
