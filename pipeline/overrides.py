"""Check command-line overrides against the schema and conf/ before Hydra composes anything.

Hydra would reject an unknown key too, but with a hint to append it (`+key=`); here the
message names the key, the keys that do exist (closest first) and a fix, and every value
of a sweep (`quant.bits=2,3,5`) is range-checked before the first job starts.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import ConfigError, choices, close_matches
from pipeline.schema import PipelineConfig
from pipeline.validate import check_field

# Hydra flags that consume the following argument.
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                     "--package", "-p", "--info", "-i", "--experimental-rerun"}


def override_args(argv: Iterable[str]) -> list[str]:
    """The override strings among Hydra's command-line arguments."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            skip = arg in _FLAGS_WITH_VALUE
            continue
        out.append(arg)
    return out


def group_options(conf_dir: Path, group: str) -> list[str]:
    folder = conf_dir / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def config_groups(conf_dir: Path) -> list[str]:
    return sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra")


def _field_type(schema: Any, name: str) -> Any:
    hints = typing.get_type_hints(schema)
    return hints[name]


def _check_key(key: str) -> None:
    """Walk the dataclass schema along a dotted key; unknown parts raise ConfigError."""
    node: Any = PipelineConfig
    path: list[str] = []
    for part in key.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return  # inside a list/dict value: Hydra checks the element type
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            where = ".".join(path) or "the config"
            prefix = ".".join(path + [""])
            hint = close_matches(part, names)
            fix = f"did you mean {prefix}{hint[len('did you mean '):]}" if hint else f"see conf/ and pipeline/schema.py"
            raise ConfigError(key, "...", f"{where} has keys: {', '.join(names)}", fix, problem="is not a known key")
        node = _field_type(node, part)
        path.append(part)


def _values(override: Any) -> list[Any]:
    if override.is_sweep_override():
        return list(override.sweep_iterator())
    return [override.value()]


def check_cli_overrides(argv: list[str], conf_dir: Path) -> None:
    """Raise ConfigError for the first unknown key, unknown group option or out-of-range value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    groups = config_groups(conf_dir)
    for ov in parser.parse_overrides(override_args(argv)):
        key = ov.key_or_group
        if key.startswith("hydra") or ov.is_delete():
            continue
        if key in groups:
            options = group_options(conf_dir, key)
            for value in _values(ov):
                if not options:
                    raise ConfigError(key, value, f"conf/{key}/ has no options yet", "add a YAML file there",
                                      problem="is not an option of config group " + key)
                if value not in options:
                    hint = close_matches(str(value), options)
                    raise ConfigError(key, value, choices(options), hint or f"e.g. {key}={options[0]}",
                                      problem="is not an option of config group " + key)
            continue
        _check_key(key)
        for value in _values(ov):
            check_field(key, value)
