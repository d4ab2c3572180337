"""Run gemlite's own Triton kernels on the CPU under Triton's interpreter (test-only shims).

gemlite 0.6 reads the GPU at import time (device name, compute capability, SM count, the
Triton driver's target) and its autotuner times configs with CUDA events. On a CPU-only
torch those calls fail, so `install()` answers them as an sm_90 card would (the values only
pick tuning tables and code paths; the arithmetic runs in the interpreter), gives Triton a
driver stub whose benchmarker runs a config once, and fixes three interpreter gaps of Triton
3.6 with NumPy 2.4 that gemlite's kernels hit: bool kernel arguments, `tl.range` loop
variables that kernels use as tensors, and scalar loop bounds. Must run in a fresh process
with TRITON_INTERPRET=1 set before triton is imported (tests/_gemlite_interp_cases.py).
"""

from __future__ import annotations

import types


def _patch_interpreter() -> None:
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as itp

    from _kernel_helpers import patch_triton_interpreter_for_numpy2

    patch_triton_interpreter_for_numpy2()
    orig_cvt, orig_core = itp._implicit_cvt, itp._patch_lang_core

    def cvt(arg):
        if isinstance(arg, bool):  # bool subclasses int; the interpreter would store it as int32 under an i1 type
            return tl.tensor(itp.TensorHandle(np.array([arg], dtype=np.bool_), tl.int1), tl.int1)
        return orig_cvt(arg)

    def tensor_range(arg1, arg2=None, step=None, **_):
        start, end = (0, arg1) if arg2 is None else (arg1, arg2)
        for i in range(int(start), int(end), int(step or 1)):  # compiled Triton hands the body a tensor, not an int
            yield tl.tensor(itp.TensorHandle(np.array([i], dtype=np.int32), tl.int32), tl.int32)

    def core(lang, scope):
        orig_core(lang, scope)
        scope.set_attr(lang, "range", tensor_range)

    itp._implicit_cvt, itp._patch_lang_core = cvt, core


def install() -> None:
    """Make `import gemlite` and its kernels work on a CPU-only torch under TRITON_INTERPRET=1."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132)
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_properties = lambda *a, **k: props

    class CpuDriver:
        utils = types.SimpleNamespace(get_device_properties=lambda i: {"max_shared_mem": 232448})

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def get_benchmarker(self):
            def bench(fn, quantiles=None, **_):
                fn()  # every config runs once (and so is checked); timings are meaningless here
                return [1.0, 1.0, 1.0]
            return bench

        def get_empty_cache_for_benchmark(self):
            return torch.empty(1)

        def clear_cache(self, cache):
            pass

    triton.runtime.driver.set_active(CpuDriver())
    _patch_interpreter()
