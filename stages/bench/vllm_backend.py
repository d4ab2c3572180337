"""The `vllm` benchmark backend: offline `vllm.LLM` in a child process (`stages.bench.vllm_worker`).

The child's output (including vLLM's engine-core process, which inherits it) goes to a log
file; from it we read which quantization method and which linear kernel vLLM chose (its
"Using <Kernel> for <Method>" lines), the weight memory it reports and any refusal.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from core.errors import InputError
from stages.bench.options import BenchOptions, BenchTarget, special_token_ids, text_vocab_size
from stages.bench.workload import Workload, prompt_token_ids

INSTALL_HINT = ("install vLLM on a CUDA machine (pip install vllm==0.26.0; offline wheels: see "
                "docs/gpu.md) or use bench.backend=torch")
_KERNEL_RE = re.compile(r"Using (\w+) for (\w+)")
_QUANT_RE = re.compile(r"quantization=(\w+)")
_LOAD_RE = re.compile(r"Model loading took ([\d.]+) GiB")
_ATTN_RE = re.compile(r"Using (\w+) attention backend")
REPO_ROOT = Path(__file__).resolve().parents[2]  # the child imports stages.* from here
_NOTE_RE = re.compile(r"(marlin|machete|exllama|gptq|quantiz|not supported|unsupported)", re.IGNORECASE)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def parse_vllm_log(text: str) -> dict[str, Any]:
    """Kernel and memory facts from a vLLM log (see module doc)."""
    kernels = []
    for kernel, method in _KERNEL_RE.findall(text):
        if "Kernel" in kernel and {"kernel": kernel, "method": method} not in kernels:
            kernels.append({"kernel": kernel, "method": method})
    quant = _QUANT_RE.findall(text)
    load = _LOAD_RE.findall(text)
    attn = _ATTN_RE.findall(text)
    notes = [ln.strip()[-300:] for ln in text.splitlines()
             if ("WARNING" in ln or "ERROR" in ln or "INFO" in ln) and _NOTE_RE.search(ln) and not _KERNEL_RE.search(ln)]
    return {"linear_kernels": kernels, "quantization_logged": quant[0] if quant else None,
            "weight_memory_gib": float(load[0]) if load else None, "attention_backend": attn[0] if attn else None,
            "quant_log_lines": notes[:12]}


def build_request(target: BenchTarget, workload: Workload, options: BenchOptions, check_only: bool = False) -> dict:
    """The JSON request for the worker, prompts included (same ids as the torch backend)."""
    config = target.config()
    prompts = prompt_token_ids(workload, text_vocab_size(config), special_token_ids(config))
    dtype = options.dtype if options.dtype != "float32" else "auto"
    return {"model": str(target.path), "dtype": dtype, "gpu_memory_utilization": options.gpu_memory_utilization,
            "workload": workload.to_dict(), "prompts": prompts.tolist(), "enforce_eager": options.vllm_enforce_eager,
            "cudagraph_sizes": options.vllm_cudagraph_sizes, "trust_remote_code": target.trust_remote_code,
            "check_only": check_only, **_lora_request(target)}


def _lora_request(target: BenchTarget) -> dict:
    """The adapter fields of a request: vLLM's LoRA layers wrap its quantized linear methods (GPTQ, AWQ, Marlin)."""
    if target.adapter is None:
        return {}
    from stages.recovery.adapter import read_adapter_config, vllm_max_lora_rank

    return {"lora_path": target.adapter, "max_lora_rank": vllm_max_lora_rank(int(read_adapter_config(target.adapter)["r"]))}


def run_worker(request: dict, timeout_s: int, log_path: Path, env: Optional[dict] = None) -> dict[str, Any]:
    """Run one engine in a child process; returns its result plus what the log says."""
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        req_file, res_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_file.write_text(json.dumps(request))
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run([sys.executable, "-m", "stages.bench.vllm_worker", str(req_file), str(res_file)],
                                      stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                      env=_child_env(env))
                rc: Optional[int] = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        result = json.loads(res_file.read_text()) if res_file.is_file() else {"ok": False}
    text = log_path.read_text(errors="replace")
    if rc is None:
        result["error"] = f"timed out after {timeout_s} s"
    elif not result.get("ok") and "error" not in result:
        result["error"] = f"the worker exited with code {rc} before writing a result"
    result["log"] = str(log_path)
    result["log_tail"] = text[-3000:]
    result.update(parse_vllm_log(text))
    return result


def _child_env(extra: Optional[dict]) -> dict:
    env = {**os.environ, **(extra or {})}
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class VLLMBackend:
    """Benchmarks a model folder with vLLM's offline engine (one child process per model)."""

    name = "vllm"

    def run(self, target: BenchTarget, workload: Workload, options: BenchOptions,
            log: Callable[[str], None] = print, log_dir: Optional[Path] = None) -> dict[str, Any]:
        if not vllm_available():
            raise InputError(f"bench.backend=vllm needs the vllm package, which is not installed here; {INSTALL_HINT}")
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="vllm-logs-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        log(f"[bench] vLLM engine for {target.path} (log: {log_dir / 'vllm.log'})")
        res = run_worker(build_request(target, workload, options), options.vllm_timeout_s, log_dir / "vllm.log")
        if not res.get("ok"):
            raise InputError(f"vLLM could not benchmark {target.path}: {res.get('error')}; "
                             f"kernels logged: {res.get('linear_kernels')}; see {res['log']}")
        res.pop("ok", None)
        return {"backend": self.name, "device": options.device, "dtype": options.dtype,
                "peak_gpu_memory_bytes": None,
                "peak_gpu_memory_note": "vLLM preallocates gpu_memory_utilization of the card; see weight_memory_gib",
                **res}
