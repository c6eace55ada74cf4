"""Downstream tasks (dense heads, losses, metrics, inference writers) trained by the same engine as pretraining.

Names resolve lazily, so the CLI can list tasks (``foundation.tasks.registry``) without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Task": "foundation.tasks.base",
    "TaskModel": "foundation.tasks.base",
    "TaskParts": "foundation.tasks.base",
    "get_task": "foundation.tasks.registry",
    "list_tasks": "foundation.tasks.registry",
    "register_task": "foundation.tasks.registry",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'foundation.tasks' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
