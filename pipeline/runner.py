"""Run the selected stages of the DAG: fingerprint, skip what is cached, run the rest.

Order of events for one pipeline job:
1. fingerprints of every stage (selected or not) from the config and upstream fingerprints;
2. checks before work: upstream artifacts exist, stage modules exist, each stage's preflight;
3. stages in topological order, each cached or run inside the store's atomic writer;
4. a summary table.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from pipeline import dag
from core.context import SECONDS_METRIC, Artifact, StageContext, StageResult
from core.errors import InputError
from core.models import ModelHandle
from pipeline.models import prepare_model
from pipeline.runtime import Runtime
from core.schema import PipelineConfig
from core.store import ArtifactStore, export_artifact, import_exported
from pipeline.tracking import NullTracker

SKIPPED_FILE = "skipped.json"  # the export of a node the config switches off


@dataclass
class StageOutcome:
    name: str
    status: str  # ran | cached | skipped (a node the config switches off, e.g. recover.mode=none)
    seconds: float
    fingerprint: str
    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What one job will do, decided before any work: stages, fingerprints, inputs, forced stages."""

    selected: list[dag.StageSpec]
    fps: dict[str, str]
    inputs: dict[str, list[str]]  # stage -> upstream stages it reads (the ones its fingerprint covers)
    model: Optional[ModelHandle]
    forced: set[str]
    skipped: list[dag.StageSpec] = field(default_factory=list)  # selected but switched off by the config


class PipelineRunner:
    """Executes one pipeline job. Holds no global state; everything comes from the config."""

    def __init__(self, cfg: PipelineConfig, runtime: Runtime, tracker: Any = None, graph: dag.Graph = dag.DAG):
        self.cfg, self.rt, self.graph = cfg, runtime, graph
        self.tracker = tracker or NullTracker()
        self.store = ArtifactStore(Path(cfg.run.outputs_dir) / "store")
        self.log = runtime.log

    # -- planning -----------------------------------------------------------------------
    def plan(self) -> Plan:
        active = self.graph.active_names(self.cfg)
        chosen = self.graph.select(self.cfg.run.stages)
        selected = [s for s in chosen if s.name in active]
        selected_names = {s.name for s in selected}
        needed = set(selected_names)
        for s in selected:
            needed |= self.graph.upstream(s.name, active)
        model = None
        if any(self.graph.specs[n].uses_model for n in needed):
            model = prepare_model(self.cfg.model, self.store, self.log)
        fps: dict[str, str] = {}
        inputs: dict[str, list[str]] = {}
        for spec in self.graph.topological_order():
            if spec.name not in needed:
                continue
            needs, optional = dag.edges(spec, active)
            inputs[spec.name] = list(needs) + [
                d for d in optional if d in fps and (d in selected_names or self.store.entry(d, fps[d]).is_complete())]
            fps[spec.name] = dag.stage_fingerprint(spec, self.cfg, {d: fps[d] for d in inputs[spec.name]},
                                                   model.fingerprint if model else None,
                                                   self.rt.device, self.rt.dtype_name)
            if self.cfg.run.export_dir and spec.name not in selected_names:
                self._import_exported(spec.name, fps[spec.name])
        return Plan(selected, fps, inputs, model, self._forced(selected_names, active),
                    [s for s in chosen if s.name not in active])

    def _import_exported(self, stage: str, fp: str) -> None:
        """An upstream artifact that DVC restored at its export path counts as in the store."""
        src = Path(self.cfg.run.export_dir) / stage
        entry = self.store.entry(stage, fp)
        if not entry.is_complete() and import_exported(src, entry):
            self.log(f"[{stage}] imported from {src} (restored by DVC)")

    def check(self, plan: Plan) -> None:
        """Everything that can fail before work starts, in one pass."""
        fps = plan.fps
        selected_names = {s.name for s in plan.selected}
        for spec in plan.selected:
            for dep in (d for d in spec.needs if d in plan.inputs[spec.name]):
                if dep not in selected_names and not self.store.entry(dep, fps[dep]).reusable(self.log):
                    raise InputError(
                        f"stage '{spec.name}' needs '{dep}', which is neither selected nor in the store "
                        f"({self.store.entry(dep, fps[dep]).path}); add it: run.stages=[{dep},{spec.name},...]")
        for spec in plan.selected:
            if spec.name in plan.forced or not self.store.entry(spec.name, fps[spec.name]).is_complete():
                check = spec.preflight()
                if check is not None:
                    check(self.cfg, plan.model, spec)

    def _forced(self, selected_names: set[str], active: set[str]) -> set[str]:
        forced = set(self.cfg.run.force)
        for name in list(forced):
            forced |= self.graph.downstream(name, active) & selected_names
        return forced

    # -- execution ----------------------------------------------------------------------
    def run(self) -> list[StageOutcome]:
        plan = self.plan()
        self.check(plan)
        outcomes: list[StageOutcome] = []
        order = [s for s in self.graph.topological_order() if s in plan.selected or s in plan.skipped]
        bar = tqdm(order, desc="pipeline", unit="stage", disable=not self.cfg.run.progress, leave=True)
        for spec in bar:
            bar.set_postfix_str(spec.name)
            outcomes.append(self._skip(spec) if spec in plan.skipped else self._run_stage(spec, plan))
        bar.close()
        return outcomes

    def _run_stage(self, spec: dag.StageSpec, plan: Plan) -> StageOutcome:
        entry = self.store.entry(spec.name, plan.fps[spec.name])
        if spec.name in plan.forced and entry.is_complete():
            entry.remove()
        t0 = time.perf_counter()
        status = "cached"
        if not entry.reusable(self.log):
            with entry.writing() as work:
                if work is not None:  # None: another process finished it while we waited
                    status = "ran"
                    inputs = {d: self._artifact(d, plan.fps[d]) for d in plan.inputs[spec.name]}
                    ctx = self._context(spec, work.path, work.resumed, inputs, plan.model)
                    self.log(f"[{spec.name}] running ({'resuming' if work.resumed else 'fresh'}) -> {entry.path}")
                    result: StageResult = spec.load()(ctx)
                    metrics = {SECONDS_METRIC: round(time.perf_counter() - t0, 3), **result.metrics}
                    work.finish(config=dag.stage_config(spec, self.cfg),
                                inputs={k: a.fingerprint for k, a in inputs.items()},
                                metrics=metrics, summary=result.summary,
                                extra={"device": self.rt.device, "dtype": self.rt.dtype_name, "variant": spec.variant,
                                       "log_artifacts": result.artifacts})
        seconds = time.perf_counter() - t0
        manifest = entry.manifest()
        if status == "cached":
            self.log(f"[{spec.name}] cached ({entry.path})")
        self.tracker.log_stage(spec.metric_prefix, manifest, entry.path, status)
        if self.cfg.run.export_dir:
            export_artifact(entry.path, Path(self.cfg.run.export_dir) / spec.name, metrics=manifest.get("metrics", {}))
        return StageOutcome(spec.name, status, seconds, entry.fingerprint, entry.path, manifest.get("metrics", {}),
                            manifest.get("summary", {}))

    def _skip(self, spec: dag.StageSpec) -> StageOutcome:
        """A selected node the config switches off: reported, and exported as an empty folder for DVC."""
        why = f"switched off by the config ({spec.enabled_when})"
        self.log(f"[{spec.name}] skipped: {why}")
        path = Path(self.cfg.run.outputs_dir)
        if self.cfg.run.export_dir:  # DVC expects the stage's outs even when there is nothing to do
            path = Path(self.cfg.run.export_dir) / spec.name
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / SKIPPED_FILE).write_text(json.dumps({"stage": spec.name, "skipped": why}) + "\n")
                export_artifact(Path(tmp), path, metrics={})
        return StageOutcome(spec.name, "skipped", 0.0, "-", path, summary={"skipped": why})

    def _artifact(self, stage: str, fp: str) -> Artifact:
        entry = self.store.entry(stage, fp)
        return Artifact(stage, entry.path, entry.manifest())

    def _context(self, spec: dag.StageSpec, workdir: Path, resumed: bool, inputs: dict[str, Artifact],
                 model: Optional[ModelHandle]) -> StageContext:
        prefix = spec.metric_prefix

        def log_metric(name: str, value: float, step: Optional[int] = None) -> None:
            self.tracker.log_metric(f"{prefix}.{name}", value, step)

        return StageContext(cfg=self.cfg, stage=spec.name, variant=spec.variant, workdir=workdir, resumed=resumed,
                            inputs=inputs, model=model, device=self.rt.device, dtype=self.rt.dtype_name,
                            progress=self.cfg.run.progress, log=self.log, log_metric=log_metric)
