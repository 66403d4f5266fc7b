"""Reading, typing, checking and printing the run configuration (the schema: distrib/schema.py).

Why a hand-rolled loader: configs must be checked *before* torch is imported and
before any worker starts (launch.py applies CUDA variables from them), every error
must be reported at once with the closest valid name, and ``--set`` overrides must be
typed like the field they touch. Plain ``tomllib`` + dataclasses do that in ~200 lines
without a dependency.

This module must not import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distrib.schema import (  # noqa: F401 - re-exported: `from distrib.config import Config` everywhere
    SHAPE_KEYS,
    CheckpointSection,
    Config,
    ConfigError,
    DataSection,
    DistSection,
    LaunchSection,
    LoggingSection,
    MemorySection,
    ModelSection,
    OptimSection,
    ParallelSection,
    Range,
    RunSection,
    TimingSection,
    TrainSection,
    _num,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


# --------------------------------------------------------------------------- checking


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ValueError naming ``where`` and the value."""
    if isinstance(tp, types.UnionType):  # e.g. str | tuple[float, ...]: first that fits
        lists = [a for a in typing.get_args(tp) if typing.get_origin(a) is tuple]
        if isinstance(value, str) and lists and _numbers_text(value):
            return _coerce(value, lists[0], where)  # "0.5,0.5,0.5": the list, as for every list key
        for alt in typing.get_args(tp):
            if (alt is str) == isinstance(value, str):
                return _coerce(value, alt, where)
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if typing.get_origin(tp) is tuple:
        item_tp = typing.get_args(tp)[0]
        if isinstance(value, str) and item_tp in (int, float):
            # "--set launch.gpus=1,0" and gpus = "1,0" are natural spellings of a list.
            value = [_number(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


def _numbers_text(text: str) -> bool:
    """``text`` is a comma-separated list of numbers ("1,0", "0.5, 0.5, 0.5")."""
    items = [v.strip() for v in text.split(",")]
    return all(items) and all(not isinstance(_number(v), str) for v in items)


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _suggest(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(sorted(valid))}"


def _show(value: Any) -> str:
    return f"[{', '.join(_num(v) for v in value)}]" if isinstance(value, tuple) else _num(value)


def _range_problem(value: Any, allowed: Range | None) -> str | None:
    """Why ``value`` (a number, or each number of a list) is out of range; None when fine."""
    items = value if isinstance(value, tuple) else (value,)
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int | float):
            continue
        if isinstance(x, float) and not math.isfinite(x):
            return "is not a finite number"
        if allowed is not None and x not in allowed:
            if isinstance(value, tuple):
                return f"is out of range: each value must be {allowed} ({_num(x)} is not)"
            return f"is out of range: must be {allowed}"
    return None


def _build_section(cls: type, name: str, data: Any, errors: list[str]) -> Any:
    if not isinstance(data, dict):
        errors.append(f"[{name}] must be a table, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in fields:
            errors.append(f"unknown key '{name}.{key}'" + _suggest(key, fields))
            continue
        try:
            value = _coerce(raw, hints[key], f"{name}.{key}")
        except ValueError as e:
            errors.append(str(e))
            continue
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            errors.append(f"{name}.{key}: {value!r} is not one of {', '.join(choices)}")
            continue
        problem = _range_problem(value, fields[key].metadata.get("range"))
        if problem:  # kept in values, so the section's cross-field checks see what was given
            errors.append(f"{name}.{key} = {_show(value)} {problem}")
        values[key] = value
    try:
        return cls(**values)
    except ValueError as e:  # a section's own __post_init__ check
        errors.append(str(e))
        return cls()


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build a Config from nested dicts, collecting every error before raising."""
    errors: list[str] = []
    hints = typing.get_type_hints(Config)
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in hints:
            errors.append(f"unknown section '[{name}]'" + _suggest(name, hints))
            continue
        sections[name] = _build_section(hints[name], name, value, errors)
    if errors:
        raise ConfigError(errors)
    return Config(**sections)


# --------------------------------------------------------------------------- loading


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; errors name the file, the line, and what to do."""
    p = Path(path)
    if not p.is_file():
        shipped = sorted(x.name for x in Path(__file__).resolve().parent.parent.glob("configs/*.toml"))
        hint = f" (shipped configs: {', '.join(shipped)})" if shipped else ""
        raise ConfigError([f"config file '{path}' does not exist{hint}"])
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: TOML syntax error: {e}"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text: {e}"]) from e


def parse_override(item: str) -> tuple[str, str, Any]:
    """Split ``section.key=value``; the value is read as a TOML value, else kept as text."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected section.key=value, e.g. dist.timeout_s=60")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--set {item!r}: the key must be section.key, e.g. run.seed=1")
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words such as gloo or my-run
    return parts[0], parts[1], value


def merge_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set`` items to the raw dict; malformed items are collected as errors."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    errors: list[str] = []
    for item in overrides:
        try:
            section, key, value = parse_override(item)
        except ValueError as e:
            errors.append(str(e))
            continue
        if _field_type(section, key) is str and not isinstance(value, str):
            value = item.split("=", 1)[1]  # run.name=nan or =2024 mean the text, not a number
        target = merged.setdefault(section, {})
        if isinstance(target, dict):
            target[key] = value
    if errors:
        raise ConfigError(errors)
    return merged


def _field_type(section: str, key: str) -> Any:
    """The declared type of ``section.key`` (None when either is unknown)."""
    cls = typing.get_type_hints(Config).get(section)
    return typing.get_type_hints(cls).get(key) if dataclasses.is_dataclass(cls) else None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (or the defaults when None), apply overrides, and validate all at once."""
    data = read_toml(path) if path else {}
    return config_from_dict(merge_overrides(data, overrides))


# --------------------------------------------------------------------------- printing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: quotes, backslashes and control characters escaped."""
    if c in '"\\':
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F:  # TOML forbids them raw; \uXXXX reads back the same
        return f"\\u{ord(c):04x}"
    return c


def dump_config(cfg: Config) -> str:
    """The resolved config as TOML, each key preceded by its documentation."""
    lines: list[str] = []
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        lines.append(f"[{sec.name}]")
        for f in dataclasses.fields(section):
            allowed = f" Allowed: {f.metadata['range']}." if "range" in f.metadata else ""
            lines.append(f"# {f.metadata.get('doc', '')}{allowed}")
            lines.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
        lines.append("")
    return "\n".join(lines)
