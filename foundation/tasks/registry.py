"""Task registry: built-in and third-party tasks come from the ``foundation.tasks`` entry-point group.

Only the task a command names is imported, so ``foundation finetune canopy-height`` does not import MONAI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from foundation.errors import RegistryError

if TYPE_CHECKING:  # the CLI lists tasks without importing torch
    from foundation.tasks.base import Task

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "foundation.tasks"
_REGISTRY: dict[str, Callable[[], Task]] = {}


def register_task(name: str) -> Callable:
    """Decorator: register a Task class (or zero-argument factory) under ``name`` (tests, notebooks)."""

    def wrap(factory: Callable[[], Task]) -> Callable[[], Task]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_tasks() -> list[str]:
    """Names of all registered tasks, without importing them."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def get_task(name: str) -> Task:
    """Instantiate the task registered as ``name``.

    Raises:
        RegistryError: unknown name (the message lists the known ones) or a task whose package fails to import.
    """
    if name not in _REGISTRY:
        ep = _entry_points().get(name)
        if ep is None:
            raise RegistryError(f"unknown task {name!r}; available: {', '.join(list_tasks()) or 'none'}")
        try:
            _REGISTRY[name] = ep.load()
        except ImportError as e:
            raise RegistryError(
                f"task {name!r} needs a package that is not installed ({e}); install the domain's extra, "
                "e.g. pip install -e '.[remote_sensing]' or '.[medical]'"
            ) from e
    return _REGISTRY[name]()
