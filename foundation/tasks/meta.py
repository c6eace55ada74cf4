"""What a trained task carries to inference, as a typed value, and the one place a stored one is checked.

Each task defines a frozen dataclass (its bands, normalisation, spacing, classes, ...) with exactly one writer,
``to_dict()`` (the JSON-able dict stored as ``task_meta`` in every checkpoint), and one reader,
``from_dict(d, source)``. The reader checks every key once, with :class:`MetaReader`, so a missing or broken key
is refused naming the file and the key, and no consumer checks again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from foundation.errors import CheckpointError

T = TypeVar("T")
_REQUIRED: Any = object()


class TaskMeta(Protocol):
    """A task's inference metadata: written by ``to_dict``, read back by the classmethod ``from_dict``."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict stored as ``task_meta``."""

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: Path) -> TaskMeta:
        """Raises: CheckpointError naming ``source`` and the key."""


class MetaReader:
    """One checkpoint's ``task_meta``, read key by key into Python values.

    ``read(key, convert)`` is a required key; with ``default=`` a missing key (or a stored None) gives the
    default. ``convert`` raises TypeError/ValueError on a bad value, which becomes a CheckpointError naming the
    file, the key and the value.
    """

    def __init__(self, meta: Any, source: str | Path, task: str) -> None:
        if not isinstance(meta, dict):
            raise CheckpointError(
                f"{source}: its task_meta is a {type(meta).__name__}, not a mapping: not a {task} model "
                "written by `foundation finetune`"
            )
        self.meta, self.source, self.task = meta, Path(source), task

    def read(self, key: str, convert: Callable[[Any], T], default: Any = _REQUIRED) -> T:
        value = self.meta.get(key)
        if value is None:
            if default is _REQUIRED:
                what = "has no" if key not in self.meta else "has a null"
                raise CheckpointError(
                    f"{self.source}: task_meta {what} {key!r}: a broken {self.task} model (fine-tune it again)"
                )
            return default
        try:
            return convert(value)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"{self.source}: task_meta[{key!r}]={value!r} is unusable ({e}): a broken {self.task} model"
            ) from e


# -- converters: checked values, numbers kept as stored (an int stays an int, so to_dict writes what it read) --
def integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise TypeError("expected an integer")
    return int(value)


def number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("expected a number")
    return value


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError("expected a mapping")
    return dict(value)


def sequence(convert: Callable[[Any], T]) -> Callable[[Any], tuple[T, ...]]:
    """A converter of a list whose items ``convert`` checks."""

    def read(value: Any) -> tuple[T, ...]:
        if not isinstance(value, (list, tuple)):
            raise TypeError("expected a list")
        return tuple(convert(v) for v in value)

    return read
