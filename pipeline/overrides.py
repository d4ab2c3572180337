"""Check command-line overrides against the schema and conf/ before Hydra composes anything.

Hydra would reject an unknown key too, but with a hint to append it (`+key=`); here the
message names the key, the keys that do exist (closest first) and a fix, and every value
of a sweep (`quant.bits=2,3,5`) is range-checked before the first job starts.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Iterable, List, Optional

from core.errors import ConfigError, choices, close_matches
from core.schema import QUANT_CONFIGS, PipelineConfig, QuantScheme, check_quant_keys, quant_keys
from pipeline.validate import check_field, check_writable

OUTPUTS_KEY = "run.outputs_dir"
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


def _check_key(key: str, quant_cls: type = QuantScheme) -> Any:
    """Walk the dataclass schema along a dotted key (`quant` as the chosen method's class); unknown parts
    raise ConfigError.

    Returns the field's type, or None when the key reaches inside a list or dict value.
    """
    node: Any = PipelineConfig
    path: list[str] = []
    for part in key.split("."):
        if path == ["quant"]:
            node = quant_cls
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None  # inside a list/dict value: Hydra checks the element type
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            where = ".".join(path) or "the config"
            prefix = ".".join(path + [""])
            hint = close_matches(part, names)
            fix = f"did you mean {prefix}{hint[len('did you mean '):]}" if hint else "see conf/ and core/schema.py"
            raise ConfigError(key, "...", f"{where} has keys: {', '.join(names)}", fix, problem="is not a known key")
        node = _field_type(node, part)
        path.append(part)
    return node


def _type_words(ftype: Any) -> str:
    """What a value of this schema type looks like on the command line."""
    args = [a for a in typing.get_args(ftype) if a is not type(None)]
    if type(None) in typing.get_args(ftype) and len(args) == 1:
        return f"{_type_words(args[0])}, or null"
    if typing.get_origin(ftype) in (list, List):
        item = typing.get_args(ftype)[0] if typing.get_args(ftype) else str
        if dataclasses.is_dataclass(item):
            return f"a list of mappings with keys {', '.join(f.name for f in dataclasses.fields(item))}"
        return f"a list such as [a,b] of {_type_words(item).split(', or')[0]} items"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(ftype, f"a {getattr(ftype, '__name__', ftype)} mapping")


def _show_default(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def _check_type(quant_cls: type, key: str, ftype: Any, value: Any) -> None:
    """The value must merge into the typed schema as Hydra will merge it (quant.sym=maybe does not)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(PipelineConfig(quant=quant_cls()))
    try:
        OmegaConf.update(schema, key, value, merge=True)
    except OmegaConfBaseException:
        default = OmegaConf.select(OmegaConf.structured(PipelineConfig(quant=quant_cls())), key,
                                   throw_on_missing=False, throw_on_resolution_failure=False)
        raise ConfigError(key, value, _type_words(ftype), f"e.g. {key}={_show_default(default)}") from None


def _values(override: Any) -> list[Any]:
    if override.is_sweep_override():
        return list(override.sweep_iterator())
    return [override.value()]


def parse_overrides(args: list[str]) -> list[Any]:
    """Hydra's parse of the overrides; a syntax error becomes a ConfigError naming the override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for arg in args:
        try:
            parsed.extend(parser.parse_overrides([arg]))
        except OverrideParseException as exc:
            key, _, value = arg.partition("=")
            reason = next((line for line in str(exc).splitlines() if not line.startswith(("Error parsing", "See "))),
                          "syntax error")
            raise ConfigError(key.lstrip("+~"), value or "(no value)", f"Hydra's override syntax: {reason}",
                              "write key=value; quote values with spaces or special characters, lists are [a,b], "
                              "a sweep is a,b (see python -m pipeline --help)", problem="cannot be parsed") from None
    return parsed


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def _default_choice(config: dict, group: str) -> Optional[str]:
    """The option a config's defaults list picks for `group` (`group: x` or `override /group: x`)."""
    for entry in config.get("defaults", []):
        if isinstance(entry, dict):
            for name, value in entry.items():
                if name.split()[-1].lstrip("/") == group:
                    return value
    return None


def _sweep_options(config: dict, group: str) -> list[str]:
    value = ((config.get("hydra") or {}).get("sweeper") or {}).get("params", {}).get(group)
    return [v.strip() for v in str(value).split(",")] if value else []


def _quant_options(chosen: dict[str, list[Any]], conf_dir: Path) -> list[Any]:
    """The conf/quant/ options the jobs use: quant=, else scheme= (its quant), else the experiment's choice
    (swept or in its defaults), else conf/config.yaml's default."""
    def of_schemes(schemes: list[Any]) -> list[Any]:
        return [_default_choice(_yaml(conf_dir / "scheme" / f"{v}.yaml"), "quant") for v in schemes]

    if "quant" in chosen or "scheme" in chosen:
        return list(chosen.get("quant", [])) or of_schemes(chosen["scheme"])
    options: list[Any] = []
    for name in chosen.get("experiment", []):
        exp = _yaml(conf_dir / "experiment" / f"{name}.yaml")
        found = _sweep_options(exp, "quant") or of_schemes(_sweep_options(exp, "scheme"))
        if not found:
            direct = _default_choice(exp, "quant")
            found = [direct] if direct else of_schemes([_default_choice(exp, "scheme")])
        options += found
    return options or [_default_choice(_yaml(conf_dir / "config.yaml"), "quant")]


def quant_methods(parsed: list[Any], conf_dir: Path) -> Optional[set[str]]:
    """The quant.method of every job the command line starts, or None when some cannot be told from
    conf/ (to_pipeline_config still checks each job's keys)."""
    chosen = {ov.key_or_group.lstrip("+"): _values(ov) for ov in parsed if not ov.is_delete()}
    methods = {(_yaml(conf_dir / "quant" / f"{o}.yaml").get("quant") or {}).get("method")
               for o in _quant_options(chosen, conf_dir)}
    return None if None in methods else methods


def _quant_class(key: str, value: Any, methods: Optional[set[str]]) -> type:
    """The config class that `key` is checked against: every chosen method must have the key."""
    name = key.split(".")[1] if key.count(".") else ""
    if not key.startswith("quant.") or name in {f.name for f in dataclasses.fields(QuantScheme)}:
        return QuantScheme
    candidates = sorted(methods) if methods else [m for m in QUANT_CONFIGS if name in quant_keys(m)]
    for method in candidates:
        check_quant_keys(method, {name: value})
    return QUANT_CONFIGS[candidates[0]] if candidates else QuantScheme


def check_cli_overrides(argv: list[str], conf_dir: Path) -> None:
    """Raise ConfigError for the first unknown key, unknown group option or out-of-range value."""
    groups = config_groups(conf_dir)
    parsed = parse_overrides(override_args(argv))
    methods = quant_methods(parsed, conf_dir)
    for ov in parsed:
        key = ov.key_or_group
        if key.startswith("hydra") or ov.is_delete():
            continue
        if key in groups:
            _check_option(conf_dir, key, _values(ov))
            continue
        shown = ov.input_line.partition("=")[2] if ov.input_line else _values(ov)[0]  # a sweep as written
        quant_cls = _quant_class(key, shown, methods)
        ftype = _check_key(key, quant_cls)
        for value in _values(ov):
            check_field(key, value)
            if ftype is not None:
                _check_type(quant_cls, key, ftype, value)
            if key == OUTPUTS_KEY and isinstance(value, str) and "${" not in value:
                check_writable(key, value, create=False)  # before Hydra creates its run folder in it


def _check_option(conf_dir: Path, group: str, values: list[Any]) -> None:
    options = group_options(conf_dir, group)
    for value in values:
        if not options:
            raise ConfigError(group, value, f"conf/{group}/ has no options yet", "add a YAML file there",
                              problem="is not an option of config group " + group)
        if value not in options:
            hint = close_matches(str(value), options)
            raise ConfigError(group, value, choices(options), hint or f"e.g. {group}={options[0]}",
                              problem="is not an option of config group " + group)
