"""Hydra application: compose the config, validate it, run the DAG, track it in MLflow."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError, InputError, one_of
from pipeline.dag import DAG, Graph
from pipeline.next_steps import format_next_steps
from pipeline.runner import PipelineRunner
from pipeline.runtime import setup_runtime
from core.schema import GROUP_SCHEMAS, QUANT_CONFIGS, PipelineConfig, QuantScheme, check_quant_keys
from core.summary import format_summary
from pipeline.validate import validate_config

log = logging.getLogger("pipeline")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
USER_ERRORS = (ConfigError, InputError)


def method_schema(cls: type) -> DictConfig:
    """A method's config node for `conf/quant/*.yaml` to extend: typed as the method's class, with the
    shared scheme fields the method does not fix left missing, so that merging it keeps the scheme set
    before it (conf/config.yaml)."""
    node = OmegaConf.structured(cls)
    for f in dataclasses.fields(QuantScheme):
        if f.name != "method" and f.name not in cls.fixed_scheme:
            node[f.name] = "???"
    return node


def register_configs() -> None:
    """Register the typed schemas so YAML values are type-checked on composition: the pipeline, each
    group, and each quantization method as `quant/<method>_schema` (the defaults of conf/quant/*.yaml)."""
    cs = ConfigStore.instance()
    cs.store(name="pipeline_schema", node=PipelineConfig(quant=QuantScheme()))
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)
    for method, cls in QUANT_CONFIGS.items():
        cs.store(group="quant", name=f"{method}_schema", node=method_schema(cls))


def to_pipeline_config(dcfg: DictConfig) -> PipelineConfig:
    """Convert the composed DictConfig (minus the hydra node) to the typed dataclass, once; the quant
    section becomes the chosen method's class (a key that class lacks is one ConfigError)."""
    container = job_container(dcfg)
    quant = container.get("quant", {})
    method = quant.get("method", "")
    one_of("quant.method", method, QUANT_CONFIGS, "autoround")
    check_quant_keys(method, quant)
    typed = OmegaConf.structured(PipelineConfig(quant=QUANT_CONFIGS[method]()))
    return OmegaConf.to_object(OmegaConf.merge(typed, container))


def job_container(dcfg: DictConfig) -> dict:
    """The job's config as plain resolved data, without Hydra's own node."""
    raw = OmegaConf.to_container(dcfg, resolve=False)
    raw.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)


def compose_job_config(overrides: list[str]) -> tuple[PipelineConfig, DictConfig]:
    """Compose conf/ exactly like `python -m pipeline <overrides>` (for scripts and tests).

    Returns:
        (typed PipelineConfig, the composed DictConfig including the hydra node).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        dcfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    return to_pipeline_config(dcfg), dcfg


def _hydra_info() -> tuple[list[str], Optional[Path]]:
    """Task overrides, and the sweep folder when this job is part of a multirun."""
    if not HydraConfig.initialized():
        return [], None
    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    return list(hc.overrides.task), sweep_dir


def open_tracker(cfg: PipelineConfig, overrides: list[str], sweep_dir: Optional[Path]) -> Any:
    from dataclasses import asdict

    from pipeline import tracking
    from pipeline.models import model_commit
    from core.store import git_commit

    if not cfg.tracking.enabled:
        return tracking.NullTracker()
    container = asdict(cfg)  # the typed, resolved config: no second resolution of the DictConfig
    parent = None
    if sweep_dir is not None and (sweep_dir / tracking.PARENT_RUN_FILE).is_file():
        parent = (sweep_dir / tracking.PARENT_RUN_FILE).read_text().strip()
    tags = {"git_commit": git_commit() or "unknown", "quant.method": cfg.quant.method, "model.name": cfg.model.name,
            "overrides": " ".join(overrides) or "(none)"}
    params = tracking.flatten(container)
    commit = model_commit(cfg.model, cfg.run.offline)
    if commit:
        params["model.commit"] = commit
    name = cfg.tracking.run_name or f"{cfg.quant.method}-w{cfg.quant.bits}g{cfg.quant.group_size}"
    tracker = tracking.open_run(cfg.tracking, params, tags, name, parent)
    tracker.log_text(OmegaConf.to_yaml(container), "config/resolved.yaml")
    tracker.log_text("\n".join(overrides) + "\n", "config/overrides.txt")
    return tracker


def run_job(dcfg: DictConfig, graph: Optional[Graph] = None) -> list:
    """One pipeline job over `graph` (the pipeline's DAG when None); returns the stage outcomes. User errors
    exit with status 2 and one message."""
    overrides, sweep_dir = _hydra_info()
    try:
        cfg = to_pipeline_config(dcfg)
        validate_config(cfg)
        rt = setup_runtime(cfg, log.info)
        if cfg.run.node_rank > 0:  # another node of a multi-node run: it only joins the quantize stage
            from pipeline.follower import follow

            follow(cfg, rt)
            return []
        tracker = open_tracker(cfg, overrides, sweep_dir)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        outcomes = PipelineRunner(cfg, rt, tracker, graph or DAG).run()
    except USER_ERRORS as exc:
        tracker.end("FAILED")
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except BaseException:
        tracker.end("KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    summary = format_summary(outcomes)
    print("\n" + summary)
    if sweep_dir is None:
        print("\n" + format_next_steps(cfg, outcomes, rt.device, overrides))
    if getattr(tracker, "run_id", None):
        tracker.log_text(summary + "\n", "summary.md")
    tracker.end()
    return outcomes


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(dcfg: DictConfig) -> list:
    # The outcomes reach SweepCallback.on_job_end, which records them in the job's job.json.
    return run_job(dcfg)


def main() -> None:
    """Console entry: check overrides first (clear errors), then hand over to Hydra."""
    from pipeline.overrides import check_cli_overrides

    register_configs()
    try:
        check_cli_overrides(sys.argv[1:], Path(CONF_DIR))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    hydra_main()
