"""Config files: YAML into frozen dataclasses, with errors that name the key.

Each side declares its config as dataclasses whose defaults are the one place
defaults live. `load_dataclass` walks the YAML mapping against those classes,
so an unknown key, a wrong type or a bad value is reported with its dotted
path and, for unknown keys, the nearest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from common.errors import ConfigError

SECRET_KEYS = ("password", "secret", "token")


def read_yaml(path: str | os.PathLike) -> dict:
    """Parse a YAML config file into a mapping, or raise ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError("", f"YAML syntax error in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping of keys, not {_kind(data)}")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    Plain YAML keeps the last one silently, so a typo'd copy of a section
    would quietly replace the real one.
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and bad types raise."""
    if not isinstance(data, dict):
        raise ConfigError(path, f"must be a mapping, not {_kind(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, raw in data.items():
        name = str(key)
        dotted = f"{path}.{name}" if path else name
        if name not in fields:
            raise ConfigError(dotted, f"unknown key{_nearest(name, fields)}")
        values[name] = _coerce(hints[name], raw, dotted)
    try:
        obj = cls(**values)
    except TypeError as exc:  # a field without a default was left out
        missing = [n for n, f in fields.items() if _required(f) and n not in values]
        key = f"{path}.{missing[0]}" if path and missing else (missing or [path])[0]
        raise ConfigError(key, "is required") from exc
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def _required(field: dataclasses.Field) -> bool:
    no_default = field.default is dataclasses.MISSING
    return no_default and field.default_factory is dataclasses.MISSING


def _coerce(hint: Any, raw: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], raw, path)
    if origin is Literal:
        if raw not in args and str(raw) not in [str(a) for a in args]:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(path, f"must be one of {allowed}, not {raw!r}")
        return next(a for a in args if a == raw or str(a) == str(raw))
    if origin in (list, tuple):
        if not isinstance(raw, list):
            raise ConfigError(path, f"must be a list, not {_kind(raw)}")
        items = [_coerce(args[0], item, f"{path}[{i}]") for i, item in enumerate(raw)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(raw, dict):
            raise ConfigError(path, f"must be a mapping, not {_kind(raw)}")
        return {str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in raw.items()}
    if dataclasses.is_dataclass(hint):
        return load_dataclass(hint, raw, path)
    return _coerce_scalar(hint, raw, path)


def _coerce_scalar(hint: type, raw: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        raise ConfigError(path, f"must be true or false, not {raw!r}")
    if hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        raise ConfigError(path, f"must be a whole number, not {raw!r}")
    if hint is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        raise ConfigError(path, f"must be a number, not {raw!r}")
    if hint is str:
        if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
            return str(raw)
        raise ConfigError(path, f"must be a string, not {_kind(raw)}")
    raise TypeError(f"config type {hint!r} at {path} is not supported")


def _nearest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid keys: {', '.join(sorted(choices))}"


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string"}.get(
        type(value), type(value).__name__
    )


def check_positive(path: str, name: str, value: float, *, zero_ok=False) -> None:
    """Raise ConfigError unless value > 0 (or >= 0 with zero_ok), and finite."""
    if not math.isfinite(value):
        key = f"{path}.{name}" if path else name
        raise ConfigError(key, f"must be a finite number, not {value!r}")
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{path}.{name}" if path else name, f"must be {bound}")


def as_plain(obj: Any) -> Any:
    """A dataclass tree as plain mappings and lists, with secrets masked."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = as_plain(getattr(obj, f.name))
            if any(s in f.name for s in SECRET_KEYS) and value and "file" not in f.name:
                value = "***"
            out[f.name] = value
        return out
    if isinstance(obj, (list, tuple)):
        return [as_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_plain(v) for k, v in obj.items()}
    if isinstance(obj, str):
        return mask_url(obj)
    return obj


def mask_url(text: str) -> str:
    """Hide the password of a URL such as postgresql://user:pw@host/db."""
    # The user part may be empty (postgresql://:pw@host/db is valid).
    # Up to the last "@": a password may itself hold "@" or "/".
    text = re.sub(r"(://[^:/@\s]*:)\S*@", r"\1***@", text)
    # libpq also takes it as a query parameter: ?password=... or &password=...
    return re.sub(r"([?&]password=)[^&\s]*", r"\1***", text, flags=re.I)


def dump_effective(obj: Any) -> str:
    """The effective config as YAML, secrets masked, for `check`."""
    return yaml.safe_dump(as_plain(obj), sort_keys=False, default_flow_style=False)


def config_path(arg: str | None, env_var: str) -> str:
    """The config file from -c, else the environment variable, else an error."""
    path = arg or os.environ.get(env_var)
    if not path:
        raise ConfigError("", f"no config file: pass -c FILE or set {env_var}")
    return path
