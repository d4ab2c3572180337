#!/usr/bin/env python
"""Generation throughput of packed low-bit checkpoints vs bf16, on the benchmark stage's two backends.

torch part: a Llama-3-8B-shaped model (random bf16 weights, all 32 layers) is RTN-quantized on the
GPU (stages.quant.qdq) to W4G128 sym (and W8, W3, W2 G128 sym), written as real GPTQ checkpoint
folders by stages.formats.gptq's writer, loaded back with stages.formats.qlinear and run on the
torch backend (static KV cache, torch.compile'd glue, one CUDA graph per batch size, kernels chosen
per layer shape and batch size by measurement). The bf16 baseline is the same model on the same
engine. Decode throughput at batch 1 and 16, TTFT, weight memory, per-shape kernel timings.

vllm part: a 16-layer Llama-3-shaped model (4.0B parameters, tied embeddings) as a bf16 folder and
as our W4G128 sym GPTQ checkpoint, each in its own vLLM engine process: batches 1/16/128, 8-token
prompts, 128 new tokens (a serving-style workload), and the linear kernel vLLM chose. Then
2-layer checkpoints W2/W3 sym and W4 asym: which kernel vLLM uses, or exactly why it refuses.

Needs only torch, transformers, safetensors, triton (+ vllm for the vllm part). Usage:
  python benchmarks/bench_throughput.py --part torch --out $OUT     # GPU, about 4-5 minutes
  python benchmarks/bench_throughput.py --part vllm --out $OUT      # GPU + vLLM, about 5-6 minutes
  python benchmarks/bench_throughput.py --part all --out $OUT       # both, each in its own process
  python benchmarks/bench_throughput.py --small --out /tmp/tp       # tiny model: CPU check, or a quick GPU smoke run
  python benchmarks/bench_throughput.py --report DIR [DIR ...]      # merge earlier results into one table
Writes <out>/torch.json, <out>/vllm.json, <out>/throughput.md; prints a short table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench_throughput_report import render_markdown, short_table  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
VLLM_MODEL = {**LLAMA3_8B, "num_hidden_layers": 16, "tie_word_embeddings": True}
CHECK_MODEL = {**LLAMA3_8B, "num_hidden_layers": 2, "tie_word_embeddings": True}
SMALL_MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, rope_theta=500000.0,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
CHECKS = {"w2g128_sym": (2, 128, True), "w3g128_sym": (3, 128, True), "w4g128_asym": (4, 128, False)}
# vLLM part, 4B model: name -> (bits, group, sym) of the packed variants (asym 4-bit is written in AWQ layout)
VLLM_VARIANTS = {"w4g128_sym": (4, 128, True), "w4g128_asym": (4, 128, False)}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# -- models and checkpoints ---------------------------------------------------------------------------------
def random_llama(dims: dict, device: str, dtype: torch.dtype, seed: int):
    """A Llama-layout model with random weights (transformers' own initialisation), built on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**dims), dtype=dtype)
    return model.eval()


def write_packed(model, out: Path, bits: int, group_size: int, sym: bool, lm_head: bool = False) -> dict:
    """RTN-quantize the model's decoder Linears (and lm_head if asked) on their device and write a checkpoint
    folder with the project's packer in the layout pack.format=auto picks (sym: GPTQ v1; asym: auto-round's,
    AWQ for 4-bit; stages.formats.choice)."""
    from stages.formats.auto_round import AutoRoundLayout
    from stages.formats.gptq import GPTQLayout
    from stages.formats.source import QStateReader, TensorInfo
    from core.schema import RTNConfig
    from stages.formats.writer import PackOptions, write_checkpoint
    from stages.quant.base import LayerScheme, QuantizedLayer
    from stages.quant.qdq import quantize_weight

    scheme = LayerScheme(bits, group_size, sym)
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    linears = {k[: -len(".weight")]: v for k, v in state.items()
               if (k.startswith("model.layers.") and k.endswith("_proj.weight")) or (lm_head and k == "lm_head.weight")}

    class MemoryQState(QStateReader):
        def layer(self, name: str) -> QuantizedLayer:
            codes, qp = quantize_weight(linears[name].float(), bits, group_size, sym)
            return QuantizedLayer(codes, qp.scale, qp.zero, scheme)

    config = model.config.to_dict()
    config["architectures"] = config.get("architectures") or [type(model).__name__]  # vLLM picks the class by it

    class MemorySource:
        folder = Path("<in-memory model>")
        tensors = {k: TensorInfo("memory", str(v.dtype), tuple(v.shape)) for k, v in state.items()}

        def __init__(self):
            self.config = config

        def load(self, name: str) -> torch.Tensor:
            return state[name].detach().cpu()

        def aux_files(self) -> list:
            return []

    class HostLayout(GPTQLayout if sym else AutoRoundLayout):  # packed on the GPU, handed to the (CPU) shard writer
        def pack_layer(self, name, layer):
            tensors, record = super().pack_layer(name, layer)
            return {k: v.cpu() for k, v in tensors.items()}, record

    meta = {"layers": {n: {"bits": bits, "group_size": group_size, "sym": sym, "shape": list(w.shape),
                           "act_order": False} for n, w in linears.items()},
            "skipped": [] if lm_head else ["lm_head"], "blocks": "model.layers",
            "num_blocks": model.config.num_hidden_layers, "method": "rtn"}
    start = time.perf_counter()
    res = write_checkpoint(HostLayout(), MemoryQState(Path("<in-memory RTN>"), meta), MemorySource(), out,
                           PackOptions(next(iter(state.values())).dtype),
                           RTNConfig(bits=bits, group_size=group_size, sym=sym, quantize_lm_head=lm_head),
                           f"bench-throughput-w{bits}g{group_size}{'s' if sym else 'a'}-{out.name}")
    return {"path": str(out), "pack_s": time.perf_counter() - start, "size_on_disk_bytes": res.size_on_disk,
            "quantization_config": res.quantization_config, "bits": bits, "group_size": group_size, "sym": sym}


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- torch part -----------------------------------------------------------------------------------------------
def kernel_checks(device: str) -> dict:
    """On this GPU: tinygemm's weights vs the reference (exact case and rounded case), and every Triton tile
    the planner may pick vs a float64 reference, for each bit width and several row counts."""
    from stages.formats.gptq import pack_layer_tensors
    from stages.kernels import int4
    from stages.kernels.linear import dequantize_weight
    from stages.kernels.planner import candidate_configs
    from stages.kernels.tiles import from_gptq
    from stages.quant.base import LayerScheme, QuantizedLayer
    from stages.quant.qdq import dequantize, quantize_weight

    gen = torch.Generator(device=device).manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out: dict = {"tinygemm": {}, "triton_max_rel_err": {}}
    for bits, sym, bf16_scales in ((4, True, True), (4, True, False), (4, False, False), (8, True, False),
                                   (3, True, False), (2, False, False)):
        w = torch.randn(1024, 2048, device=device, generator=gen) * 0.02
        codes, qp = quantize_weight(w, bits, 128, sym)
        scale = qp.scale.to(torch.bfloat16).float() if bf16_scales else qp.scale
        layer = QuantizedLayer(codes, scale, qp.zero, LayerScheme(bits, 128, sym))
        t = pack_layer_tensors("w", layer)
        tw = from_gptq(t["w.qweight"], t["w.qzeros"], t["w.scales"], t["w.g_idx"], bits, 128)
        ref_w = dequantize(codes, scale, qp.zero, 128, None, torch.bfloat16)
        name = f"w{bits}{'sym' if sym else 'asym'}{'_bf16scales' if bf16_scales else ''}"
        if bits == 4:
            packed = int4.from_gptq(t["w.qweight"], t["w.qzeros"], t["w.scales"], t["w.g_idx"], 128, torch.bfloat16)
            got = int4.matmul(torch.eye(2048, device=device, dtype=torch.bfloat16), packed).t()
            out["tinygemm"][name] = {"equal_values": bool(torch.equal(got, ref_w)),
                                     "max_abs_diff": float((got.float() - ref_w.float()).abs().max()),
                                     "exact_expected": int4.exactness(scale, qp.zero)["exact"]}
        worst = 0.0
        try:
            from stages.kernels import triton_gemm

            for m in ((1, 3, 16, 130) if bits == 4 else (1, 16)):  # the batch sizes run below, + 3 and 130 rows for W4
                x = torch.randn(m, 2048, device=device, dtype=torch.bfloat16, generator=gen)
                ref = x.double() @ dequantize_weight(tw, torch.bfloat16).double().t()
                for cfg in candidate_configs(m, tw, sms):
                    y = triton_gemm.matmul(x, tw, cfg).double()
                    worst = max(worst, float((y - ref).norm() / ref.norm()))
            out["triton_max_rel_err"][name] = worst
        except Exception as exc:  # reported, the benchmark goes on (the planner then skips Triton)
            out["triton_max_rel_err"][name] = f"{type(exc).__name__}: {str(exc)[:400]}"
    return out


def torch_variants(args, cuda: bool) -> list[tuple[str, int, bool, str]]:
    """(name, bits, lm_head quantized, kernel policy) of the packed models to run, W4 first."""
    runs = [(f"w{bits}g128", bits, False, args.linear_kernel) for bits in args.bits]
    if 4 in args.bits and cuda and args.dual:  # batch-aware tinygemm + Triton, both formats kept (2x the W4 memory)
        runs.insert(1, ("w4g128_dual", 4, False, "tinygemm_triton"))
    if 4 in args.bits and args.lm_head:
        runs.append(("w4g128_lmhead", 4, True, args.linear_kernel))
    return runs


def run_packed(args, model, name: str, bits: int, head: bool, policy: str, wl, options, log_fn) -> dict:
    """Pack one variant from the live bf16 model, load it back, benchmark it, delete the folder."""
    from stages.bench.options import BenchTarget, folder_size
    from stages.bench.torch_backend import TorchBackend

    path = Path(args.work) / "torch" / name
    start = time.perf_counter()
    try:
        info = write_packed(model, path, bits, 128, True, lm_head=head)
        log_fn(f"packed {name}: {info['size_on_disk_bytes'] / 2**30:.2f} GiB in {info['pack_s']:.1f} s")
        opts = replace(options, kernel_tuning="full" if bits == 4 else "quick", linear_kernel=policy)
        rec = TorchBackend().run(BenchTarget(str(path), "quantized"), wl, opts, log_fn)
        rec.update(folder_size(str(path)), variant="quantized", workload=wl.to_dict(), checkpoint=info)
    except Exception as exc:  # one variant failing must not lose the others
        rec = {"error": f"{type(exc).__name__}: {exc}"}
        log_fn(f"{name} FAILED: {rec['error']}")
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
        free_cuda()
    rec["wall_s"] = time.perf_counter() - start
    return rec


def torch_part(args) -> dict:
    from stages.bench.options import BenchOptions
    from stages.bench.torch_backend import TorchBackend
    from stages.bench.workload import Workload
    from stages.benchmark import attach_speedups

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda:0", torch.bfloat16) if cuda else ("cpu", torch.float32)
    dims = SMALL_MODEL if args.small else LLAMA3_8B
    wl = (Workload(2, 8, 8, (1, 2), warmup=0, repeats=1) if args.small
          else Workload(2, 8, 128, (1, 16), warmup=1, repeats=3))
    options = BenchOptions(device, str(dtype).replace("torch.", ""), compile=cuda, cuda_graphs=cuda,
                           linear_kernel=args.linear_kernel, measure_bf16_kernels=cuda)
    log(f"torch part on {device} ({torch.cuda.get_device_name(0) if cuda else 'CPU'}), model {dims}, "
        f"checkpoints in {args.work}")
    checks = kernel_checks(device) if cuda else {}
    if checks:
        log(f"kernel checks: {checks}")
    model = random_llama(dims, device, dtype, seed=0)
    records: dict = {}
    head = {"part": "torch", "device_name": torch.cuda.get_device_name(0) if cuda else "CPU", "model": dims,
            "workload": wl.to_dict(), "records": records, "torch_version": torch.__version__, "kernel_checks": checks}
    # Packed variants first, each packed from the live bf16 model (one checkpoint on disk at a time);
    # the baseline last, because running it takes the model apart.
    for name, bits, lm_head, policy in torch_variants(args, cuda):
        records[name] = run_packed(args, model, name, bits, lm_head, policy, wl, options, log)
        log(f"{name} done in {records[name]['wall_s']:.1f} s")
        save_partial(args, "torch", {**head, "partial": True})
    base = TorchBackend().run_loaded(model, wl, options, log)
    base.update(variant="baseline", workload=wl.to_dict())
    del model
    free_cuda()
    for name, rec in records.items():
        if "results" in rec:
            attach_speedups(rec, base)
            log(f"{name}: decode speedups {rec.get('decode_speedup_vs_baseline')}")
    return {**head, "records": {"baseline": base, **records}}


def default_work_dir() -> str:
    """RAM-backed /dev/shm when it can hold the largest checkpoint (faster writes and loads), else /tmp."""
    try:
        if shutil.disk_usage("/dev/shm").free > 24 * 2**30:
            return "/dev/shm/bench_throughput_work"
    except OSError:
        pass
    return "/tmp/bench_throughput_work"


# -- vLLM part -------------------------------------------------------------------------------------------------
def vllm_part(args) -> dict:
    from stages.bench.options import BenchOptions, BenchTarget, folder_size
    from stages.bench.vllm_backend import VLLMBackend, build_request, run_worker, vllm_available
    from stages.bench.workload import Workload
    from stages.benchmark import attach_speedups

    if not vllm_available() or not torch.cuda.is_available():
        why = "vllm is not importable" if not vllm_available() else "no CUDA device"
        log(f"vllm part skipped: {why}")
        return {"part": "vllm", "skipped": f"{why} (install vLLM's wheels as docs/gpu.md says)"}
    out, work = Path(args.out), Path(args.work) / "vllm"
    shutil.rmtree(work, ignore_errors=True)
    (out / "vllm_logs").mkdir(parents=True, exist_ok=True)
    model = random_llama(VLLM_MODEL, "cuda", torch.bfloat16, seed=1)
    params = sum(p.numel() for p in model.parameters())
    bf16_dir = work / "bf16"
    targets = []
    if "baseline" in args.vllm_variants:
        model.save_pretrained(bf16_dir)  # safetensors (transformers 5 always writes them)
        targets.append(("baseline", bf16_dir, "baseline"))
    for name in args.vllm_variants:
        if name in VLLM_VARIANTS:
            targets.append((name, Path(write_packed(model, work / name, *VLLM_VARIANTS[name])["path"]), "quantized"))
    log(f"vLLM model: {params / 1e9:.2f}B parameters; folders written: {', '.join(t[0] for t in targets)}")
    del model
    checks = {}
    if args.vllm_checks:
        small = random_llama(CHECK_MODEL, "cuda", torch.bfloat16, seed=2)
        checks = {name: write_packed(small, work / name, *CHECKS[name]) for name in args.vllm_checks}
        del small
    free_cuda()
    wl = Workload(2, 8, 128, (1, 16, 128), warmup=1, repeats=3)
    opts = BenchOptions("cuda:0", "bfloat16", gpu_memory_utilization=args.gpu_memory_utilization)
    records = {}
    for name, path, variant in targets:
        start = time.perf_counter()
        try:
            rec = VLLMBackend().run(BenchTarget(str(path), variant), wl, opts, log, log_dir=out / "vllm_logs" / name)
            rec.update(folder_size(str(path)), variant=variant, workload=wl.to_dict())
        except Exception as exc:  # keep going: the report says what failed
            rec = {"error": f"{type(exc).__name__}: {exc}"}
        rec["wall_s"] = time.perf_counter() - start
        if "error" not in rec:
            rec.pop("log_tail", None)
        records[name] = rec
        save_partial(args, "vllm", {"part": "vllm", "model": VLLM_MODEL, "workload": wl.to_dict(), "records": records,
                                    "partial": True})
        log(f"vLLM {name}: {rec.get('linear_kernels')} {rec.get('error', '')[:300]} ({rec['wall_s']:.0f} s)")
    for name in VLLM_VARIANTS:
        if "results" in records.get("baseline", {}) and "results" in records.get(name, {}):
            attach_speedups(records[name], records["baseline"])
    check_wl = Workload(1, 8, 8, (1,), warmup=0, repeats=1)
    check_opts = replace(opts, vllm_enforce_eager=True, gpu_memory_utilization=0.3)
    check_results = {}
    for name, info in checks.items():
        target = BenchTarget(info["path"], "quantized")
        res = run_worker(build_request(target, check_wl, check_opts, check_only=True), 600,
                         out / "vllm_logs" / f"check_{name}.log")
        if not res.get("ok") and "float16" in str(res.get("error", "")):
            res16 = run_worker(build_request(target, check_wl, replace(check_opts, dtype="float16"), check_only=True),
                               600, out / "vllm_logs" / f"check_{name}_fp16.log")
            res = {**res, "float16_retry": _short_check(res16)}
        check_results[name] = {**_short_check(res), "checkpoint": info}
        log(f"check {name}: {check_results[name]}")
    return {"part": "vllm", "device_name": torch.cuda.get_device_name(0), "model": VLLM_MODEL,
            "parameters": params, "workload": wl.to_dict(), "records": records, "checks": check_results}


def _short_check(res: dict) -> dict:
    keep = ("ok", "error", "quantization", "quantization_logged", "linear_kernels", "quant_log_lines", "vllm_version",
            "engine_start_s", "float16_retry", "log")
    out = {k: res[k] for k in keep if k in res}
    if not res.get("ok"):
        out["log_tail"] = res.get("log_tail", "")[-1500:]
    return out


# -- driver -------------------------------------------------------------------------------------------------------
def name_list(allowed: tuple, allow_empty: bool = False):
    """An argparse type: a comma list whose every name is in `allowed` ('none' = empty if allowed)."""
    def parse(text: str) -> tuple:
        names = () if allow_empty and text.strip() == "none" else tuple(n for n in text.split(",") if n)
        bad = [n for n in names if n not in allowed]
        if bad or not (names or allow_empty):
            raise argparse.ArgumentTypeError(f"{','.join(bad) or '(empty)'} is not one of {', '.join(allowed)}"
                                             + (" or none" if allow_empty else ""))
        return names
    return parse


def save_partial(args, part: str, data: dict) -> None:
    """Results so far, so that a run cut short still leaves numbers behind."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{part}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")


def write_outputs(out: Path, parts: dict) -> None:
    for name, data in parts.items():
        (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "throughput.md").write_text(render_markdown(parts))
    print(short_table(parts), flush=True)


def load_parts(dirs: list[str]) -> dict:
    parts = {}
    for d in dirs:
        for name in ("torch", "vllm"):
            f = Path(d) / f"{name}.json"
            if f.is_file():
                parts[name] = json.loads(f.read_text())
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("torch", "vllm", "all"), default="all")
    ap.add_argument("--small", action="store_true", help="tiny model, torch part only (CPU check / GPU smoke run)")
    ap.add_argument("--out", default="benchmarks/results/throughput")
    ap.add_argument("--work", default=None, help="scratch folder for checkpoints (default: /dev/shm if large, else /tmp)")
    ap.add_argument("--bits", default="4,8,3,2", help="bit widths of the torch part (G128 sym)")
    ap.add_argument("--linear-kernel", default="auto", help="bench.linear_kernel policy for the torch part")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--vllm-variants", type=name_list(("baseline", *VLLM_VARIANTS)),
                    default=("baseline", *VLLM_VARIANTS), help="comma list of the vllm part's 4B-model variants")
    ap.add_argument("--vllm-checks", type=name_list(tuple(CHECKS), allow_empty=True), default=tuple(CHECKS),
                    help="comma list of the vllm part's 2-layer load checks ('none' for none)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in --work")
    ap.add_argument("--no-lm-head", dest="lm_head", action="store_false",
                    help="skip the extra W4 checkpoint whose lm_head is quantized too (quant.quantize_lm_head=true)")
    ap.add_argument("--no-dual", dest="dual", action="store_false",
                    help="skip the extra W4 run with both tinygemm and Triton formats (bench.linear_kernel=tinygemm_triton)")
    ap.add_argument("--report", nargs="+", metavar="DIR", help="only merge earlier results into one table")
    args = ap.parse_args(argv)
    args.bits = [int(b) for b in args.bits.split(",")]
    args.work = args.work or default_work_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        write_outputs(out, load_parts(args.report))
        return 0
    if args.small:
        write_outputs(out, {"torch": torch_part(args)})
        return 0
    if args.part == "all":  # each part in its own process: GPU memory is fully returned in between
        for part in ("torch", "vllm"):
            cmd = [sys.executable, __file__, "--part", part, "--out", str(out / part), "--work", args.work,
                   "--bits", ",".join(map(str, args.bits)), "--linear-kernel", args.linear_kernel,
                   "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                   "--vllm-variants", ",".join(args.vllm_variants),
                   "--vllm-checks", ",".join(args.vllm_checks) or "none"] + ([] if args.dual else ["--no-dual"]) \
                + ([] if args.lm_head else ["--no-lm-head"])
            subprocess.run(cmd, check=False)
        write_outputs(out, load_parts([str(out / "torch"), str(out / "vllm")]))
        return 0
    data = torch_part(args) if args.part == "torch" else vllm_part(args)
    write_outputs(out, {args.part: data})
    return 0


if __name__ == "__main__":
    sys.exit(main())
