"""Typing ``data.options``, ``task.options`` and ``task.inputs`` once, when the config loads.

Each owner (a domain, a task) declares a dataclass; :func:`parse_options` refuses unknown keys and values of the
wrong type, naming ``where.KEY`` (``data.options.mpp``), and returns the instance the rest of the run reads. A
dataclass may add a classmethod ``from_options(options, cfg)`` for conversions and cross-field checks (the one
spelling of "a dict to my options"); fields marked :func:`path_field` are made absolute, so a run's saved
config works from any working directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from foundation.errors import ConfigError

PATH = "foundation_path"  # field metadata key: the value is a local path (or a URL, kept as it is)


def path_field(default: Any = None, **kw: Any) -> Any:
    """A dataclass field holding a path: relative paths are resolved against the working directory at load."""
    return dataclasses.field(default=default, metadata={PATH: True}, **kw)


def reject_unknown_keys(options: Any, allowed: Any, where: str, owner: str) -> None:
    """Refuse keys of ``options`` that are not in ``allowed`` (a dataclass or names), naming each as
    ``where.KEY`` and listing what ``owner`` accepts: the strictness of the config for domain/task options.

    Raises:
        ConfigError: e.g. "data.options.mmp is not an option of the pathology domain; allowed: [...]".
    """
    if dataclasses.is_dataclass(allowed):
        names = sorted(f.name for f in dataclasses.fields(allowed))
    else:
        names = sorted(allowed)
    unknown = sorted(set(options) - set(names))
    if unknown:
        keys = ", ".join(f"{where}.{k}" for k in unknown)
        verb = "is not an option" if len(unknown) == 1 else "are not options"
        raise ConfigError(f"{keys} {verb} of {owner}; allowed: {names}")


def parse_options(
    cls: type, options: Mapping[str, Any] | None, where: str, owner: str, cfg: Any = None
) -> Any:
    """``options`` as an instance of the dataclass ``cls``, checked.

    Raises:
        ConfigError: an unknown key, a value of the wrong type or out of range, named as ``where.KEY``.
    """
    if isinstance(options, cls):
        return options
    values = dict(options or {})
    reject_unknown_keys(values, cls, where, owner)
    build = getattr(cls, "from_options", None)
    try:
        value = build(values, cfg) if build is not None else cls(**values)
    except (TypeError, ValueError) as e:  # the class's own checks met a value of the wrong type
        raise ConfigError(_wrong_type(cls, values, where) or f"{where}: {e}") from e
    check_types(value, where)
    return value


def _wrong_type(cls: type, values: dict[str, Any], where: str) -> str | None:
    """The first value given that fits its field's annotation in no way, as a message naming the key."""
    hints = typing.get_type_hints(cls)
    for key, item in values.items():
        hint = hints.get(key, Any)
        if not _fits(item, hint) and not _fits([item], hint):  # a scalar may stand for a list
            return f"{where}.{key}={item!r} must be {_name(hint)}"
    return None


def check_types(value: Any, where: str) -> None:
    """Refuse a field whose value does not fit its annotation (``int``, ``float``, ``str``, ``bool``, None,
    unions, tuples, lists, dicts; ``Any`` and nested dataclasses pass), naming ``where.FIELD``.

    Raises:
        ConfigError: e.g. "data.options.mpp='fast' must be float".
    """
    hints = typing.get_type_hints(type(value))
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        hint = hints.get(f.name, Any)
        if not _fits(item, hint):
            raise ConfigError(f"{where}.{f.name}={item!r} must be {_name(hint)}")


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        inner = args[0] if args else Any
        return all(_fits(v, inner) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            return False
        key, val = args if args else (Any, Any)
        return all(_fits(k, key) and _fits(v, val) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint) or dataclasses.is_dataclass(hint)
    return True


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def resolve_paths(value: Any) -> Any:
    """``value`` (a dataclass instance) with its :func:`path_field` values made absolute (``~`` expanded;
    URLs such as ``s3://...`` kept as they are)."""
    changes = {}
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if f.metadata.get(PATH) and isinstance(item, str) and item and "://" not in item:
            changes[f.name] = str(Path(item).expanduser().absolute())
    return dataclasses.replace(value, **changes) if changes else value


def plain(value: Any) -> dict[str, Any]:
    """A typed value back as YAML data (tuples as lists), for ``RUN/config.yaml``."""

    def convert(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: convert(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [convert(v) for v in x]
        if isinstance(x, Mapping):
            return {k: convert(v) for k, v in x.items()}
        return x

    return convert(value)
