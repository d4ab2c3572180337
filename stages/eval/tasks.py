"""Which lm-eval tasks exist: the local ones shipped in stages/tasks/, and lm-eval's own (hub) tasks.

Local tasks are indexed by a TaskManager that skips lm-eval's ~15k built-in task files (fast
startup, no network). Hub tasks use lm-eval's default index plus the local folder; their
datasets download from the Hugging Face Hub.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterable

import yaml

from core.errors import ConfigError, close_matches

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
PAPER_TASKS = ("winogrande", "hellaswag", "piqa", "arc_easy", "arc_challenge", "lambada_openai")


class _IgnoreTags(yaml.SafeLoader):
    """Reads task names without resolving lm-eval's `!function` tags."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: None)


def local_task_names() -> tuple[str, ...]:
    """Names of the tasks shipped in stages/tasks/ (from their YAML `task:` keys)."""
    names = []
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_IgnoreTags)
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            names.append(doc["task"])
    return tuple(names)


def local_task_manager() -> Any:
    """A TaskManager over the shipped tasks only (lm-eval's built-in index is skipped)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def hub_task_manager() -> Any:
    """lm-eval's default TaskManager, with the shipped tasks included too."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=True)


@functools.lru_cache(maxsize=1)
def hub_task_names() -> frozenset[str]:
    """Every task, group and tag name lm-eval knows (indexes its built-in YAMLs: a few seconds)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_defaults=True).all_tasks)


def _needs_network(names: list[str], key: str) -> ConfigError:
    return ConfigError(key, names, "lm-eval hub tasks download their datasets from the Hugging Face Hub",
                       "they need network: add run.offline=false on a machine with internet access "
                       "(e.g. eval=paper run.offline=false); offline, use the shipped tasks: eval=local",
                       problem="needs network")


def check_task_names(tasks: Iterable[str], task_source: str, offline: bool, key: str = "eval.tasks") -> None:
    """Raise one ConfigError for an unknown task or a hub task that cannot run here.

    Args:
        tasks: requested task names.
        task_source: eval.task_source (local | hub).
        offline: whether the Hugging Face Hub is off limits (run.offline or HF_HUB_OFFLINE).
        key: config key named in errors.
    """
    local = set(local_task_names())
    remote = [t for t in tasks if t not in local]
    if not remote:
        return
    hub = hub_task_names()
    unknown = [t for t in remote if t not in hub]
    if unknown:
        name = unknown[0]
        hint = close_matches(name, sorted(local | hub), n=5)
        raise ConfigError(key, name, f"an lm-eval task: shipped here: {', '.join(sorted(local))}; "
                          f"or one of lm-eval's {len(hub)} hub tasks",
                          hint or "list them with: lm-eval ls tasks", problem="is not a known task")
    if offline:
        raise _needs_network(remote, key)
    if task_source != "hub":
        raise ConfigError("eval.task_source", task_source, f"hub, to run lm-eval's own tasks {remote}",
                          "e.g. eval=paper run.offline=false, or eval.task_source=hub",
                          problem="does not include hub tasks")
