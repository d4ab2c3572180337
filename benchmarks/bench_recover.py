#!/usr/bin/env python
"""Recovery cost on a Llama-3-8B-shaped model (random weights): peak GPU memory and time per 1M training tokens.

Builds a random LlamaForCausalLM of Llama-3-8B's shape (32 layers, hidden 4096, intermediate
14336, 32 heads, 8 KV heads, vocabulary 128256) in bf16 on the GPU, RTN-quantizes every decoder
Linear (W2G64 asym by default) into the qstate's layers (codes kept on the CPU, as the stage reads
them from disk), and runs the recover stage's own core, `stages.recovery.core.recover_model`, once
per row: the quantized Linears hold uint8 codes and dequantize inside each matmul (never a whole
dequantized model), bf16 autocast, gradient checkpointing, the teacher's top-k distribution cached
before the same model object becomes the student. Random token ids stand in for the calibration
set (cost only; quality is measured on SmolLM2 by published_results.py --parts recover).

Rows (``--rows``): scales (scales + norms train) and lora (rank 16 on every decoder Linear).
Columns: peak GPU memory of the whole run and of the training phase, steady-state tokens/s
(steps after the first two) and seconds per 1M training tokens.

``--small`` runs the same rows on a tiny Llama shape on the CPU (a check of the code path).
Needs only torch, transformers and safetensors (and this repository). Run from the repository root:
  python benchmarks/bench_recover.py --out benchmarks/results/published/recover_cost     # GPU, ~2 min
  python benchmarks/bench_recover.py --small --out /tmp/recover_cost                     # CPU check
Writes <out>/recover_cost.json and <out>/recover_cost.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (REPO, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from bench_common import environment, fmt, pick_device, reset_peak, sync, write_json  # noqa: E402
from core.schema import RecoverConfig  # noqa: E402
from stages.quant.base import LayerScheme, QuantizedLayer  # noqa: E402
from stages.quant.rtn import rtn_layer  # noqa: E402
from stages.recovery.core import RecoverHooks, recover_model  # noqa: E402


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    vocab: int


LLAMA3_8B = ModelShape(32, 4096, 14336, 32, 8, 128256)
SMALL = ModelShape(2, 256, 768, 8, 2, 4096)
ROWS = {"scales": {"mode": "scales"}, "lora": {"mode": "lora", "rank": 16, "alpha": 32.0}}


def random_model(shape: ModelShape, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.inter, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in bf16 on the GPU: no float32 copy of 8B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def quantize_rtn(model: torch.nn.Module, scheme: LayerScheme) -> dict[str, QuantizedLayer]:
    """RTN codes/scales/zeros of every decoder Linear, on the CPU (what the stage reads from the qstate)."""
    return {name: rtn_layer(m.weight.detach(), scheme).to("cpu") for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}


def run_row(name: str, shape: ModelShape, args: argparse.Namespace, device: torch.device,
            dtype: torch.dtype) -> dict[str, Any]:
    """Build, quantize and recover one model; returns the row (memory, speed, losses)."""
    reset_peak(device)
    model = random_model(shape, dtype, device, args.seed)
    scheme = LayerScheme(args.bits, args.group_size, args.sym)
    layers = quantize_rtn(model, scheme)
    cfg = RecoverConfig(**{**ROWS[name], "steps": args.steps, "batch_size": args.batch_size, "lr": 1e-4,
                           "topk": args.topk, "grad_checkpointing": args.grad_checkpointing, "checkpoint_every": 0})
    ids = torch.randint(0, shape.vocab, (args.batch_size * args.steps, args.seqlen),
                        generator=torch.Generator().manual_seed(args.seed))
    stamps: list[float] = []

    def on_step(step: int, loss: float, lr: float) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    result = recover_model(model, layers.items(), ids, cfg, device, load_teacher=lambda: None, fp_weight=lambda n: None,
                           seed=args.seed, hooks=RecoverHooks(on_step=on_step))
    total = time.perf_counter() - t0
    tokens_per_step = args.batch_size * (args.seqlen - 1)
    steady = (len(stamps) - 2) * tokens_per_step / (stamps[-1] - stamps[1]) if len(stamps) > 2 else None
    m = result.metrics
    row = {"row": name, "bits": args.bits, "group_size": args.group_size, "sym": args.sym,
           "seqlen": args.seqlen, "batch": args.batch_size, "steps": args.steps,
           "grad_checkpointing": args.grad_checkpointing, "trainable_params": int(m["trainable_params"]),
           "peak_gib_run": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "peak_gib_training": m.get("peak_gpu_mem_gb"), "tokens_per_s": steady or m["tokens_per_s"],
           "seconds_total": total, "train_loss_init": m["train_loss_init"], "train_loss_final": m["train_loss_final"]}
    row["seconds_per_1m_tokens"] = 1e6 / row["tokens_per_s"]
    del model, result, layers
    return row


def markdown(env: dict, shape: ModelShape, rows: list[dict[str, Any]]) -> str:
    head = ["mode", "scheme", "tokens/step", "grad ckpt", "trainable", "peak GiB (run)", "peak GiB (training)",
            "tokens/s", "s per 1M tokens", "loss init -> final"]
    lines = ["# Recovery cost: Llama-3-8B-shaped model (random weights)" if shape == LLAMA3_8B else
             "# Recovery cost: small Llama shape (CPU check)", "",
             f"{env.get('card', env.get('cpu'))}, torch {env['torch']}, {env['date']}; command: `{env['argv']}`", "",
             f"Shape: {shape.layers} layers, hidden {shape.hidden}, intermediate {shape.inter}, vocabulary "
             f"{shape.vocab}. bf16 autocast on CUDA; codes kept as uint8, dequantized per layer inside each matmul.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        scheme = f"W{r['bits']}G{r['group_size']} {'sym' if r['sym'] else 'asym'}"
        lines.append("| " + " | ".join([
            r["row"], scheme, f"{r['batch']} x {r['seqlen'] - 1}", str(r["grad_checkpointing"]),
            f"{r['trainable_params'] / 1e6:.2f} M", fmt(r["peak_gib_run"], 1), fmt(r["peak_gib_training"], 1),
            fmt(r["tokens_per_s"], 0), fmt(r["seconds_per_1m_tokens"], 1),
            f"{r['train_loss_init']:.3g} -> {r['train_loss_final']:.3g}"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recover_cost"))
    p.add_argument("--rows", default="scales,lora")
    p.add_argument("--device", default="auto")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="a tiny Llama shape on the CPU")
    args = p.parse_args()
    if args.small:
        args.device, args.seqlen, args.steps, args.group_size = "cpu", 64, 4, 32
    device, dtype = pick_device(args.device)
    shape = SMALL if args.small else LLAMA3_8B
    env = environment(device, omp_threads=False)
    rows = []
    for name in args.rows.split(","):
        rows.append(run_row(name, shape, args, device, dtype))
        print(f"[recover cost] {name}: {rows[-1]['seconds_per_1m_tokens']:.1f} s per 1M tokens, peak "
              f"{fmt(rows[-1]['peak_gib_run'], 1)} GiB", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    write_json(out / "recover_cost.json", env, {"fits_one_gpu_gib": 141}, rows)
    text = markdown(env, shape, rows)
    (out / "recover_cost.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
