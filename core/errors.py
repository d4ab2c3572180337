"""One exception type for bad configuration or inputs, formatted the same way everywhere."""

from __future__ import annotations

import difflib
from typing import Iterable, Optional


class ConfigError(ValueError):
    """A bad config value or input: names the key, the value, what is allowed and a fix.

    Example message: ``quant.bits=5 is not supported (choose from 2, 3, 4, 8); e.g. quant.bits=4``
    """

    def __init__(self, key: str, value: object, allowed: str, fix: Optional[str] = None, problem: str = "is not supported"):
        self.key, self.value, self.allowed, self.fix = key, value, allowed, fix
        msg = f"{key}={_show(value)} {problem} ({allowed})"
        if fix:
            msg += f"; {fix}"
        super().__init__(msg)


class InputError(RuntimeError):
    """A bad input discovered while a stage prepares its work (missing file, wrong model, ...)."""


def _show(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def choices(options: Iterable[object]) -> str:
    """'choose from a, b, c' for an error message, in registry order."""
    return "choose from " + ", ".join(str(o) for o in options)


def close_matches(word: str, options: Iterable[str], n: int = 3) -> str:
    """'; did you mean x?' when something close exists, else ''."""
    found = difflib.get_close_matches(word, list(options), n=n, cutoff=0.5)
    return f"did you mean {' or '.join(found)}?" if found else ""


def one_of(key: str, value: object, options: Iterable[object], example: Optional[object] = None) -> None:
    """Raise ConfigError unless value is one of options (options come from a registry)."""
    options = list(options)
    if value in options:
        return
    hint = close_matches(str(value), [str(o) for o in options]) if isinstance(value, str) else ""
    fix = hint or f"e.g. {key}={example if example is not None else options[0]}"
    raise ConfigError(key, value, choices(options), fix)
