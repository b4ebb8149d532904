"""Typed dataclasses read from YAML: every value's type checked, numeric values against the ``Range`` their
field declares (``setting``), unknown keys named with the valid ones. Run configs (``recsys.config``) and
preprocessing schemas (``recsys.data.schema``) are read through ``build_dataclass``. No torch imports."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

T = typing.TypeVar("T")


class UserError(ValueError):
    """A problem the user can fix, named in the message (a file, key or path): the CLI prints the message
    and exits 2, without a traceback."""


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take (each entry's, for a list), declared on its field with
    ``setting``; ``build_dataclass`` checks every value read against it. ``zero`` says what 0 means where 0 is
    a switch (e.g. "off"), ``none`` what null means where it is allowed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    nonempty: bool = False  # a list needs at least one entry
    zero: str = ""
    none: str = ""

    def describe(self) -> str:
        bounds = []
        if self.low is not None and self.high is not None:
            bounds.append(f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}")
        elif self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        elif self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        notes = [f"0 = {self.zero}"] * bool(self.zero) + [f"null = {self.none}"] * bool(self.none)
        return " ".join(bounds) + (f" ({'; '.join(notes)})" if notes else "")

    def fits(self, x: float) -> bool:
        if not math.isfinite(x):  # YAML's .nan and .inf fit no range
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def check(self, key: str, value: Any) -> None:
        """ConfigError naming ``key`` when ``value`` (a number, a list of numbers or None) is out of range."""
        if value is None:
            return  # the type allowed null
        if isinstance(value, list):
            if self.nonempty and not value:
                raise ConfigError(f"{key}: [] is empty; give at least one entry, each {self.describe()}")
            for i, entry in enumerate(value):
                if not self.fits(entry):
                    raise ConfigError(f"{key}[{i}]={entry!r} in {value!r}: each entry must be {self.describe()}")
        elif not self.fits(value):
            raise ConfigError(f"{key}={value!r}: must be {self.describe()}")


def setting(default: Any, **limits: Any) -> Any:
    """A dataclass field whose values must fit ``Range(**limits)``; a callable ``default`` is a factory."""
    kind = "default_factory" if callable(default) else "default"
    return field(**{kind: default}, metadata={"range": Range(**limits)})


POSITIVE = {"low": 0, "low_open": True}
FRACTION = {"low": 0, "high": 1}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Returns ``value`` converted to ``tp`` or raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_value(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {_check_value(k, key_tp, key): _check_value(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value):
            return float(value)  # PyYAML reads 1e-6 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value if value is not None else {}, key)  # a dict's values: no choices
    raise TypeError(f"unsupported config type {tp} for {key}")


def build_dataclass(cls: type[T], values: dict[str, Any], prefix: str, choices: dict[str, tuple] | None = None) -> T:
    """``cls(**values)`` with every value type-checked (nested dataclasses too), in its declared ``Range``
    and every key known; ``choices`` maps a dotted key to its allowed values. ``prefix`` names the section in
    errors. Run configs and preprocessing schemas are both read this way."""
    choices = choices or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = list(fields)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {valid}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, value or {}, key, choices)
        else:
            kwargs[name] = _check_value(value, tp, key)
            if key in choices and kwargs[name] not in choices[key]:
                raise ConfigError(f"{key}: {value!r} is not one of {list(choices[key])}")
            if limits := fields[name].metadata.get("range"):
                limits.check(key, kwargs[name])
    return cls(**kwargs)


def read_yaml(path: Path, what: str = "config file") -> Any:
    """``yaml.safe_load`` of a file; a ConfigError naming it when it is missing or not YAML."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a {what}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a {what}: not UTF-8 text (a binary file?)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
