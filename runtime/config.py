"""Typed configs: dataclasses are the schema, YAML files (or dicts) the instances.

`load_config(Cls, source)` builds a (possibly nested) dataclass from a mapping or a YAML
file and checks, at load time, that every key is a field and every value has the declared
type. Errors name the file, the dotted field path and the bad value. Range checks belong in
each dataclass's `__post_init__`, whose ValueError is re-raised with the same context.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or mapping does not match its schema."""


def require_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    """The range check most `__post_init__`s start with: each named field is an int > 0
    (a bool is not); ValueError naming the class and the first field that is not."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive int, got {value!r}")


def load_config(
    cls: type[T],
    source: str | Path | dict[str, Any] | None,
    overrides: dict[str, Any] | None = None,
    *,
    root: str | None = None,
    origin: str | None = None,
) -> T:
    """Build `cls` from a YAML path or a mapping, with optional flat/dotted `overrides`.

    Error messages read "<origin>: <root>.<field path> ...": `root` names the top level
    (default: the class name), `origin` the source (default: the file, or "<dict>").
    """
    if source is None:
        data: Any = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        origin = origin or str(source)
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise ConfigError(f"{origin}: cannot read config: {exc.strerror}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: invalid YAML: {exc}") from exc
    origin = origin or "<dict>"
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted.split("."), value)
    return _build(cls, data, origin, root or cls.__name__)


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
    data[keys[-1]] = value


def _build(cls: type[T], data: Any, origin: str, path: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: {path} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{origin}: {path}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    missing = sorted(name for name, f in fields.items() if name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{origin}: {path}: missing field(s) {missing}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, origin, f"{path}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        # __post_init__ messages that start with one of this class's fields get the full path.
        message = str(exc)
        head = re.split(r"[\s\[.:]", message, maxsplit=1)[0]
        raise ConfigError(f"{origin}: {path}.{message}" if head in fields else f"{origin}: {path}: {message}") from exc


def _coerce(hint: Any, value: Any, origin: str, path: str) -> Any:
    """Check `value` against the type hint; int→float and list→tuple are the only conversions."""
    origin_type = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin_type in (typing.Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if value is not None and len(others) == 1:
            # Optional[X] with a value: X's own error names the bad nested field.
            return _coerce(others[0], value, origin, path)
        for arg in args:
            try:
                return _coerce(arg, value, origin, path)
            except ConfigError:
                continue
        raise ConfigError(f"{origin}: {path} = {value!r} matches none of {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{origin}: {path} must be null, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, origin, path)
    if origin_type in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{origin}: {path} must be a list, got {value!r}")
        if origin_type is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{origin}: {path} must have {len(args)} elements, got {value!r}")
            return tuple(_coerce(a, v, origin, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, origin, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin_type is tuple else items
    if origin_type is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {path} must be a mapping, got {value!r}")
        key_t, val_t = args if args else (Any, Any)
        return {_coerce(key_t, k, origin, f"{path}.{k}"): _coerce(val_t, v, origin, f"{path}.{k}") for k, v in value.items()}
    if origin_type is typing.Literal:
        if value not in args:
            raise ConfigError(f"{origin}: {path} must be one of {list(args)}, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{origin}: {path} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{origin}: {path} must be an integer, got {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ConfigError(f"{origin}: {path} must be a {hint.__name__}, got {value!r}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{origin}: {path} must be a {hint.__name__}, got {value!r}")
    return value
