"""Experiment configs: TOML files, ``--set`` overrides, and schemas that name the bad key.

A config is a plain nested dict read with :mod:`tomllib`. Each experiment
kind declares a :class:`Table` schema; :func:`resolve` checks a config
against it (unknown keys, wrong types, values out of range, names no plugin
provides, missing values) and fills in the defaults, so ``teleport config``
rejects what ``teleport run`` would, before any training starts. Every
problem is a :class:`ConfigError` whose one-line message names the key, the
value and what is allowed.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch_teleport.registry import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

DEFAULT_CONFIG_NAME = "embedded default config"


class ConfigError(ValueError):
    """A config that cannot be used; ``key`` is the dotted key at fault, when there is one."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# -- reading ------------------------------------------------------------------
def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The config in the TOML file ``path``, or the embedded default when ``path`` is ``None``."""
    if path is None:
        text = resources.files("torch_teleport.lab").joinpath("configs/default.toml").read_text("utf-8")
        return tomllib.loads(text)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ConfigError(f"cannot read config file {str(path)!r}: {reason}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None


def parse_value(text: str) -> Any:
    """``text`` read as a TOML value (``5``, ``0.1``, ``true``, ``[0, 1]``), else the string itself."""
    try:
        parsed = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["value"] if parsed.keys() == {"value"} else text


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``config`` with each ``"a.b.c=value"`` override applied (creating tables as needed)."""
    result = copy.deepcopy(config)
    for override in overrides:
        key, sep, raw = override.partition("=")
        parts = [part.strip() for part in key.split(".")]
        if not sep or not all(parts):
            raise ConfigError(
                f"bad --set {override!r}: expected KEY=VALUE with a dotted KEY, e.g. training.epochs=5"
            )
        table = result
        for depth, part in enumerate(parts[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"bad --set {override!r}: {prefix} is {_describe(table)}, not a table",
                    key=prefix,
                )
        table[parts[-1]] = parse_value(raw.strip())
    return result


# -- schemas --------------------------------------------------------------------
REQUIRED: Any = object()
"""Default of an :class:`Option` that the config must give."""

Check = Callable[[Any], str | None]
"""A value check: ``None`` when fine, else what is wrong (``"must be at least 1"``)."""


@dataclass(frozen=True)
class Option:
    """One value: its default (``REQUIRED``, or ``None`` for "not set"), type and optional check.

    ``items`` is the element type of a list. An ``int`` is accepted (and
    converted) where a ``float`` is expected; a ``bool`` is never an ``int``.
    ``plugin`` is the registry kind (``"null_space"``) whose registered
    names the value must be one of; the default is never checked.
    """

    default: Any
    type: type
    items: type | None = None
    check: Check | None = None
    plugin: str | None = None


@dataclass(frozen=True)
class Table:
    """A table with known keys; ``open=True`` accepts any keys (plugin keyword options)."""

    fields: dict[str, Option | Table | TableList] = field(default_factory=dict)
    open: bool = False


@dataclass(frozen=True)
class TableList:
    """An array of tables, each checked against ``table``."""

    table: Table
    default: Any = REQUIRED
    check: Check | None = None


OPTIONS = Table(open=True)
"""Keyword options handed to a plugin as they are (the plugin checks them)."""


def at_least(minimum: float) -> Check:
    return lambda value: None if value >= minimum else f"must be at least {minimum}"


def positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else "must be a positive finite number"


def interval(low: float, high: float, *, open_low: bool = False) -> Check:
    """A number in ``[low, high]``, or in ``(low, high]`` with ``open_low``."""
    allowed = f"{'(' if open_low else '['}{low:g}, {high:g}]"

    def check(value: float) -> str | None:
        above = value > low if open_low else value >= low
        return None if above and value <= high else f"must lie in {allowed}"

    return check


def non_empty(value: list) -> str | None:
    return None if value else "must not be empty"


def one_of(*choices: str) -> Check:
    return lambda value: (
        None if value in choices else f"must be one of {', '.join(map(repr, choices))}"
    )


def resolve(
    config: dict[str, Any], schema: Table, registry: Registry | None = None
) -> dict[str, Any]:
    """``config`` checked against ``schema``, with every default filled in (a new dict).

    Plugin names (:attr:`Option.plugin`) are checked against ``registry`` when one is given.
    """
    return _resolve_table(config, schema, "", registry)


def _resolve_table(
    value: Any, schema: Table, path: str, registry: Registry | None
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must be a table, got {_describe(value)}", key=path)
    if schema.open:
        return copy.deepcopy(value)
    unknown = sorted(set(value) - set(schema.fields))
    if unknown:
        where = f" in [{path}]" if path else " at the top level"
        key = _join(path, unknown[0])
        raise ConfigError(
            f"unknown key {key!r}; known keys{where}: {', '.join(sorted(schema.fields))}", key=key
        )
    return {
        name: _resolve(value, name, spec, _join(path, name), registry)
        for name, spec in schema.fields.items()
    }


def _resolve(
    table: dict, name: str, spec: Option | Table | TableList, path: str, registry: Registry | None
) -> Any:
    if isinstance(spec, Table):
        return _resolve_table(table.get(name, {}), spec, path, registry)
    if name not in table:
        if spec.default is REQUIRED:
            raise ConfigError(f"missing key {path!r}", key=path)
        return copy.deepcopy(spec.default)
    value = table[name]
    if isinstance(spec, TableList):
        if not isinstance(value, list):
            raise ConfigError(
                f"{path} must be an array of tables, got {_describe(value)}", key=path
            )
        value = [
            _resolve_table(item, spec.table, f"{path}[{i}]", registry)
            for i, item in enumerate(value)
        ]
    else:
        value = _typed(value, spec.type, path)
        if spec.items is not None:
            value = [_typed(item, spec.items, f"{path}[{i}]") for i, item in enumerate(value)]
    problem = spec.check(value) if spec.check else None
    if not problem and isinstance(spec, Option) and spec.plugin and registry is not None and value != spec.default:
        problem = _unregistered(value, spec.plugin, registry)
    if problem:
        raise ConfigError(f"{path} {problem}, got {value!r}", key=path)
    return value


def _unregistered(name: str, kind: str, registry: Registry) -> str | None:
    names = registry.names(kind)
    if name in names:
        return None
    known = ", ".join(map(repr, names)) or "none is registered"
    return f"must be a registered {kind.replace('_', ' ')} ({known})"


_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
}


def _typed(value: Any, expected: type, path: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ConfigError(
        f"{path} must be {_TYPE_NAMES.get(expected, expected.__name__)}, got {_describe(value)}",
        key=path,
    )


def _describe(value: Any) -> str:
    kind = (
        "a table" if isinstance(value, dict) else _TYPE_NAMES.get(type(value), type(value).__name__)
    )
    return f"{value!r} ({kind})" if not isinstance(value, dict | list) else kind


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# -- writing --------------------------------------------------------------------
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dumps_toml(config: dict[str, Any], *, unset: bool = False) -> str:
    """``config`` as TOML: top-level tables as ``[sections]``, deeper ones inline; ``None`` left out.

    ``tomllib`` only reads; this covers what configs hold (tables, arrays,
    strings, numbers, booleans) so a run folder's config can be run again.
    TOML has no null: with ``unset=True`` a ``None`` at the top level or in a
    section becomes a ``# key: not set`` comment, so a printed config still
    shows every key.
    """
    lines: list[str] = []
    sections: list[tuple[str, dict]] = []
    for key, value in config.items():
        if isinstance(value, dict):
            sections.append((key, value))
        else:
            lines += _assignment(key, value, unset)
    for key, table in sections:
        lines += ["", f"[{_key(key)}]"]
        for k, v in table.items():
            lines += _assignment(k, v, unset)
    return "\n".join(lines).lstrip("\n") + "\n"


def _assignment(key: str, value: Any, unset: bool) -> list[str]:
    if value is not None:
        return [f"{_key(key)} = {_value(value)}"]
    return [f"# {_key(key)}: not set"] if unset else []


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except that TOML also escapes DEL."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, dict):
        items = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return f"{{ {items} }}" if items else "{}"
    if isinstance(value, list | tuple):
        if any(isinstance(item, dict) for item in value):
            return "[\n" + "".join(f"    {_value(item)},\n" for item in value) + "]"
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} values to TOML: {value!r}")
