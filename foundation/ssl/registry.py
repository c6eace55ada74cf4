"""Objectives by name (``ssl.method``): each factory returns the module and its per-sample data extras."""

from __future__ import annotations

from collections.abc import Callable

from foundation.errors import RegistryError

_OBJECTIVES: dict[str, str] = {
    "dinov2": "foundation.ssl.dinov2:make_dinov2",
    "mae": "foundation.ssl.mae:make_mae",
}


def list_objectives() -> list[str]:
    return sorted(_OBJECTIVES)


def get_objective_factory(name: str) -> Callable:
    if name not in _OBJECTIVES:
        raise RegistryError(f"unknown ssl.method {name!r}; available: {', '.join(list_objectives())}")
    module, attr = _OBJECTIVES[name].split(":")
    import importlib

    return getattr(importlib.import_module(module), attr)
