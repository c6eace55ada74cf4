"""Downstream tasks (dense heads, losses, metrics, inference writers) trained by the same engine as pretraining."""

from foundation.tasks.base import Task, TaskModel, TaskParts
from foundation.tasks.registry import get_task, list_tasks, register_task

__all__ = ["Task", "TaskModel", "TaskParts", "get_task", "list_tasks", "register_task"]
