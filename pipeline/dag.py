"""The stage graph, declared once. `dvc.yaml` mirrors it (tests/test_dvc.py).

Each node names its implementation ("module:function", imported only when it runs), the
nodes it needs, the config keys that define its output (its fingerprint and its DVC
params) and the prefix its metrics get in MLflow.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Callable, Optional

from core.context import BASELINE, QUANTIZED
from core.schema import PipelineConfig
from core.store import fingerprint


@dataclass(frozen=True)
class StageSpec:
    name: str
    impl: str  # "module:function" taking (StageContext) -> StageResult
    needs: tuple[str, ...] = ()
    optional_needs: tuple[str, ...] = ()  # used when they are part of this run or already in the store
    params: tuple[str, ...] = ()  # dotted config keys that define the output
    metric_prefix: str = ""
    variant: str = QUANTIZED  # BASELINE nodes score the unquantized model
    uses_model: bool = True
    device_sensitive: bool = False  # fingerprint includes the resolved device type and dtype
    version: str = "1"
    description: str = ""
    # "module:function" (cfg section -> JSON data or None) identifying inputs the config cannot name,
    # e.g. the bytes of a local corpus; folded into the fingerprint.
    identity: Optional[str] = None
    identity_of: str = ""  # the config section passed to `identity`
    # "module:function" (PipelineConfig) -> bool: whether the node is part of the DAG for this config.
    # A disabled node is skipped, and the nodes that need it run without it (their fingerprints
    # then equal those of a DAG without the node).
    enabled_when: Optional[str] = None
    # "module:function" (stage config dict) -> the dict the fingerprint hashes, when the stage reads only
    # part of its params depending on their values (not quantize: its quant section is already exactly
    # the chosen method's config, core.schema.QUANT_CONFIGS).
    fingerprint_view: Optional[str] = None

    @property
    def module(self) -> str:
        return self.impl.partition(":")[0]

    def load(self) -> Callable[..., Any]:
        """Import the stage's run function."""
        module, _, attr = self.impl.partition(":")
        return getattr(importlib.import_module(module), attr)

    def enabled(self, cfg: PipelineConfig) -> bool:
        if self.enabled_when is None:
            return True
        module, _, attr = self.enabled_when.partition(":")
        return bool(getattr(importlib.import_module(module), attr)(cfg))

    def preflight(self) -> Optional[Callable[..., None]]:
        """The stage module's optional `preflight(cfg, model)` check, run before any work."""
        return getattr(importlib.import_module(self.module), "preflight", None)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("calibrate", "stages.calibrate:run", params=("calib",), metric_prefix="calib",
              identity="stages.calib_sources:source_identity", identity_of="calib",
              description="sample token sequences from the calibration text"),
    StageSpec("quantize", "stages.quantize:run", needs=("calibrate",), params=("quant", "run.seed"),
              metric_prefix="quantize", device_sensitive=True,
              identity="stages.quantize:data_parallel_identity", identity_of="run",
              description="RTN / GPTQ / AutoRound per block -> integer codes, scales, zeros"),
    StageSpec("recover", "stages.recover:run", needs=("quantize", "calibrate"), params=("recover", "run.seed"),
              metric_prefix="recover", device_sensitive=True, enabled_when="stages.recover:enabled",
              fingerprint_view="stages.recover:fingerprint_view",
              description="tune scales end to end or train LoRA adapters on the quantized model (recover.mode)"),
    StageSpec("pack", "stages.pack:run", needs=("quantize", "recover"), params=("pack", "model.dtype"),
              metric_prefix="pack", version="2",
              description="write a GPTQ or auto-round checkpoint folder"),
    StageSpec("baseline_evaluate", "stages.evaluate:run", params=("eval",), metric_prefix="baseline.eval",
              variant=BASELINE, device_sensitive=True, description="score the unquantized model"),
    StageSpec("evaluate", "stages.evaluate:run", needs=("pack", "baseline_evaluate"), params=("eval",),
              metric_prefix="eval", device_sensitive=True, description="score the packed checkpoint"),
    StageSpec("baseline_benchmark", "stages.benchmark:run", params=("bench",), metric_prefix="baseline.bench",
              variant=BASELINE, device_sensitive=True, version="1",
              description="throughput of the unquantized model"),
    StageSpec("benchmark", "stages.benchmark:run", needs=("pack", "baseline_benchmark"), params=("bench",),
              metric_prefix="bench", device_sensitive=True, description="throughput of the packed checkpoint"),
    StageSpec("report", "stages.report:run", needs=("quantize",),
              optional_needs=("recover", "pack", "evaluate", "baseline_evaluate", "benchmark", "baseline_benchmark"),
              params=("report.plots",), metric_prefix="report", uses_model=False,
              description="comparison table and plots for this run"),
)

@dataclass(frozen=True)
class Graph:
    """A stage graph and the questions the runner asks of it (the pipeline's is DAG below; tests pass their own)."""

    stages: tuple[StageSpec, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    @property
    def specs(self) -> dict[str, StageSpec]:
        return {s.name: s for s in self.stages}

    def topological_order(self) -> list[StageSpec]:
        """Stages in dependency order (stable: declaration order breaks ties); rejects cycles."""
        by_name = self.specs
        done: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in done:
                return
            if name in visiting:
                raise ValueError(f"stage graph has a cycle through {name}")
            visiting.add(name)
            spec = by_name[name]
            for dep in spec.needs + spec.optional_needs:
                visit(dep)
            visiting.discard(name)
            done.append(name)

        for s in self.stages:
            visit(s.name)
        return [by_name[n] for n in done]

    def active_names(self, cfg: PipelineConfig) -> set[str]:
        """The nodes that are part of the DAG for this config (see StageSpec.enabled_when)."""
        return {s.name for s in self.stages if s.enabled(cfg)}

    def upstream(self, name: str, active: Optional[set[str]] = None) -> set[str]:
        """All stages `name` depends on (required and optional), transitively, among `active` ones."""
        specs = self.specs
        out: set[str] = set()
        stack = list(sum(edges(specs[name], active), ()))
        while stack:
            dep = stack.pop()
            if dep not in out:
                out.add(dep)
                stack.extend(sum(edges(specs[dep], active), ()))
        return out

    def downstream(self, name: str, active: Optional[set[str]] = None) -> set[str]:
        """All stages that depend on `name`, transitively, among `active` ones (all when None)."""
        return {s.name for s in self.stages
                if (active is None or s.name in active) and name in self.upstream(s.name, active)}

    def select(self, stages: list[str]) -> list[StageSpec]:
        """The chosen subset (all when empty), in topological order."""
        chosen = set(stages) if stages else set(self.names)
        return [s for s in self.topological_order() if s.name in chosen]


def edges(spec: StageSpec, active: Optional[set[str]] = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(needs, optional needs) of a node, without the disabled nodes (all nodes when `active` is None)."""
    if active is None:
        return spec.needs, spec.optional_needs
    return tuple(d for d in spec.needs if d in active), tuple(d for d in spec.optional_needs if d in active)


DAG = Graph(STAGES)
STAGE_NAMES: tuple[str, ...] = DAG.names
SPECS: dict[str, StageSpec] = DAG.specs


def config_value(cfg: PipelineConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return asdict(node) if is_dataclass(node) else node


def stage_config(spec: StageSpec, cfg: PipelineConfig) -> dict[str, Any]:
    """The config subset that defines a stage's output (recorded in its manifest)."""
    return {key: config_value(cfg, key) for key in spec.params}


def stage_fingerprint(spec: StageSpec, cfg: PipelineConfig, input_fps: dict[str, str], model_fp: Optional[str],
                      device: str, dtype: str) -> str:
    """Hash of stage name + version + its config + input fingerprints (+ model, device when relevant)."""
    config = stage_config(spec, cfg)  # quant: the chosen method's config, exactly its fields
    if spec.fingerprint_view:
        module, _, attr = spec.fingerprint_view.partition(":")
        config = getattr(importlib.import_module(module), attr)(config)
    payload: dict[str, Any] = {"stage": spec.name, "version": spec.version, "config": config, "inputs": input_fps}
    if spec.identity:
        module, _, attr = spec.identity.partition(":")
        identity = getattr(importlib.import_module(module), attr)(getattr(cfg, spec.identity_of))
        if identity is not None:  # None: nothing beyond the config (keeps earlier fingerprints)
            payload["identity"] = identity
    if spec.uses_model:
        payload["model"] = model_fp
    if spec.device_sensitive:
        payload["device"] = device.split(":")[0]
        payload["dtype"] = dtype
    return fingerprint(payload)
