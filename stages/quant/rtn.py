"""Round-to-nearest: per-group min/max scales, no calibration data, no tuning (iters=0)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from core.schema import RTNConfig
from stages.quant.base import BlockInputs, BlockResult, LayerScheme, QuantizedLayer
from stages.quant.distributed import LOCAL, Comm
from stages.quant.qdq import quantize_weight


def rtn_layer(weight: torch.Tensor, scheme: LayerScheme) -> QuantizedLayer:
    """Codes, scales and zeros of one weight [out, in] by round-to-nearest."""
    codes, qp = quantize_weight(weight, scheme.bits, scheme.group_size, scheme.sym)
    return QuantizedLayer(codes, qp.scale, qp.zero, scheme)


class RTNQuantizer:
    """BlockQuantizer for plain round-to-nearest (registered as quant.method=rtn)."""

    uses_calibration = False
    needs_fp_targets = False

    def __init__(self, cfg: RTNConfig, progress: bool = False, comm: Comm = LOCAL):
        self.cfg, self.progress = cfg, progress  # no calibration: every rank computes the same codes

    def quantize_block(self, block: nn.Module, schemes: dict[str, LayerScheme], inputs: Optional[BlockInputs],
                       fp_targets: Optional[torch.Tensor], device: torch.device,
                       on_step: Optional[Callable[[int, float], None]] = None) -> BlockResult:
        """Quantize each named Linear independently and leave its dequantized weight in place."""
        layers = {}
        with torch.no_grad():
            for name, scheme in schemes.items():
                w = block.get_submodule(name).weight
                layers[name] = rtn_layer(w, scheme)
                w.data.copy_(layers[name].dequantize(w.dtype))
        return BlockResult(layers=layers)
