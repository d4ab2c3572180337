"""Run the selected stages of the DAG: fingerprint, skip what is cached, run the rest.

Order of events for one pipeline job:
1. fingerprints of every stage (selected or not) from the config and upstream fingerprints;
2. checks before work: upstream artifacts exist, stage modules exist, each stage's preflight;
3. stages in topological order, each cached or run inside the store's atomic writer;
4. a summary table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from pipeline import dag
from pipeline.context import Artifact, StageContext, StageResult
from pipeline.errors import InputError
from pipeline.models import ModelHandle, prepare_model
from pipeline.runtime import Runtime
from pipeline.schema import PipelineConfig
from pipeline.store import ArtifactStore, export_artifact, import_exported
from pipeline.tracking import NullTracker


@dataclass
class StageOutcome:
    name: str
    status: str  # ran | cached
    seconds: float
    fingerprint: str
    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


class PipelineRunner:
    """Executes one pipeline job. Holds no global state; everything comes from the config."""

    def __init__(self, cfg: PipelineConfig, runtime: Runtime, tracker: Any = None):
        self.cfg, self.rt = cfg, runtime
        self.tracker = tracker or NullTracker()
        self.store = ArtifactStore(Path(cfg.run.outputs_dir) / "store")
        self.log = runtime.log

    # -- planning -----------------------------------------------------------------------
    def plan(self) -> tuple[list[dag.StageSpec], dict[str, str], Optional[ModelHandle]]:
        selected = dag.select(self.cfg.run.stages)
        needed = {s.name for s in selected}
        for s in selected:
            needed |= dag.upstream(s.name)
        model = None
        if any(dag.SPECS[n].uses_model for n in needed):
            model = prepare_model(self.cfg.model, self.store, self.log)
        fps: dict[str, str] = {}
        for spec in dag.topological_order():
            if spec.name not in needed:
                continue
            inputs = {d: fps[d] for d in spec.needs}
            for d in spec.optional_needs:
                if d in fps and (d in {s.name for s in selected} or self.store.entry(d, fps[d]).is_complete()):
                    inputs[d] = fps[d]
            fps[spec.name] = dag.stage_fingerprint(spec, self.cfg, inputs, model.fingerprint if model else None,
                                                   self.rt.device, self.rt.dtype_name)
            if self.cfg.run.export_dir and spec not in selected:
                self._import_exported(spec.name, fps[spec.name])
        return selected, fps, model

    def _import_exported(self, stage: str, fp: str) -> None:
        """An upstream artifact that DVC restored at its export path counts as in the store."""
        src = Path(self.cfg.run.export_dir) / stage
        entry = self.store.entry(stage, fp)
        if not entry.is_complete() and import_exported(src, entry):
            self.log(f"[{stage}] imported from {src} (restored by DVC)")

    def _inputs_of(self, spec: dag.StageSpec, fps: dict[str, str], selected_names: set[str]) -> list[str]:
        names = list(spec.needs)
        names += [d for d in spec.optional_needs
                  if d in fps and (d in selected_names or self.store.entry(d, fps[d]).is_complete())]
        return names

    def check(self, selected: list[dag.StageSpec], fps: dict[str, str], model: Optional[ModelHandle]) -> None:
        """Everything that can fail before work starts, in one pass."""
        selected_names = {s.name for s in selected}
        forced = self._forced(selected_names)
        for spec in selected:
            for dep in spec.needs:
                if dep not in selected_names and not self.store.entry(dep, fps[dep]).is_complete():
                    raise InputError(
                        f"stage '{spec.name}' needs '{dep}', which is neither selected nor in the store "
                        f"({self.store.entry(dep, fps[dep]).path}); add it: run.stages=[{dep},{spec.name},...]")
            spec.load()  # NotImplementedStageError for a missing module
        for spec in selected:
            if spec.name in forced or not self.store.entry(spec.name, fps[spec.name]).is_complete():
                check = spec.preflight()
                if check is not None:
                    check(self.cfg, model, spec)

    def _forced(self, selected_names: set[str]) -> set[str]:
        forced = set(self.cfg.run.force)
        for name in list(forced):
            forced |= dag.downstream(name) & selected_names
        return forced

    # -- execution ----------------------------------------------------------------------
    def run(self) -> list[StageOutcome]:
        selected, fps, model = self.plan()
        self.check(selected, fps, model)
        selected_names = {s.name for s in selected}
        forced = self._forced(selected_names)
        outcomes: list[StageOutcome] = []
        bar = tqdm(selected, desc="pipeline", unit="stage", disable=not self.cfg.run.progress, leave=True)
        for spec in bar:
            bar.set_postfix_str(spec.name)
            outcomes.append(self._run_stage(spec, fps, model, spec.name in forced, selected_names))
        bar.close()
        return outcomes

    def _run_stage(self, spec: dag.StageSpec, fps: dict[str, str], model: Optional[ModelHandle], force: bool,
                   selected_names: set[str]) -> StageOutcome:
        entry = self.store.entry(spec.name, fps[spec.name])
        if force and entry.is_complete():
            entry.remove()
        t0 = time.perf_counter()
        status = "cached"
        if not entry.is_complete():
            with entry.writing() as work:
                if work is not None:  # None: another process finished it while we waited
                    status = "ran"
                    inputs = {d: self._artifact(d, fps[d]) for d in self._inputs_of(spec, fps, selected_names)}
                    ctx = self._context(spec, work.path, work.resumed, inputs, model)
                    self.log(f"[{spec.name}] running ({'resuming' if work.resumed else 'fresh'}) -> {entry.path}")
                    result: StageResult = spec.load()(ctx)
                    metrics = {"seconds": round(time.perf_counter() - t0, 3), **result.metrics}
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
                            progress=self.cfg.run.progress, log=self.log, log_metric=log_metric,
                            extra={"store": self.store})
