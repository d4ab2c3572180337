"""One vLLM engine in its own process: `python -m stages.bench.vllm_worker request.json result.json`.

The parent (`stages.bench.vllm_backend`) writes the request (model folder, engine settings,
workload, the prompt token ids) and reads the result; GPU memory is freed when this process
exits. The request building and output parsing are small pure functions
(`engine_kwargs`, `build_requests`, `parse_outputs`) covered by tests where vLLM is importable.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any

from stages.bench.workload import BatchTiming, Workload, measure


def engine_kwargs(req: dict[str, Any]) -> dict[str, Any]:
    """Arguments of `vllm.LLM(...)` for a request (fixed-length token-id workload, no prefix cache)."""
    w = Workload(**{**req["workload"], "batch_sizes": tuple(req["workload"]["batch_sizes"])})
    kw: dict[str, Any] = {
        "model": req["model"], "dtype": req["dtype"], "seed": w.seed,
        "gpu_memory_utilization": req["gpu_memory_utilization"],
        "max_model_len": w.max_len, "max_num_seqs": max(w.batch_sizes),
        "enable_prefix_caching": False,  # repeated passes must not hit cached prompts
        "skip_tokenizer_init": True,  # prompts are token ids; outputs are counted, not decoded
        "enforce_eager": bool(req.get("enforce_eager", False)),
        "trust_remote_code": bool(req.get("trust_remote_code", False)),
    }
    if req.get("lora_path"):
        kw.update(enable_lora=True, max_lora_rank=int(req["max_lora_rank"]), max_loras=1)
    if req.get("cudagraph_sizes") and not kw["enforce_eager"]:
        kw["compilation_config"] = {"cudagraph_capture_sizes": sorted(set(w.batch_sizes))}
    return kw


def build_requests(prompts: list[list[int]], output_len: int, seed: int) -> tuple[list[Any], Any]:
    """Token-id prompts and greedy fixed-length sampling (ignore_eos: exactly output_len tokens each)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    try:
        params = SamplingParams(n=1, temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False,
                                seed=seed)
    except TypeError:  # a vLLM without the detokenize switch: no tokenizer is loaded anyway
        params = SamplingParams(n=1, temperature=0.0, max_tokens=output_len, ignore_eos=True, seed=seed)
    return [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts], params


def parse_outputs(outputs: list[Any], expected_len: int) -> list[list[int]]:
    """Generated token ids per request; every request must have produced exactly expected_len tokens."""
    tokens = []
    for i, out in enumerate(outputs):
        ids = list(out.outputs[0].token_ids)
        if len(ids) != expected_len:
            raise RuntimeError(f"request {i} produced {len(ids)} tokens, expected {expected_len} (ignore_eos should "
                               f"force fixed-length outputs)")
        tokens.append(ids)
    return tokens


def engine_info(llm: Any) -> dict[str, Any]:
    """What the engine chose: quantization method and dtype (best effort across vLLM versions)."""
    import vllm

    info: dict[str, Any] = {"vllm_version": getattr(vllm, "__version__", "unknown")}
    for path in ("llm_engine.model_config", "llm_engine.vllm_config.model_config"):
        obj: Any = llm
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        info["quantization"] = getattr(obj, "quantization", None)
        info["model_dtype"] = str(getattr(obj, "dtype", ""))
        break
    return info


def _make_llm(req: dict[str, Any]) -> tuple[Any, list[str]]:
    from vllm import LLM

    kw, notes = engine_kwargs(req), []
    try:
        return LLM(**kw), notes
    except Exception as exc:  # an unknown compilation key in this vLLM version: retry with its defaults
        if "compilation_config" not in kw or "cudagraph" not in str(exc).lower():
            raise
        notes.append(f"compilation_config rejected ({exc}); retried with vLLM's default capture sizes")
        kw.pop("compilation_config")
        return LLM(**kw), notes


def run_request(req: dict[str, Any]) -> dict[str, Any]:
    """Start the engine, then a quick check or the full measurement (see the module doc)."""
    w = Workload(**{**req["workload"], "batch_sizes": tuple(req["workload"]["batch_sizes"])})
    t0 = time.perf_counter()
    llm, notes = _make_llm(req)
    out: dict[str, Any] = {"engine_start_s": time.perf_counter() - t0, "notes": notes, **engine_info(llm)}
    prompts = req["prompts"]
    gen_kw = {}
    if req.get("lora_path"):
        from vllm.lora.request import LoRARequest

        gen_kw["lora_request"] = LoRARequest("recover", 1, req["lora_path"])

    def run_batch(idx: list[int]) -> BatchTiming:
        first_reqs, first_params = build_requests([prompts[i] for i in idx], 1, w.seed)
        reqs, params = build_requests([prompts[i] for i in idx], w.output_len, w.seed)
        start = time.perf_counter()
        parse_outputs(llm.generate(first_reqs, first_params, use_tqdm=False, **gen_kw), 1)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        parse_outputs(llm.generate(reqs, params, use_tqdm=False, **gen_kw), w.output_len)
        return BatchTiming(ttft, time.perf_counter() - start)

    if req.get("check_only"):
        reqs, params = build_requests(prompts[:1], w.output_len, w.seed)
        out["sample_tokens"] = parse_outputs(llm.generate(reqs, params, use_tqdm=False, **gen_kw), w.output_len)[0]
        return out
    out["results"] = [measure(run_batch, w, b, on_pass=lambda what, m: print(
        f"[vllm-worker] {what}: {m['output_tokens_per_s']:.1f} tok/s", flush=True)) for b in w.batch_sizes]
    return out


def main(argv: list[str]) -> int:
    req_path, out_path = argv[1], argv[2]
    with open(req_path) as f:
        req = json.load(f)
    result: dict[str, Any] = {"ok": False}
    try:
        result.update(run_request(req))
        result["ok"] = True
    except Exception as exc:  # reported to the parent with the traceback; the parent decides what it means
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-6000:]
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
