"""Range and choice checks for a composed config, run before any work starts.

Field rules are small functions keyed by dotted config key, so the same rule checks a
composed config (`validate_config`) and each value of a command-line sweep
(`pipeline.overrides`). Allowed values come from the registries, never typed here twice.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from core.errors import ConfigError, choices, one_of
from core.schema import SWITCHES, AutoRoundConfig, CalibratedConfig, PipelineConfig

SUPPORTED_BITS = (2, 3, 4, 8)
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _int_at_least(low: int, example: int) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(key, value, f"an integer >= {low}", f"e.g. {key}={example}")

    return check


def _number_at_least(low: float, example: float) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            raise ConfigError(key, value, f"a number >= {low}", f"e.g. {key}={example}")

    return check


def _positive_or_none(example: float) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(key, value, "a number > 0, or null for the default", f"e.g. {key}={example}")

    return check


def _positive(example: float) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(key, value, "a number > 0", f"e.g. {key}={example}")

    return check


def _nonempty_str(example: str) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(key, value, "a non-empty string", f"e.g. {key}={example}")

    return check


def _int_at_least_or_none(low: int, example: int) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if value is not None:
            _int_at_least(low, example)(key, value)

    return check


def _non_negative(example: float) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(key, value, "a number >= 0", f"e.g. {key}={example}")

    return check


def _module_names(key: str, value: Any) -> None:
    """recover.target_modules: a non-empty list of module names (matched against the model by the preflight)."""
    if not value or any(not isinstance(v, str) or not v.strip() for v in value):
        raise ConfigError(key, value, "a non-empty list of Linear module names", f"e.g. {key}=[q_proj,v_proj]")


def _limit(key: str, value: Any) -> None:
    """eval.limit: null, a fraction in (0, 1), or a whole number of documents."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (value >= 1 and float(value) != int(value)):
        raise ConfigError(key, value, "null for all documents, a fraction in (0, 1), or a whole number >= 1",
                          f"e.g. {key}=100")


def _list_of_names(key: str, value: Any, example: str) -> None:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, value, f"a list such as [{example}]", f"e.g. {key}=[{value}]")


def _task_names(key: str, value: Any) -> None:
    """eval.tasks: task names (whether each exists is checked by the evaluate stage's preflight)."""
    _list_of_names(key, value, "persuasion_nextsent")
    for name in value:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(key, value, "a list of lm-eval task names", f"e.g. {key}=[persuasion_nextsent]")


def _choice(options_fn: Callable[[], Any], example: Any = None) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        one_of(key, value, list(options_fn()), example)

    return check


def _bits(key: str, value: Any) -> None:
    if value not in SUPPORTED_BITS:
        raise ConfigError(key, value, choices(SUPPORTED_BITS), f"e.g. {key}=4")


def _group_size(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (value != -1 and value < 1):
        raise ConfigError(key, value, "-1 for per-output-channel, or a group size >= 1 such as 32, 64, 128",
                          f"e.g. {key}=128")


def _fraction(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(key, value, "a number in (0, 1]", f"e.g. {key}=0.01")


def _shard_size(key: str, value: Any) -> None:
    from stages.formats import parse_size

    parse_size(value, key)


def _device(key: str, value: Any) -> None:
    if not isinstance(value, str) or not DEVICE_RE.match(value):
        raise ConfigError(key, value, "auto, cpu, cuda or cuda:N", f"e.g. {key}=auto")


def _stage_list(key: str, value: Any) -> None:
    from pipeline.dag import STAGE_NAMES

    _list_of_names(key, value, "calibrate,quantize")
    for name in value:
        one_of(key, name, STAGE_NAMES)


def _model_sources():
    from pipeline.models import MODEL_SOURCES

    return MODEL_SOURCES


def _registry(name: str, extra: tuple = ()):
    def options():
        from stages import registry

        return list(extra) + list(getattr(registry, name))

    return options


FIELD_RULES: dict[str, Callable[[str, Any], None]] = {
    "model.source": _choice(_model_sources, "gguf"),
    "model.dtype": _choice(lambda: DTYPES, "bfloat16"),
    "calib.source": _choice(_registry("CALIB_SOURCES"), "austen"),
    "calib.mode": _choice(_registry("CALIB_MODES"), "doc_prefix"),
    "calib.text_split": _choice(_registry("CALIB_TEXT_SPLITS"), "chapter"),
    "calib.nsamples": _int_at_least(1, 128),
    "calib.seqlen": _int_at_least(8, 2048),
    "calib.seed": _int_at_least(0, 42),
    "calib.split": _nonempty_str("train"),
    "calib.text_field": _nonempty_str("text"),
    "quant.method": _choice(_registry("QUANT_METHODS"), "autoround"),
    "quant.bits": _bits,
    "quant.group_size": _group_size,
    "quant.iters": _int_at_least(0, 200),
    "quant.lr": _positive_or_none(0.005),
    "quant.minmax_lr": _positive_or_none(0.005),
    "quant.batch_size": _int_at_least(1, 8),
    "quant.grad_accum": _int_at_least(1, 1),
    "quant.damp_percent": _fraction,
    "quant.block_columns": _int_at_least(1, 128),
    "recover.mode": _choice(_registry("RECOVER_MODES", ("none",)), "scales"),
    "recover.loss": _choice(_registry("RECOVER_LOSSES"), "kl"),
    "recover.teacher": _choice(_registry("RECOVER_TEACHERS"), "topk"),
    "recover.schedule": _choice(_registry("RECOVER_SCHEDULES"), "cosine"),
    "recover.lora_init": _choice(_registry("LORA_INITS"), "peft"),
    "recover.topk": _int_at_least(1, 64),
    "recover.steps": _int_at_least(0, 200),
    "recover.lr": _positive_or_none(0.001),
    "recover.scales_lr": _positive_or_none(0.002),
    "recover.warmup_steps": _int_at_least(0, 0),
    "recover.batch_size": _int_at_least(1, 8),
    "recover.grad_accum": _int_at_least(1, 1),
    "recover.weight_decay": _non_negative(0.0),
    "recover.max_grad_norm": _positive_or_none(1.0),
    "recover.val_samples": _int_at_least(0, 0),
    "recover.checkpoint_every": _int_at_least(0, 50),
    "recover.rank": _int_at_least(1, 16),
    "recover.alpha": _positive(32),
    "recover.target_modules": _module_names,
    "quant.int8_threshold": _number_at_least(0.0, 6.0),
    "pack.format": _choice(_registry("PACK_FORMATS"), "auto"),
    "pack.packing_format": _choice(_registry("PACKING_FORMATS"), "auto"),
    "pack.max_shard_size": _shard_size,
    "eval.backend": _choice(_registry("EVAL_BACKENDS"), "hf"),
    "eval.task_source": _choice(_registry("EVAL_TASK_SOURCES"), "local"),
    "eval.tasks": _task_names,
    "eval.num_fewshot": _int_at_least_or_none(0, 0),
    "eval.batch_size": _int_at_least(1, 8),
    "eval.vllm_gpu_memory_utilization": _fraction,
    "eval.limit": _limit,
    "eval.max_length": _int_at_least_or_none(16, 2048),
    "eval.perplexity.seqlen": _int_at_least(2, 512),
    "eval.perplexity.stride": _int_at_least(1, 512),
    "eval.perplexity.max_windows": _int_at_least_or_none(1, 16),
    "bench.backend": _choice(_registry("BENCH_BACKENDS", ("auto",)), "auto"),
    "bench.num_prompts": _int_at_least(1, 16),
    "bench.input_len": _int_at_least(1, 32),
    "bench.output_len": _int_at_least(1, 32),
    "bench.warmup": _int_at_least(0, 1),
    "bench.repeats": _int_at_least(1, 3),
    "bench.gpu_memory_utilization": _fraction,
    "bench.compile": _choice(lambda: SWITCHES, "auto"),
    "bench.cuda_graphs": _choice(lambda: SWITCHES, "auto"),
    "quant.compile": _choice(lambda: SWITCHES, "auto"),
    "bench.linear_kernel": _choice(_registry("BENCH_LINEAR_KERNELS"), "auto"),
    "bench.kernel_tuning": _choice(lambda: ("full", "quick"), "full"),
    "bench.vllm_timeout_s": _int_at_least(1, 1800),
    "run.device": _device,
    "run.nproc_per_node": _int_at_least(1, 2),
    "run.nnodes": _int_at_least(1, 1),
    "run.node_rank": _int_at_least(0, 0),
    "run.stages": _stage_list,
    "run.force": _stage_list,
}


def check_field(key: str, value: Any) -> None:
    """Check one dotted key's value if a rule exists for it."""
    rule = FIELD_RULES.get(key)
    if rule is not None:
        rule(key, value)


def _walk(cfg: PipelineConfig) -> Iterator[tuple[str, Any]]:
    """(key, value) of every FIELD_RULES key the config has (a quant.* key of another method it has not)."""
    missing = object()
    for key in FIELD_RULES:
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part, missing)
        if node is not missing:
            yield key, node


def validate_config(cfg: PipelineConfig) -> None:
    """Raise ConfigError for the first bad value; cross-field and filesystem checks too."""
    for key, value in _walk(cfg):
        check_field(key, value)
    q, c = cfg.quant, cfg.calib
    from stages.registry import QUANT_CONFIG_CHECKS, resolve

    if q.method in QUANT_CONFIG_CHECKS:  # a method with rules of its own (bitsandbytes: fixed scheme, no tuning)
        resolve(QUANT_CONFIG_CHECKS, "quant.method", q.method)(cfg)
    elif isinstance(q, CalibratedConfig) and q.batch_size > c.nsamples:
        raise ConfigError("quant.batch_size", q.batch_size, f"at most calib.nsamples={c.nsamples}",
                          f"e.g. quant.batch_size={min(8, c.nsamples)} or calib.nsamples={q.batch_size}",
                          problem="exceeds the number of calibration samples")
    for i, ov in enumerate(q.overrides):
        _check_override(f"quant.overrides[{i}]", ov)
    from stages.pack import check_exact

    check_exact(cfg.pack, q)  # a format that cannot hold the scheme fails before any model work
    for b in cfg.bench.batch_sizes:
        _int_at_least(1, 16)("bench.batch_sizes", b)
    if cfg.eval.perplexity.stride > cfg.eval.perplexity.seqlen:
        raise ConfigError("eval.perplexity.stride", cfg.eval.perplexity.stride,
                          f"at most eval.perplexity.seqlen={cfg.eval.perplexity.seqlen}",
                          f"e.g. eval.perplexity.stride={cfg.eval.perplexity.seqlen}")
    _check_distributed(cfg)
    _check_model_paths(cfg)
    check_writable("run.outputs_dir", cfg.run.outputs_dir)


def _check_distributed(cfg: PipelineConfig) -> None:
    """A data-parallel quantize stage: the node layout, and work that splits evenly across the ranks."""
    r, q = cfg.run, cfg.quant
    world = r.nproc_per_node * r.nnodes
    if r.node_rank >= r.nnodes:
        raise ConfigError("run.node_rank", r.node_rank, f"0..{r.nnodes - 1} for run.nnodes={r.nnodes}",
                          "e.g. run.node_rank=0 on the first node")
    if r.nnodes > 1 and not re.fullmatch(r"[^\s:]+:\d+", str(r.rdzv_endpoint or "")):
        raise ConfigError("run.rdzv_endpoint", r.rdzv_endpoint, "host:port of node 0, reachable from every node",
                          "e.g. run.rdzv_endpoint=node001:29500", problem="is required when run.nnodes > 1")
    if world == 1 or not isinstance(q, CalibratedConfig):
        return
    if isinstance(q, AutoRoundConfig) and q.batch_size % world:
        raise ConfigError("quant.batch_size", q.batch_size, f"a multiple of the {world} ranks "
                          f"(run.nproc_per_node={r.nproc_per_node} x run.nnodes={r.nnodes}): each rank tunes on an "
                          "equal share of every mini-batch",
                          f"e.g. quant.batch_size={max(world, q.batch_size - q.batch_size % world)}",
                          problem="does not divide across the ranks")
    if cfg.calib.nsamples < world:
        raise ConfigError("calib.nsamples", cfg.calib.nsamples, f"at least one sample per rank ({world} ranks)",
                          f"e.g. calib.nsamples={max(128, world)}", problem="is smaller than the number of ranks")


def _check_override(key: str, ov: Any) -> None:
    if not ov.pattern:
        raise ConfigError(f"{key}.pattern", ov.pattern, "a layer name or a regex", f"e.g. {key}.pattern='.*mlp.down_proj'")
    try:
        re.compile(ov.pattern)
    except re.error as exc:
        raise ConfigError(f"{key}.pattern", ov.pattern, f"a valid regular expression ({exc})", "escape special characters") from exc
    if ov.bits is not None:
        _bits(f"{key}.bits", ov.bits)
    if ov.group_size is not None:
        _group_size(f"{key}.group_size", ov.group_size)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(path))


def _check_model_paths(cfg: PipelineConfig) -> None:
    m = cfg.model
    if m.source == "hf":
        if not m.name_or_path:
            raise ConfigError("model.name_or_path", m.name_or_path, "a Hugging Face model id or a local folder",
                              "e.g. model.name_or_path=meta-llama/Meta-Llama-3-8B", problem="is required when model.source=hf")
        folder = Path(m.name_or_path).expanduser()
        if _looks_local(m.name_or_path) and not (folder / "config.json").is_file():
            raise ConfigError("model.name_or_path", m.name_or_path, "a folder with config.json and weights",
                              "point it at a saved model folder or use a hub id", problem="is not a model folder")
        if _looks_local(m.name_or_path):
            from pipeline.weights_check import check_model_folder

            problem = check_model_folder(folder)
            if problem:
                raise ConfigError("model.name_or_path", m.name_or_path, problem,
                                  "copy or download the model again, or save it again with save_pretrained",
                                  problem="holds damaged weights")
        else:
            from pipeline.models import model_commit

            model_commit(m, cfg.run.offline)  # a hub id must resolve (cache offline, hub online) before any work
    elif m.source == "gguf":
        from pipeline.models import find_gguf

        find_gguf(m)  # raises ConfigError naming the key


def check_writable(key: str, path: str, create: bool = True) -> None:
    """Fail at once, with one ConfigError, if the outputs folder cannot be used.

    An existing folder must take a new file; a missing one needs an existing, writable parent
    (only the last level is ever created, so a mistyped parent path is caught). With
    `create=False` (before Hydra starts) nothing is created: the probe file is removed.
    """
    p = Path(path).expanduser()
    fix = f"choose another folder, e.g. {key}=/tmp/autoround-outputs"
    parent = p.parent
    if not p.exists() and parent.exists() and not parent.is_dir():
        raise ConfigError(key, path, f"its parent {parent} is a file", fix, problem="cannot be created")
    if not p.exists() and not parent.is_dir():
        raise ConfigError(key, path, f"its parent folder {parent} does not exist",
                          f"create the parent first (mkdir -p {parent}) or {fix}", problem="cannot be created")
    if p.exists() and not p.is_dir():
        raise ConfigError(key, path, "a folder is needed and this is a file", fix, problem="is not a folder")
    try:
        if create:
            p.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p if p.is_dir() else parent, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(key, path, f"creating a file there failed: {exc.strerror or exc}", fix,
                          problem="is not writable") from exc
