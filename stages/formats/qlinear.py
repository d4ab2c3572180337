"""Load a packed checkpoint back as a transformers model whose quantized Linears dequantize on the fly.

`load_quantized_model(path, device, dtype)` reads config.json's quantization_config (GPTQ
v1/v2, or auto-round with packing_format auto_round:auto_gptq / auto_round:auto_awq /
auto_round), builds the model on the meta device, swaps every Linear that has a `qweight`
for a `QuantLinear` holding the packed tensors, and loads the other tensors in `dtype`.
A quant_method in stages.registry.CHECKPOINT_LOADERS (bitsandbytes) goes to its own loader.
What evaluate and benchmark score is therefore exactly what was shipped, and the weights
a QuantLinear uses are `stages.quant.qdq.dequantize` of the stored codes, scales and zeros
(the quantize stage's weights, bit for bit, whenever the format stores them as they are).

QuantLinear API (for kernel converters, e.g. the benchmark's int4 path):
  ql.bits, ql.group_size (-1 = one group per row), ql.sym, ql.in_features, ql.out_features
  ql.qweight int32 [in*bits/32, out]   GPTQ layout (AWQ checkpoints are repacked losslessly at load)
  ql.qzeros  int32 [groups, out*bits/32]  stores zero - ql.zero_offset (1: GPTQ v1, 0: as is)
  ql.scales  float16 [groups, out]     (kept float16 under model.to(dtype))
  ql.g_idx   int32 [in]                group of each input column
  ql.bias    [out] in the model dtype, or None
  ql.unpack() -> stages.quant.base.QuantizedLayer: codes uint8 [out, in], scale float32 [out, groups]
      (float16 values), zero float32 [out, groups] (effective zero points), scheme, g_idx (None = natural)
  ql.dequantize(dtype) -> W [out, in] = scale[:, g] * (codes - zero[:, g]), float32 product then cast
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from core.errors import InputError
from stages.formats.auto_round import AUTO_AWQ, AUTO_GPTQ, ZERO_OFFSET, unpack_awq_layer
from stages.formats.gptq import pack_layer_tensors, unpack_qweight, unpack_qzeros
from stages.formats.source import TensorInfo, read_safetensors_headers
from stages.quant.base import LayerScheme, QuantizedLayer
from stages.quant.qdq import dequantize, group_index, num_groups

PACKED_KEYS = ("qweight", "qzeros", "scales", "g_idx")


class QuantLinear(nn.Module):
    """A Linear stored as GPTQ-layout packed integers that dequantizes its weight at every call (see module doc)."""

    def __init__(self, in_features: int, out_features: int, scheme: LayerScheme, zero_offset: int,
                 bias: Optional[torch.Tensor], tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = scheme.bits, scheme.group_size, scheme.sym
        self.zero_offset = zero_offset
        for key in PACKED_KEYS:
            self.register_buffer(key, tensors[key])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        natural = group_index(in_features, scheme.group_size, device=self.g_idx.device)
        self.natural_order = bool(torch.equal(self.g_idx, natural))  # decided once, not per call

    @classmethod
    def from_layer(cls, layer: QuantizedLayer, bias: Optional[torch.Tensor] = None,
                   zero_offset: int = 0) -> "QuantLinear":
        """Pack a QuantizedLayer (zero points stored minus `zero_offset`)."""
        out_f, in_f = layer.codes.shape
        tensors = pack_layer_tensors("w", layer, zero_offset)
        return cls(in_f, out_f, layer.scheme, zero_offset, bias, {k: tensors[f"w.{k}"] for k in PACKED_KEYS})

    @property
    def scheme(self) -> LayerScheme:
        return LayerScheme(self.bits, self.group_size, self.sym)

    def unpack(self) -> QuantizedLayer:
        """Codes, scales, effective zero points and g_idx (None for natural order) on this module's device."""
        codes = unpack_qweight(self.qweight, self.bits)
        zero = unpack_qzeros(self.qzeros, self.bits, self.zero_offset).float()
        g_idx = None if self.natural_order else self.g_idx
        return QuantizedLayer(codes, self.scales.t().float(), zero, self.scheme, g_idx)

    def group_index(self) -> torch.Tensor:
        return self.g_idx

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.unpack()
        return dequantize(q.codes, q.scale, q.zero, self.group_size, q.g_idx, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() would round the float16 scales; move them, never cast them.
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(self.qweight.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, zero_offset={self.zero_offset}")


def iter_quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """(module name, QuantLinear) for every packed Linear of a loaded model."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


@dataclass
class QuantSpec:
    """What config.json's quantization_config says about how each layer is stored."""

    quant_method: str
    base: LayerScheme
    packing_format: str  # gptq | gptq_v2 | auto_round:auto_gptq | auto_round:auto_awq | auto_round
    zero_offset: int
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)  # GPTQ rules
    extra_config: dict[str, dict[str, Any]] = field(default_factory=dict)  # auto-round per-layer entries

    def scheme_for(self, name: str) -> Optional[LayerScheme]:
        """The layer's declared scheme, or None when the config says it is left unquantized."""
        over: dict[str, Any] = {}
        if self.quant_method == "gptq":
            for pattern, values in self.dynamic.items():
                negative = pattern.startswith("-:")
                if re.match(pattern[2:] if pattern[:2] in ("+:", "-:") else pattern, name):
                    if negative:
                        return None
                    over = values
                    break
        else:
            over = self._extra_for(name)
            if over.get("bits", self.base.bits) >= 16:
                return None
        return LayerScheme(int(over.get("bits", self.base.bits)), int(over.get("group_size", self.base.group_size)),
                           bool(over.get("sym", self.base.sym)))

    def _extra_for(self, name: str) -> dict[str, Any]:
        if name in self.extra_config:
            return self.extra_config[name]
        for pattern, values in self.extra_config.items():
            if any(c in pattern for c in "*+?^$()[]{}|\\") and re.search(pattern, name):
                return values
        return {}


def read_quant_spec(qcfg: dict[str, Any], path: Path) -> QuantSpec:
    """Parse quantization_config; unknown methods or packing formats are an InputError."""
    method = str(qcfg.get("quant_method", "")).lower()
    try:
        base = LayerScheme(int(qcfg["bits"]), int(qcfg["group_size"]), bool(qcfg.get("sym", True)))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}/config.json: quantization_config lacks bits/group_size ({exc})") from exc
    if method == "gptq":
        fmt = str(qcfg.get("checkpoint_format", "gptq") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise InputError(f"{path}: GPTQ checkpoint_format={fmt} is not supported (gptq, gptq_v2)")
        return QuantSpec(method, base, fmt, 0 if fmt == "gptq_v2" else 1, dynamic=qcfg.get("dynamic") or {})
    if method == "auto-round":
        fmt = qcfg.get("packing_format", AUTO_GPTQ)
        if fmt not in ZERO_OFFSET:
            raise InputError(f"{path}: auto-round packing_format={fmt} is not supported "
                             f"({', '.join(ZERO_OFFSET)})")
        return QuantSpec(method, base, fmt, ZERO_OFFSET[fmt], extra_config=qcfg.get("extra_config") or {})
    raise InputError(f"{path}: quant_method={method or '(none)'} is not a packed checkpoint this loader reads "
                     "(gptq, auto-round)")


def _read(path: Path, headers: dict[str, TensorInfo], keys: list[str], device: str) -> dict[str, torch.Tensor]:
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(headers[key].file, []).append(key)
    out = {}
    for file, file_keys in by_file.items():
        with safe_open(str(path / file), framework="pt", device=str(device)) as f:
            out.update({k: f.get_tensor(k) for k in file_keys})
    return out


def _config_dtype(config: Any) -> Optional[torch.dtype]:
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _layer_scheme(spec: QuantSpec, name: str, t: dict[str, torch.Tensor], in_f: int, out_f: int) -> LayerScheme:
    """The declared scheme, checked against the tensor shapes (bits and groups follow from them)."""
    declared = spec.scheme_for(name)
    if declared is None:
        raise InputError(f"{name} has packed tensors but quantization_config says it is not quantized")
    if spec.packing_format == AUTO_AWQ:
        bits = t["qweight"].shape[1] * 32 // out_f
    else:
        bits = t["qweight"].shape[0] * 32 // in_f
    groups = t["scales"].shape[0]
    if bits != declared.bits or groups != num_groups(in_f, declared.group_size):
        raise InputError(f"{name}: tensors hold {bits}-bit codes in {groups} groups, but quantization_config "
                         f"declares bits={declared.bits}, group_size={declared.group_size}")
    return declared


def _build_quant_linear(spec: QuantSpec, name: str, linear: nn.Module, tensors: dict[str, torch.Tensor],
                        dtype: torch.dtype) -> QuantLinear:
    if not isinstance(linear, nn.Linear):
        raise InputError(f"{name} has packed tensors but is a {type(linear).__name__} in this architecture, not a Linear")
    in_f, out_f = linear.in_features, linear.out_features
    t = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()}
    scheme = _layer_scheme(spec, name, t, in_f, out_f)
    bias = t["bias"].to(dtype) if "bias" in t else None
    if spec.packing_format == AUTO_AWQ:  # repack into the GPTQ layout with zeros as they are (lossless)
        return QuantLinear.from_layer(unpack_awq_layer(t, scheme), bias, zero_offset=0)
    if "g_idx" not in t:
        t["g_idx"] = group_index(in_f, scheme.group_size, device=t["qweight"].device)
    packed = {k: t[k] for k in PACKED_KEYS}
    packed["g_idx"] = packed["g_idx"].to(torch.int32)
    return QuantLinear(in_f, out_f, scheme, spec.zero_offset, bias, packed)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError as exc:
        raise InputError(f"checkpoint tensor {key} has no place in this architecture") from exc
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise InputError(f"checkpoint tensor {key} has no place in this architecture")


def _materialise_buffers(model: nn.Module, device: str) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in checkpoints: rebuild them on `device`.

    The rotary module is constructed again from its config, as transformers does when it
    builds the model, and its buffers replace the meta ones (same values as a normal load).
    """
    owners = {}
    for key, buf in model.named_buffers():
        if buf.is_meta:
            owners[key.rpartition(".")[0]] = model.get_submodule(key.rpartition(".")[0])
    for name, module in owners.items():
        if "RotaryEmbedding" not in type(module).__name__ or not hasattr(module, "config"):
            raise InputError(f"cannot rebuild the non-persistent buffers of {name} ({type(module).__name__}); "
                             "this loader supports architectures whose only such buffers are rotary tables")
        fresh = type(module)(module.config)  # config-only construction works across transformers 4.4x-5.x
        for attr, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module._buffers[attr] = getattr(fresh, attr).to(device=device, dtype=buf.dtype)


def load_quantized_model(path: str | Path, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                         trust_remote_code: bool = False) -> nn.Module:
    """A transformers causal LM from a packed checkpoint folder, with QuantLinear in place of packed Linears.

    Args:
        path: checkpoint folder (config.json with quantization_config + safetensors).
        device: where the tensors go ("cpu", "cuda:0").
        dtype: dtype of the unquantized tensors and activations (None: the checkpoint's config dtype).
    Returns:
        The model in eval mode on `device`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a checkpoint folder (no config.json)")
    qcfg = json.loads((path / "config.json").read_text()).get("quantization_config")
    if not qcfg:
        raise InputError(f"{path}/config.json has no quantization_config: not a packed checkpoint")
    from stages.registry import CHECKPOINT_LOADERS, resolve

    if qcfg.get("quant_method") in CHECKPOINT_LOADERS:  # not a packed-integer layout (bitsandbytes)
        loader = resolve(CHECKPOINT_LOADERS, "quantization_config.quant_method", qcfg["quant_method"])
        return loader(path, device, dtype, trust_remote_code)
    spec = read_quant_spec(qcfg, path)
    headers = read_safetensors_headers(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    del config.quantization_config
    dtype = dtype or _config_dtype(config) or torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    quantized = sorted({k.rsplit(".", 1)[0] for k in headers if k.endswith(".qweight")})
    owned = set()
    for name in quantized:
        keys = [f"{name}.{k}" for k in (*PACKED_KEYS, "bias") if f"{name}.{k}" in headers]
        owned.update(keys)
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise InputError(f"{path}: packed tensors for {name}, which this architecture does not have") from exc
        module = _build_quant_linear(spec, name, linear, _read(path, headers, keys, device), dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    rest = [k for k in headers if k not in owned]
    for key, value in _read(path, headers, rest, device).items():
        _set_tensor(model, key, value.to(dtype) if value.is_floating_point() else value)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _materialise_buffers(model, device)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise InputError(f"{path}: the checkpoint lacks {len(missing)} tensors of this architecture, e.g. {missing[:3]}")
    return model.eval()
