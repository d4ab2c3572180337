#!/usr/bin/env python
"""Streaming quantization at scale: peak host memory of the quantize and pack stages, agreement with the
in-memory path, and a Llama-3-70B-shaped model streamed from its seed.

Parts (``--part``, one per call; each fits one 10-minute call on one H200):
  stream8b-rtn-gptq        A Llama-3-8B-shaped random bf16 model (16 GB) written shard by shard from its seed
                           (the pipeline's random source; peak RSS), then quantized W4G128 sym by RTN and by
                           GPTQ through the quantize stage's own job (stages.quant.job.run_job: meta skeleton,
                           one block at a time from the shards) in a child process: peak host RSS, seconds,
                           peak GPU memory; then the in-memory path (the whole model loaded on the host, as
                           the stage did before) likewise; the two qstates compared bit for bit (codes, fp16
                           scales, zero points).
  stream8b-autoround-pack  The same model: AutoRound W4G128 (--iters, default 20) streamed vs in memory
                           (codes agreement, block losses), then the pack stage's core on the streamed
                           qstate in a child process (peak RSS; the packer verifies every layer).
  stream70b                Llama-3-70B dims (80 blocks, hidden 8192, intermediate 28672, 64 heads, 8 KV
                           heads) drawn block by block on the GPU from the seeded random source (nothing is
                           written), AutoRound W4G128 with --iters (default 5) on 128 x 2048 random token ids:
                           peak host RSS, peak GPU memory, seconds per block, and the time extrapolated to
                           200 iterations. Stops after the block that passes --deadline seconds and
                           extrapolates from the finished blocks.
``--small`` runs every part on CPU-sized shapes (same code paths) to check them.

Needs torch, transformers, accelerate and safetensors (and this repository): no Hydra, MLflow or psutil.
  python benchmarks/bench_scale.py --part stream8b-rtn-gptq --work /tmp/scale --out $OUT/scale
  python benchmarks/bench_scale.py --part stream8b-autoround-pack --work /tmp/scale --out $OUT/scale --reuse-model
  python benchmarks/bench_scale.py --part stream70b --out $OUT/scale
  python benchmarks/bench_scale.py --small --part stream8b-rtn-gptq --work /tmp/s --out /tmp/s/out
  python benchmarks/bench_scale.py --report benchmarks/results/published/scale/scale_stream70b.json
Writes <out>/scale_<part>[_small].json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from core.schema import ModelConfig, QuantScheme, RandomModelConfig, quant_config  # noqa: E402
from scale_common import GIB, current_rss, fmt, python_cmd, run_measured, save_record  # noqa: E402

EIGHT_B = RandomModelConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                            rope_theta=500000.0, seed=0)
SEVENTY_B = replace(EIGHT_B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
SMALL = RandomModelConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, seed=0)
TARGETS = {"quantize_pack_rss_gib_8b": 6.0, "quantize_rss_gib_70b": 24.0}
PARTS = ("stream8b-rtn-gptq", "stream8b-autoround-pack", "stream70b")


# -- children (each a fresh process, so its peak RSS is its own) ----------------------------

def child_write(spec: dict) -> None:
    from pipeline.random_model import write_random_model

    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    write_random_model(ModelConfig(source="random", random=RandomModelConfig(**spec["dims"])), folder, torch.bfloat16)


def child_quantize(spec: dict) -> None:
    from stages.quant.job import QuantizeJob, run_job

    metrics = run_job(QuantizeJob(**spec["job"]), log=lambda m: print(m, flush=True))
    Path(spec["result"]).write_text(json.dumps(metrics))


def child_pack(spec: dict) -> None:
    from stages.formats import parse_size
    from stages.formats.source import QStateReader, SourceModel
    from stages.formats.writer import PackOptions
    from stages.registry import PACK_FORMATS, resolve

    qstate, source = QStateReader.open(Path(spec["qstate"])), SourceModel.open(spec["model"])
    options = PackOptions(torch.bfloat16, parse_size(spec["max_shard_size"]), "auto")
    packer = resolve(PACK_FORMATS, "pack.format", "auto")
    result = packer(qstate, source, Path(spec["out"]), options, quant_config(**spec["quant"]), "bench",
                    lambda m: print(m, flush=True))
    Path(spec["result"]).write_text(json.dumps({"files": result.files, "size_on_disk": result.size_on_disk,
                                                "verified_layers": result.extras["verified_layers"]}))


def child_reference(spec: dict) -> None:
    """The in-memory path: the whole model loaded on the host, each block visiting the device; writes a qstate."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from stages.quant.driver import quantize_model
    from stages.quant.qstate import save_qstate

    job = spec["job"]
    resident = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=getattr(torch, job["dtype"])).eval()
    ids = load_file(str(Path(job["calib_dir"]) / "calib.safetensors"))["input_ids"].long()
    result = quantize_model(resident, ids, quant_config(**job["quant"]), job["device"], seed=0)
    save_qstate(Path(job["workdir"]), result.layers, result.meta)
    (Path(job["workdir"]) / "block_metrics.json").write_text(json.dumps(result.block_metrics))
    Path(spec["result"]).write_text(json.dumps(result.metrics))


class Deadline(Exception):
    """Raised after the block that passes the time budget."""


def child_stream70b(spec: dict) -> None:
    """AutoRound on a model drawn block by block from the seed on the device (stages.quant.stream)."""
    from pipeline.random_model import RandomTensors, llama_config
    from stages.quant.driver import quantize_model
    from stages.quant.stream import StreamedBlocks, meta_skeleton

    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dims = RandomModelConfig(**spec["dims"])
    config = llama_config(dims, dtype)
    source = StreamedBlocks(meta_skeleton(config), RandomTensors(config, dims.seed, dtype), dtype, direct=True)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, dims.vocab_size, (spec["nsamples"], spec["seqlen"]), generator=gen)
    cfg = quant_config(**spec["quant"])
    t0, blocks = time.perf_counter(), []

    def on_block_done(index: int, result: Any, seconds: float) -> None:
        blocks.append({"block": index, "seconds": seconds, **{k: result.metrics.get(k) for k in
                                                               ("tune_seconds", "loss_init", "loss_best", "mse")}})
        Path(spec["result"]).write_text(json.dumps({"blocks": blocks, "complete": False}))
        print(f"block {index}: {seconds:.1f} s, loss {result.metrics.get('loss_init')} -> "
              f"{result.metrics.get('loss_best')}", flush=True)
        if time.perf_counter() - t0 > spec["deadline"]:
            raise Deadline

    if device.type == "cuda":
        torch.cuda.init()  # a fresh process: the allocator's statistics exist only once CUDA is initialised
        torch.cuda.reset_peak_memory_stats(device)
    try:
        quantize_model(source, ids, cfg, device, seed=0, on_block_done=on_block_done, keep_layers=False)
        complete = True
    except Deadline:
        complete = False
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    Path(spec["result"]).write_text(json.dumps({"blocks": blocks, "complete": complete, "peak_gpu_gib": peak,
                                                "seconds": time.perf_counter() - t0}))


CHILDREN = {"write": child_write, "quantize": child_quantize, "reference": child_reference, "pack": child_pack,
            "stream70b": child_stream70b}


# -- parent -----------------------------------------------------------------------------------

def spawn(kind: str, spec: dict) -> dict[str, Any]:
    """Run one child and return its measurements plus the result it wrote."""
    result = Path(spec["result"]) if "result" in spec else None
    measured = run_measured(python_cmd(Path(__file__), "--child", kind, json.dumps(spec)))
    if result is not None and result.is_file():
        measured["result"] = json.loads(result.read_text())
    print(f"[{kind}] rc={measured['rc']} {measured['seconds']} s, peak RSS {measured['maxrss_gib']} GiB "
          f"(tree {measured['tree_peak_gib']} GiB, PSS {measured['tree_pss_peak_gib']} GiB)", flush=True)
    return measured


def write_calib(folder: Path, nsamples: int, seqlen: int, vocab: int) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    save_file({"input_ids": ids}, str(folder / "calib.safetensors"))
    return folder


def streamed_job(args: argparse.Namespace, name: str, model: Path, calib: Path, q: QuantScheme) -> dict:
    work = Path(args.work) / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    job = {"workdir": str(work), "model_path": str(model), "revision": None, "trust_remote_code": False,
           "calib_dir": str(calib), "device": str(args.device), "dtype": args.dtype, "quant": asdict(q), "seed": 0,
           "progress": False, "resumed": False}
    return {"job": job, "result": str(Path(args.work) / f"{name}.metrics.json")}


def compare(streamed: Path, reference: Path) -> dict[str, Any]:
    """Two qstates layer by layer: identical layers (codes, fp16 scales, zero points), the fraction of equal
    codes, and the largest relative difference of the blocks' best losses."""
    from stages.formats.source import QStateReader

    a_reader, b_reader = QStateReader.open(streamed), QStateReader.open(reference)
    same, equal, total = 0, 0, 0
    for name in a_reader.names:
        a, b = a_reader.layer(name), b_reader.layer(name)
        codes_eq = int((a.codes == b.codes).sum())
        scales = torch.equal(a.scale.half().view(torch.int16), b.scale.half().view(torch.int16))
        same += int(codes_eq == a.codes.numel() and scales and torch.equal(a.zero, b.zero))
        equal, total = equal + codes_eq, total + a.codes.numel()
    losses = [json.loads((f / "block_metrics.json").read_text()) for f in (streamed, reference)]
    diff = [abs(x["loss_best"] / y["loss_best"] - 1) for x, y in zip(*losses) if y.get("loss_best")]
    return {"layers": len(a_reader.names), "identical_layers": same, "codes_equal_fraction": equal / max(total, 1),
            "max_rel_loss_best_diff": max(diff) if diff else None}


def quantize_both(args: argparse.Namespace, rows: list, name: str, model: Path, calib: Path, q: QuantScheme,
                  save: Any) -> Path:
    """The stage's streamed job and the in-memory path, each in a measured child process, then compared."""
    folders = {}
    for kind, label in (("quantize", "streamed"), ("reference", "in memory")):
        spec = streamed_job(args, f"{name}_{kind}", model, calib, q)
        rows.append({"step": f"quantize {name} ({label})", **spawn(kind, spec)})
        folders[kind] = Path(spec["job"]["workdir"])
        save()
    if all(r.get("rc") == 0 for r in rows[-2:]):
        rows[-2]["vs_in_memory"] = compare(folders["quantize"], folders["reference"])
        print(f"[{name}] streamed vs in memory: {rows[-2]['vs_in_memory']}", flush=True)
        save()
    return folders["quantize"]


def model_dims(args: argparse.Namespace, base: RandomModelConfig) -> RandomModelConfig:
    """`base` with the --layers/--hidden/--inter/--vocab overrides."""
    over = {"num_hidden_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": args.inter,
            "vocab_size": args.vocab}
    return replace(base, **{k: v for k, v in over.items() if v is not None})


def size_gib(model: Path) -> float:
    """The GiB of a model folder's safetensors shards."""
    return round(sum(p.stat().st_size for p in model.glob("*.safetensors")) / GIB, 3)


def prepare_model(args: argparse.Namespace, rows: list, save: Any) -> Path:
    """The random bf16 model in <work>/model: written by a measured child, or with --reuse-model taken as it is
    when an earlier run wrote it completely with the same dimensions (its marker file says so)."""
    model = Path(args.work) / "model"
    dims = model_dims(args, SMALL if args.small else EIGHT_B)
    marker = model / "written_dims.json"
    if args.reuse_model and marker.is_file() and json.loads(marker.read_text()) == asdict(dims):
        rows.append({"step": "reuse the random bf16 model written by an earlier run", "dims": asdict(dims),
                     "size_gib": size_gib(model)})
        save()
        return model
    shutil.rmtree(model, ignore_errors=True)
    rows.append({"step": "write random bf16 model (streamed writer)", "dims": asdict(dims),
                 **spawn("write", {"folder": str(model), "dims": asdict(dims)})})
    rows[-1]["size_gib"] = size_gib(model)
    if rows[-1].get("rc") == 0:
        marker.write_text(json.dumps(asdict(dims)))
    save()
    return model


def part_rtn_gptq(args: argparse.Namespace, rows: list, save: Any) -> None:
    model = prepare_model(args, rows, save)
    vocab = model_dims(args, SMALL if args.small else EIGHT_B).vocab_size
    calib = write_calib(Path(args.work) / "calib", args.nsamples, args.seqlen, vocab)
    gptq_calib = write_calib(Path(args.work) / "calib_gptq", args.gptq_samples, args.seqlen, vocab)
    quantize_both(args, rows, "rtn", model, calib, quant_config(method="rtn", bits=4, group_size=args.group), save)
    quantize_both(args, rows, "gptq", model, gptq_calib,
                  quant_config(method="gptq", bits=4, group_size=args.group, batch_size=8), save)


def part_autoround_pack(args: argparse.Namespace, rows: list, save: Any) -> None:
    model = prepare_model(args, rows, save)
    vocab = model_dims(args, SMALL if args.small else EIGHT_B).vocab_size
    calib = write_calib(Path(args.work) / "calib", args.nsamples, args.seqlen, vocab)
    q = quant_config(method="autoround", bits=4, group_size=args.group, iters=args.iters, batch_size=args.batch)
    qstate = quantize_both(args, rows, "autoround", model, calib, q, save)
    out = Path(args.work) / "packed"
    shutil.rmtree(out, ignore_errors=True)
    spec = {"qstate": str(qstate), "model": str(model), "out": str(out), "quant": asdict(q),
            "max_shard_size": args.max_shard_size, "result": str(Path(args.work) / "pack.result.json")}
    rows.append({"step": f"pack (format auto, shards {args.max_shard_size})", **spawn("pack", spec)})
    save()


def part_70b(args: argparse.Namespace, rows: list, save: Any) -> None:
    dims = model_dims(args, replace(SMALL, num_hidden_layers=6) if args.small else SEVENTY_B)
    q = quant_config(method="autoround", bits=4, group_size=args.group, iters=args.iters, batch_size=args.batch)
    spec = {"dims": asdict(dims), "device": str(args.device), "nsamples": args.nsamples, "seqlen": args.seqlen,
            "quant": asdict(q), "deadline": args.deadline, "result": str(Path(args.work) / "stream70b.result.json")}
    Path(args.work).mkdir(parents=True, exist_ok=True)
    row = {"step": f"AutoRound W4G{args.group}, {args.iters} iters, {dims.num_hidden_layers} blocks streamed "
                   "from the seed", "dims": asdict(dims), **spawn("stream70b", spec)}
    row["extrapolation"] = extrapolate(row.get("result", {}), dims.num_hidden_layers, args.iters, 200)
    rows.append(row)
    save()


def extrapolate(result: dict, num_blocks: int, iters: int, target_iters: int) -> Optional[dict[str, Any]]:
    """Whole-model seconds at `iters` and at `target_iters` from the finished blocks.

    A block's time is its tuning loop, which scales with the iterations, plus the rest (fp targets, quantized
    outputs, loading), which stays. The first block also pays torch.compile's one-off compilation, so the
    per-block figures are medians over the later blocks and the first block's excess is added once; with
    fewer than two blocks finished there is nothing steady to extrapolate from (None)."""
    blocks = result.get("blocks") or []
    if len(blocks) < 2 or not iters:
        return None
    steady = blocks[1:]
    per_block = statistics.median(b["seconds"] for b in steady)
    tune = statistics.median(b.get("tune_seconds") or 0.0 for b in steady)
    one_off = max(0.0, blocks[0]["seconds"] - per_block)
    return {"blocks_done": len(blocks), "seconds_per_block": round(per_block, 2),
            "tune_seconds_per_block": round(tune, 3), "one_off_seconds": round(one_off, 1),
            "model_seconds_at_iters": round(one_off + num_blocks * per_block, 1),
            f"model_hours_at_{target_iters}":
                round((one_off + num_blocks * (per_block - tune + tune * target_iters / iters)) / 3600, 3)}


def markdown(record: dict[str, Any]) -> str:
    env, lines = record["environment"], [f"# Streaming quantization: {record['part']}", ""]
    lines += [f"{env.get('card') or env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
              f"{env['date']}", f"Command: `{env['argv']}`", "",
              "| step | seconds | peak host RSS GiB (process) | tree RSS GiB | tree PSS GiB | rc | details |",
              "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        details = {k: r[k] for k in ("size_gib", "vs_in_memory", "extrapolation") if k in r}
        res = r.get("result") or {}
        for k in ("peak_gpu_mem_gb", "peak_gpu_gib", "verified_layers", "complete"):
            if k in res:
                details[k] = res[k]
        lines.append(f"| {r['step']} | {fmt(r.get('seconds'))} | {fmt(r.get('maxrss_gib'))} | "
                     f"{fmt(r.get('tree_peak_gib'))} | {fmt(r.get('tree_pss_peak_gib'))} | {r.get('rc')} | "
                     f"{json.dumps(details, default=str)} |")
    lines += ["", f"Targets (GPU machine, full shapes): {json.dumps(TARGETS)}"]
    return "\n".join(lines) + "\n"


def report(files: list[Path]) -> int:
    """Re-render recorded runs: the extrapolation recomputed from each stream70b row's raw block times (with the
    iterations of the recorded command line), then <file>.json and its .md rewritten in place."""
    for file in files:
        record = json.loads(file.read_text())
        recorded = defaults(parse_args(record["environment"]["argv"].split()[1:]))
        for row in record["rows"]:
            if row.get("result", {}).get("blocks"):
                row["extrapolation"] = extrapolate(row["result"], row["dims"]["num_hidden_layers"], recorded.iters,
                                                   200)
        text = markdown(record)
        save_record(file.parent, file.stem, record, text)
        print(text)
    return 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=PARTS, required=True)
    p.add_argument("--small", action="store_true", help="CPU-sized shapes, same code paths")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--work", default="/tmp/bench_scale", help="scratch folder (the 8B model needs 16 GB)")
    p.add_argument("--out", default=str(HERE / "results" / "scale"))
    p.add_argument("--iters", type=int, default=None, help="AutoRound iterations (8B: 20, 70B: 5; --small: 3)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration samples (default 128; --small 8)")
    p.add_argument("--gptq-samples", type=int, default=None, help="GPTQ's samples (default 64; --small 8)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per sample (default 2048; --small 32)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--group", type=int, default=None, help="group size (default 128; --small 32)")
    p.add_argument("--max-shard-size", default="4GB", help="the pack stage's shard size")
    p.add_argument("--reuse-model", action="store_true",
                   help="keep <work>/model when an earlier run of the same dimensions wrote it completely")
    p.add_argument("--deadline", type=float, default=540.0, help="stream70b: stop after the block passing this")
    for dim in ("layers", "hidden", "inter", "vocab"):
        p.add_argument(f"--{dim}", type=int, default=None, help=f"override the model's {dim} (e.g. a CPU measurement)")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    small = args.small
    args.iters = args.iters if args.iters is not None else (3 if small else (5 if args.part == "stream70b" else 20))
    args.nsamples = args.nsamples or (8 if small else 128)
    args.gptq_samples = args.gptq_samples or (8 if small else 64)
    args.seqlen = args.seqlen or (32 if small else 2048)
    args.group = args.group or (32 if small else 128)
    args.batch = min(args.batch, args.nsamples)
    args.device = torch.device("cuda:0" if args.device == "auto" and torch.cuda.is_available() else
                               ("cpu" if args.device == "auto" else args.device))
    args.dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        CHILDREN[argv[1]](json.loads(argv[2]))
        return 0
    if argv[:1] == ["--report"]:
        return report([Path(a) for a in argv[1:]])
    args = defaults(parse_args(argv))
    from bench_common import environment

    record = {"part": args.part, "environment": environment(args.device, omp_threads=True), "targets": TARGETS,
              "host_rss_gib_of_this_process_at_start": round(current_rss() / GIB, 3), "rows": []}
    name = f"scale_{args.part}" + ("_small" if args.small else "")

    def save() -> None:
        save_record(Path(args.out), name, record, markdown(record))

    {"stream8b-rtn-gptq": part_rtn_gptq, "stream8b-autoround-pack": part_autoround_pack,
     "stream70b": part_70b}[args.part](args, record["rows"], save)
    save()
    print("\n" + markdown(record))
    return 0 if all(r.get("rc", 0) == 0 for r in record["rows"]) else 1  # a reused model has no rc


if __name__ == "__main__":
    raise SystemExit(main())
