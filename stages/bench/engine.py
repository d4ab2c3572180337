"""A static-shape decoder for Llama-layout models: static KV cache, kernel-backed Linears,
optionally torch.compile'd glue and one CUDA graph per batch size for the decode step.

The math mirrors transformers' Llama (RMSNorm in float32 then cast, rotate-half RoPE from
the model's own rotary table, softmax in float32, SiLU-gated MLP), so on the CPU in float32
it reproduces the Hugging Face model's greedy tokens (tests/test_benchmark.py checks it).
q/k/v and gate/up are fused into one matmul each (their weights concatenated along the
output dimension), as vLLM does.

Decode steps run entirely on the device: the step reads the token buffer and the position
counter, writes the next token and advances the counters, so a captured graph is replayed
`output_len - 1` times with no host work in between. With CUDA graphs the prefill of each
(batch, prompt length) is captured too, so the time to first token is GPU work, not kernel
launches from Python.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
LINEAR_NAMES = ("qkv", "o", "gate_up", "down")
LAST_TOKEN_LINEARS = ("lm_head",)  # prefill runs these on the last position only (M = batch)


def prefill_rows(workload: Any) -> list[int]:
    """Rows the decoder Linears see in the prefill of each batch size (batch x prompt length)."""
    return sorted({b * workload.input_len for b in workload.batch_sizes})


@dataclass
class DecoderSpec:
    """Dimensions and the non-Linear tensors of the model (all on the target device)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    embed: torch.Tensor  # [vocab, hidden]
    norms: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (input_layernorm, post_attention_layernorm)
    final_norm: torch.Tensor
    cos: torch.Tensor  # [max_positions, head_dim] in the model dtype
    sin: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return self.embed.shape[0]

    def nbytes(self) -> int:
        ts = [self.embed, self.final_norm] + [t for pair in self.norms for t in pair]
        return sum(t.numel() * t.element_size() for t in ts)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def add_rms_norm(delta: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual = residual + delta
    return rms_norm(residual, w, eps), residual


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_split(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int,
               head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, T, (H + 2*Hkv) * D] -> q [B, H, T, D], k and v [B, Hkv, T, D], RoPE on q and k.

    cos/sin: [T, D] (the positions of these T tokens).
    """
    b, t, _ = qkv.shape
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.view(b, t, n_heads, head_dim).transpose(1, 2)
    k = k.view(b, t, n_kv, head_dim).transpose(1, 2)
    v = v.view(b, t, n_kv, head_dim).transpose(1, 2)
    c, s = cos[None, None], sin[None, None]
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s, v


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query per sequence over the cache positions <= pos: q [B, H, 1, D] -> [B, 1, H*D]."""
    b, h, _, d = q.shape
    n_kv, length = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, n_kv, h // n_kv, d)
    scores = torch.matmul(qg, k_cache.transpose(2, 3)) * scale  # [B, Hkv, G, L]
    valid = torch.arange(length, device=q.device) <= pos
    scores = scores.masked_fill(~valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v_cache)  # [B, Hkv, G, D]
    return out.reshape(b, 1, h * d)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def lookup_rope(cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return cos.index_select(0, pos), sin.index_select(0, pos)


@dataclass
class GenerationTiming:
    """Wall times of one batch: prefill + first token, and the whole generation."""

    ttft_s: float
    total_s: float


class DecodeEngine:
    """Greedy generation with a static KV cache (see module doc).

    Args:
        spec: model dimensions and non-Linear tensors.
        linears: "layers.{i}.{qkv|o|gate_up|down}" and "lm_head" -> modules computing x @ W^T.
        max_batch, max_len: KV cache size.
        compile_glue: torch.compile the elementwise/attention glue (CUDA).
        cuda_graphs: capture one decode step per batch size (CUDA).
    """

    def __init__(self, spec: DecoderSpec, linears: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                 max_batch: int, max_len: int, compile_glue: bool = False, cuda_graphs: bool = False):
        if max_len > spec.cos.shape[0]:
            raise ValueError(f"max_len {max_len} exceeds the rotary table ({spec.cos.shape[0]} positions)")
        self.spec, self.lin = spec, linears
        self.max_batch, self.max_len = max_batch, max_len
        self.cuda_graphs, self.compiled = cuda_graphs, compile_glue
        dev, dt = spec.embed.device, spec.embed.dtype
        shape = (spec.n_layers, max_batch, spec.n_kv_heads, max_len, spec.head_dim)
        self.k_cache = torch.zeros(shape, device=dev, dtype=dt)
        self.v_cache = torch.zeros(shape, device=dev, dtype=dt)
        self.scale = spec.head_dim ** -0.5
        wrap = (lambda f: torch.compile(f, fullgraph=True, dynamic=False)) if compile_glue else (lambda f: f)
        self._norm, self._add_norm = wrap(rms_norm), wrap(add_rms_norm)
        self._rope_split, self._attn, self._act = wrap(rope_split), wrap(decode_attention), wrap(silu_mul)
        self._graphs: dict[int, Any] = {}
        self._prefill_graphs: dict[tuple[int, int], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._bufs: dict[int, dict[str, torch.Tensor]] = {}

    # -- one forward over new tokens --------------------------------------------------------
    def _layers(self, x: torch.Tensor, b: int, cos: torch.Tensor, sin: torch.Tensor,
                attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        s = self.spec
        h, residual = self._norm(x, s.norms[0][0], s.eps), x
        delta = x  # replaced by each layer's MLP output; layer 0 normalises x itself
        for i in range(s.n_layers):
            if i:
                h, residual = self._add_norm(delta, residual, s.norms[i][0], s.eps)
            q, k, v = self._rope_split(self.lin[f"layers.{i}.qkv"](h), cos, sin, s.n_heads, s.n_kv_heads, s.head_dim)
            attn = attend(i, q, k, v)
            h, residual = self._add_norm(self.lin[f"layers.{i}.o"](attn), residual, s.norms[i][1], s.eps)
            delta = self.lin[f"layers.{i}.down"](self._act(self.lin[f"layers.{i}.gate_up"](h)))
        h, _ = self._add_norm(delta, residual, s.final_norm, s.eps)
        return h

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompts [B, T] (positions 0..T-1), fill the cache, return the greedy next token [B]."""
        b, t = input_ids.shape
        x = F.embedding(input_ids, self.spec.embed)

        def attend(i, q, k, v):
            self.k_cache[i, :b, :, :t] = k
            self.v_cache[i, :b, :, :t] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                 enable_gqa=self.spec.n_heads != self.spec.n_kv_heads)
            return out.transpose(1, 2).reshape(b, t, -1)

        h = self._layers(x, b, self.spec.cos[:t], self.spec.sin[:t], attend)
        return self.lin["lm_head"](h[:, -1:]).argmax(dim=-1).reshape(b)

    def _step(self, bufs: dict[str, torch.Tensor]) -> None:
        """One decode step on the buffers: token at `pos` -> next token stored at `step`."""
        tokens, pos = bufs["tokens"], bufs["pos"]
        b = tokens.shape[0]
        x = F.embedding(tokens.view(b, 1), self.spec.embed)
        cos, sin = lookup_rope(self.spec.cos, self.spec.sin, pos)

        def attend(i, q, k, v):
            kc, vc = self.k_cache[i, :b], self.v_cache[i, :b]
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            return self._attn(q, kc, vc, pos, self.scale)

        h = self._layers(x, b, cos, sin, attend)
        nxt = self.lin["lm_head"](h).argmax(dim=-1).reshape(b)
        tokens.copy_(nxt)
        bufs["out"].index_copy_(1, bufs["step"], nxt.view(b, 1))
        pos.add_(1)
        bufs["step"].add_(1)

    def _buffers(self, b: int, out_len: int) -> dict[str, torch.Tensor]:
        dev = self.spec.embed.device
        bufs = self._bufs.get(b)
        if bufs is None or bufs["out"].shape[1] != out_len:
            bufs = {"tokens": torch.zeros(b, dtype=torch.long, device=dev),
                    "pos": torch.zeros(1, dtype=torch.long, device=dev),
                    "step": torch.zeros(1, dtype=torch.long, device=dev),
                    "out": torch.zeros(b, out_len, dtype=torch.long, device=dev)}
            self._bufs[b] = bufs
            self._graphs.pop(b, None)
        return bufs

    def _capture(self, b: int, bufs: dict[str, torch.Tensor]) -> Any:
        """Warm the step up on a side stream (compiles the glue), then capture it.

        The warm-up writes cache positions 0..1 and output columns 0..1; prefill and the
        timed steps overwrite them.
        """
        bufs["pos"].zero_()
        bufs["step"].zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(min(2, bufs["out"].shape[1])):
                self._step(bufs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(bufs)
        return graph

    def _prefill_graph(self, input_ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Prefill as a captured graph for this (batch, prompt length): TTFT measures GPU work, not launches."""
        key = tuple(input_ids.shape)
        if key not in self._prefill_graphs:
            ids = input_ids.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.prefill(ids)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                first = self.prefill(ids)
            self._prefill_graphs[key] = (graph, ids, first)
        graph, ids, first = self._prefill_graphs[key]

        def run(x: torch.Tensor) -> torch.Tensor:
            ids.copy_(x)
            graph.replay()
            return first

        return run

    def generate(self, input_ids: torch.Tensor, out_len: int) -> tuple[torch.Tensor, GenerationTiming]:
        """Greedy `out_len` new tokens per prompt (no early stop). Returns (tokens [B, out_len], timing)."""
        b, t = input_ids.shape
        if b > self.max_batch or t + out_len > self.max_len:
            raise ValueError(f"batch {b} x {t}+{out_len} tokens exceeds the cache ({self.max_batch} x {self.max_len})")
        bufs = self._buffers(b, out_len)
        cuda = input_ids.is_cuda
        if self.cuda_graphs and out_len > 1 and b not in self._graphs:
            self._graphs[b] = self._capture(b, bufs)
        graph = self._graphs.get(b) if self.cuda_graphs else None
        prefill = self._prefill_graph(input_ids) if self.cuda_graphs else self.prefill
        _sync(cuda)
        start = time.perf_counter()
        first = prefill(input_ids)
        bufs["tokens"].copy_(first)
        bufs["out"][:, 0] = first
        bufs["pos"].fill_(t)
        bufs["step"].fill_(1)
        _sync(cuda)
        ttft = time.perf_counter() - start
        for _ in range(out_len - 1):
            graph.replay() if graph is not None else self._step(bufs)
        _sync(cuda)
        total = time.perf_counter() - start
        return bufs["out"].clone(), GenerationTiming(ttft, total)


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
