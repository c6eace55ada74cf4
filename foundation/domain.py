"""The Domain seam: what the core asks of pathology, remote sensing, medical or a user's own data.

Domains register under a name, either with :func:`register_domain` or through the entry-point group
``foundation.domains`` (this package's own built-ins use that group too, so the core never imports them).
A domain's own commands (``foundation pathology-qc``...) register separately, through the entry-point group
``foundation.commands`` (``name = "module:add_commands"``, a function given the CLI's subparsers): parsers
only, so ``foundation --help`` lists them without importing any domain.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from foundation.config import Config
from foundation.errors import RegistryError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "foundation.domains"


@runtime_checkable
class SampleSource(Protocol):
    """An endless, indexable stream of training samples.

    ``sample(i, g)`` returns the ``i``-th sample of the stream, drawn with generator ``g``. The core gives
    every rank and worker its own indices, so a source needs no global listing of a huge archive, resume is
    exact (the stream is a function of the index) and a broken item can be replaced deterministically.
    """

    def sample(self, index: int, generator: torch.Generator) -> dict[str, Any]: ...


@runtime_checkable
class LabelledDataset(Protocol):
    """A finite, ordered dataset for evaluation and embedding: ``dataset[i] -> {"image", "label", "id"}``."""

    classes: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


ViewTransform = Callable[[dict[str, Any], torch.Generator], dict[str, Any]]


@runtime_checkable
class Domain(Protocol):
    """What a domain gives the core. Attributes describe the tensors; methods build data and views."""

    name: str
    channels: int
    spatial_dims: int
    mean: Sequence[float]
    std: Sequence[float]

    def make_sample(self, root: Path) -> Path:
        """Write the domain's small embedded sample under ``root`` (once, atomically); return the data path."""
        ...

    def sample_source(self, path: str, cfg: Config) -> SampleSource:
        """Training samples for the data at ``path``, as the domain's ``ssl_transform`` expects them."""
        ...

    def ssl_transform(self, cfg: Config) -> ViewTransform:
        """Views for ``cfg.ssl.method``: ``global_crops``/``local_crops`` for DINOv2, ``image`` for MAE."""
        ...

    def eval_dataset(self, path: str, cfg: Config) -> LabelledDataset:
        """Deterministic labelled images at the model's input size, for kNN / linear probe / embed."""
        ...


_REGISTRY: dict[str, Callable[[], Domain]] = {}
_entry_points_loaded = False


def register_domain(name: str) -> Callable:
    """Decorator: register a Domain class (or zero-argument factory) under ``name``."""

    def wrap(factory: Callable[[], Domain]) -> Callable[[], Domain]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            _REGISTRY[ep.name] = ep.load()
        except Exception as e:  # a broken third-party plug-in must not break the others
            log.warning("domain %r from entry point %r could not be loaded: %s", ep.name, ep.value, e)


def list_domains() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def get_domain(name: str) -> Domain:
    """Instantiate the domain registered as ``name``.

    Raises:
        RegistryError: unknown name; the message lists the registered ones.
    """
    _load_entry_points()
    if name not in _REGISTRY:
        raise RegistryError(f"unknown domain {name!r}; available: {', '.join(list_domains()) or 'none'}")
    domain = _REGISTRY[name]()
    missing = [a for a in ("name", "channels", "spatial_dims", "mean", "std") if not hasattr(domain, a)]
    if missing:
        raise RegistryError(f"domain {name!r} does not provide {missing}")
    return domain


def sample_cache_dir(domain_name: str) -> Path:
    """Where embedded samples are written: ``$FOUNDATION_CACHE`` or ``~/.cache/foundation``."""
    base = Path(os.environ.get("FOUNDATION_CACHE", Path.home() / ".cache" / "foundation"))
    return base / "samples" / domain_name


def resolve_data_path(domain: Domain, path: str | None) -> str:
    """The user's data path, or the domain's embedded sample when none is given."""
    if path:
        return path
    return str(domain.make_sample(sample_cache_dir(domain.name)))
