"""Decoder blocks of a Hugging Face causal LM: discovery, input capture, block-at-a-time runs.

Works on any layout whose decoder blocks sit in one `nn.ModuleList` (Llama, Qwen2, Gemma,
Mistral, ...: `model.layers`; GPT-NeoX: `gpt_neox.layers`; ...). Inputs are captured by
temporarily replacing every block's `forward` with a recorder that stores its arguments
and passes the hidden states through unchanged, so capturing costs one embedding pass and
no block compute, and each block gets exactly the keyword arguments the model computes
for it (attention mask, position ids, rotary `position_embeddings` in transformers 5.x,
per-layer-type masks in Gemma-3 style models).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import nn

from core.errors import InputError

# Keyword arguments a block gets that only matter for generation (KV cache) and must not
# be replayed while quantizing. transformers 5.17 says past_key_values, 5.24 says cache.
_DROP_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past", "use_cache", "output_attentions")


class _StopForward(Exception):
    """Raised by the last recorder so the model stops before its final norm and head."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks and its dotted name.

    The choice is the ModuleList of identically-typed modules that contain Linear layers
    and hold the most parameters (e.g. `model.layers` in Llama/Qwen2/Gemma/Mistral).

    Raises:
        InputError: when the model has no such list.
    """
    best: Optional[tuple[int, str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or not block_linears(module[0]):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise InputError(f"{type(model).__name__} has no list of decoder blocks with Linear layers; "
                         "only Hugging Face causal LMs with a ModuleList of blocks (e.g. model.layers) are supported")
    return best[1], best[2]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers of a block by relative name, in module order (e.g. 'self_attn.q_proj')."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def _split_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict[str, Any]]:
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    if len(args) > 1:
        raise InputError(f"a decoder block was called with {len(args)} positional arguments; only the hidden "
                         "states are expected positionally (is this a transformers < 5 model?)")
    return hidden, {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}


class _Recorder:
    """Replaces blocks' forward: records (hidden of block 0, kwargs of every block), passes through."""

    def __init__(self, blocks: nn.ModuleList, record_kwargs: bool):
        self.blocks, self.record_kwargs = blocks, record_kwargs
        self.hidden: Optional[torch.Tensor] = None
        self.kwargs: list[dict[str, Any]] = [{} for _ in blocks]

    def _make(self, index: int):
        last = index == len(self.blocks) - 1 or not self.record_kwargs

        def forward(*args, **kwargs):
            hidden, kw = _split_args(args, kwargs)
            if index == 0:
                self.hidden = hidden
            if self.record_kwargs:
                self.kwargs[index] = kw
            if last:
                raise _StopForward
            return hidden

        return forward

    def __enter__(self) -> "_Recorder":
        for i, block in enumerate(self.blocks):
            block.forward = self._make(i)
        return self

    def __exit__(self, *exc) -> None:
        for block in self.blocks:
            del block.forward  # back to the class's forward


def _forward_until_stopped(model: nn.Module, ids: torch.Tensor) -> None:
    try:
        model(input_ids=ids, use_cache=False)
    except _StopForward:
        return
    raise InputError("the model finished its forward pass without calling its decoder blocks")


def capture_kwargs(model: nn.Module, blocks: nn.ModuleList, seqlen: int, device: torch.device | str) -> list[dict]:
    """Keyword arguments each block receives for one full-length sample (batch dimension 1).

    Args:
        model: the causal LM; everything but its blocks must already be on `device`.
        blocks: from `find_blocks`.
        seqlen: sequence length of the calibration samples (masks and rotary tables depend on it).
    Returns:
        One dict per block (shared tensors where the model shares them).
    """
    ids = torch.zeros(1, seqlen, dtype=torch.long, device=device)
    with torch.no_grad(), _Recorder(blocks, record_kwargs=True) as rec:
        _forward_until_stopped(model, ids)
    return rec.kwargs


def capture_first_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                         device: torch.device | str, batch_size: int = 8, pin: bool = False) -> torch.Tensor:
    """Hidden states entering block 0 for every calibration sample.

    Args:
        input_ids: [n, seqlen] token ids (any integer dtype, any device).
        device: where the model's embedding runs (its non-block modules must be there).
        pin: store the result in pinned CPU memory (for low_gpu_mem on CUDA); else on `device`.
    Returns:
        [n, seqlen, hidden] in the model's dtype.
    """
    n = input_ids.shape[0]
    out: Optional[torch.Tensor] = None
    with torch.no_grad(), _Recorder(blocks, record_kwargs=False) as rec:
        for start in range(0, n, batch_size):
            ids = input_ids[start:start + batch_size].to(device=device, dtype=torch.long)
            _forward_until_stopped(model, ids)
            hidden = rec.hidden
            if out is None:
                shape = (n, *hidden.shape[1:])
                out = (torch.empty(shape, dtype=hidden.dtype, pin_memory=True) if pin
                       else torch.empty(shape, dtype=hidden.dtype, device=device))
            out[start:start + hidden.shape[0]].copy_(hidden)
    assert out is not None
    return out


def kwargs_to(kwargs: dict[str, Any], device: torch.device | str, memo: Optional[dict[int, Any]] = None) -> dict:
    """Move the tensors in a block's kwargs (also inside tuples) to `device`, sharing repeats."""
    memo = {} if memo is None else memo

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            if id(v) not in memo:
                memo[id(v)] = v.to(device)
            return memo[id(v)]
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        if isinstance(v, list):
            return [move(x) for x in v]
        return v

    return {k: move(v) for k, v in kwargs.items()}


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One block forward; returns the hidden states whatever container the block returns."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def block_outputs(block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], device: torch.device | str,
                  batch_size: int, out: Optional[torch.Tensor] = None, amp_dtype: Optional[torch.dtype] = None,
                  targets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[float]]:
    """Run `block` over all samples in batches, writing into `out` (may be `inputs` itself).

    Args:
        inputs: [n, seq, hidden] on `device` or on the CPU (then moved per batch).
        out: where outputs go (same shape); default a new tensor beside `inputs`.
        amp_dtype: autocast dtype on CUDA (None: run in the weights' dtype).
        targets: optional [n, seq, hidden]; when given, also return MSE(outputs, targets) in fp32.
    Returns:
        (outputs, mse or None).
    """
    out = torch.empty_like(inputs) if out is None else out
    sq_err, count = torch.zeros((), dtype=torch.float64, device=device), 0
    dev_type = torch.device(device).type
    with torch.no_grad(), torch.autocast(dev_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        for sl in batches(inputs.shape[0], batch_size):
            y = run_block(block, inputs[sl].to(device, non_blocking=True), kwargs)
            if targets is not None:
                t = targets[sl].to(device, non_blocking=True)
                sq_err += (y.float() - t.float()).pow(2).sum(dtype=torch.float64)
                count += y.numel()
            out[sl].copy_(y.to(out.dtype), non_blocking=out.device.type == "cpu" and out.is_pinned())
    if dev_type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # async copies into pinned memory are done
    mse = float(sq_err / count) if targets is not None else None
    return out, mse


def non_block_modules_to(model: nn.Module, blocks_name: str, device: torch.device | str) -> None:
    """Move every parameter and buffer outside the blocks to `device` (blocks stay where they are)."""

    def visit(module: nn.Module, name: str) -> None:
        if name == blocks_name:
            return
        if not blocks_name.startswith(name + ".") and name != "":
            module.to(device)
            return
        for key, p in list(module._parameters.items()):
            if p is not None:
                p.data = p.data.to(device)
        for key, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[key] = b.to(device)
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
