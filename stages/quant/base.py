"""Types shared by the quantizers, the quantize stage and the packers.

A quantizer works on one decoder block at a time (`BlockQuantizer.quantize_block`); the
driver in `stages.quantize` discovers blocks, feeds inputs, propagates the quantized
stream and saves results. What leaves the quantize stage is, per Linear layer, integer
codes + scales + zeros (+ g_idx): the `qstate` (see `stages.quant.qstate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

from stages.quant.qdq import dequantize


@dataclass(frozen=True)
class LayerScheme:
    """How one Linear is quantized."""

    bits: int
    group_size: int  # -1 = per output channel
    sym: bool


@dataclass
class QuantizedLayer:
    """Result for one Linear: W_hat = scale[:, g] * (codes - zero[:, g]) (see stages.quant.qdq).

    codes: uint8 [out, in]; scale: float32 [out, groups] holding float16 values;
    zero: float32 or integer [out, groups] with integer values; g_idx: int32 [in] or None
    (None = natural order, group of column i is i // group_size).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: LayerScheme
    g_idx: Optional[torch.Tensor] = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.scheme.group_size, self.g_idx, dtype)

    def to(self, device: torch.device | str) -> "QuantizedLayer":
        g = None if self.g_idx is None else self.g_idx.to(device)
        return QuantizedLayer(self.codes.to(device), self.scale.to(device), self.zero.to(device), self.scheme, g)


@dataclass
class BlockInputs:
    """Inputs of one decoder block for all calibration samples.

    hidden: [n, seq, hidden] (on the tuning device, or on the CPU with low_gpu_mem);
    kwargs: the keyword arguments the block needs (attention mask, position ids /
    position embeddings, ...), shared by every sample and batch-size independent where
    possible (see stages.quant.blocks).
    """

    hidden: torch.Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockResult:
    """What a quantizer returns for one block."""

    layers: dict[str, QuantizedLayer]  # key: Linear name relative to the block, e.g. "self_attn.q_proj"
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. loss_init, loss_best, best_iter
    curve: list[float] = field(default_factory=list)  # per-iteration loss, when the method tunes


class BlockQuantizer(Protocol):
    """A quantization method. Registered in stages.registry.QUANT_METHODS by name."""

    uses_calibration: bool  # False for RTN: the driver skips capturing inputs
    needs_fp_targets: bool  # AutoRound: outputs of the full-precision block on full-precision inputs

    def quantize_block(self, block: torch.nn.Module, schemes: dict[str, LayerScheme], inputs: Optional[BlockInputs],
                       fp_targets: Optional[torch.Tensor], device: torch.device,
                       on_step: Optional[Callable[[int, float], None]] = None) -> BlockResult:
        """Quantize the Linears named in `schemes`; leave `block`'s weights as the dequantized values.

        Args:
            block: the decoder block, on `device`, full-precision weights.
            schemes: Linear name (relative to the block) -> scheme, only layers to quantize.
            inputs: the quantized stream's inputs to this block (None when uses_calibration is False).
            fp_targets: full-precision outputs for `inputs`' samples (only when needs_fp_targets).
            on_step: callback(iteration, loss) for progress / MLflow step metrics.
        """
        ...
