"""The Domain seam: what the core asks of pathology, remote sensing, medical or a user's own data.

Domains register under a name, either with :func:`register_domain` or through the entry-point group
``foundation.domains`` (this package's own built-ins use that group too, so the core never imports them).
A domain's own commands (``foundation pathology-qc``...) register separately, through the entry-point group
``foundation.commands`` (``name = "module:add_commands"``, a function given the CLI's subparsers): parsers
only, so ``foundation --help`` lists them without importing any domain.

The contract for a domain (built-in or a third-party plug-in) is :class:`Domain`. A domain is stateless: what
it finds out about the data (channel count, 2D or 3D, normalisation statistics, band names) is returned as a
:class:`~foundation.data.spec.DataSpec` with the sample source, and views and evaluation datasets are built from
that value. Its ``data.options`` are a dataclass (``options_type``) that the config fills and checks when it
loads (unknown keys and wrong types refused as ``data.options.KEY``); methods read ``cfg.data.typed_options``.
A minimal plug-in::

    @dataclass(frozen=True)
    class MyOptions:
        scale: float = 1.0

    class MyDomain:
        name = "mine"
        options_type = MyOptions  # optional: without it data.options stay an untyped dict
        default_spec = DataSpec(channels=2, mean=(0.0, 0.0), std=(1.0, 1.0))  # before any data is seen

        def make_sample(self, root): ...  # write a small sample, return its path
        def sample_source(self, path, cfg):  # -> DataSource(samples, spec)
            opts = cfg.data.typed_options
            return DataSource(MySamples(path, opts.scale), self.default_spec)
        def ssl_transform(self, cfg, spec): ...  # views normalised with spec.mean / spec.std
        def eval_dataset(self, path, cfg, spec=None): ...  # spec: the backbone's normalisation, if known
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import torch

from foundation.data.spec import DataSpec
from foundation.errors import ConfigError, RegistryError

if TYPE_CHECKING:  # annotations only: the config imports this module to type data.options at load
    from foundation.config import Config

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


class DataSource(NamedTuple):
    """What :meth:`Domain.sample_source` returns: the training samples and what the domain found about them."""

    samples: SampleSource
    spec: DataSpec


@runtime_checkable
class Domain(Protocol):
    """What a domain gives the core: a name, its defaults and options type, and methods that return values.

    ``default_spec`` is what the domain knows before it sees data (pathology: 3 channels and ImageNet
    statistics); the data's own spec comes from :meth:`sample_source`. ``options_type`` (optional) is the
    dataclass of ``data.options``; it may define ``from_options(options: dict, cfg) -> instance`` for checks and
    conversions beyond the field types, else it is built with ``options_type(**options)``.
    """

    name: str
    default_spec: DataSpec

    def make_sample(self, root: Path) -> Path:
        """Write the domain's small embedded sample under ``root`` (once, atomically); return the data path."""
        ...

    def sample_source(self, path: str, cfg: Config) -> DataSource:
        """Training samples for the data at ``path`` and their :class:`DataSpec` (channels, statistics...)."""
        ...

    def ssl_transform(self, cfg: Config, spec: DataSpec) -> ViewTransform:
        """Views for ``cfg.ssl.method`` of data described by ``spec``: ``global_crops``/``local_crops`` for
        DINOv2, ``image`` for MAE."""
        ...

    def eval_dataset(self, path: str, cfg: Config, spec: DataSpec | None = None) -> LabelledDataset:
        """Deterministic labelled images at the model's input size, for kNN / linear probe / embed, normalised
        with ``spec``'s statistics (a backbone's, or the training data's) or, without one, the domain's own."""
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
    missing = [a for a in ("name", "default_spec") if not hasattr(domain, a)]
    if missing:
        raise RegistryError(f"domain {name!r} does not provide {missing} (see foundation.domain.Domain)")
    if not isinstance(domain.default_spec, DataSpec):
        raise RegistryError(f"domain {name!r}: default_spec must be a foundation.data.spec.DataSpec")
    return domain


def domain_options_type(name: str) -> type | None:
    """The dataclass of the domain's ``data.options``, or None (an unknown domain, or one without options).

    Raises:
        ConfigError: ``options_type`` is not a dataclass.
    """
    _load_entry_points()
    if name not in _REGISTRY:
        return None
    factory = _REGISTRY[name]
    options_type = getattr(factory, "options_type", None)
    if options_type is None:
        options_type = getattr(get_domain(name), "options_type", None)
    if options_type is not None and not dataclasses.is_dataclass(options_type):
        raise ConfigError(f"domain {name!r}: options_type must be a dataclass, got {options_type!r}")
    return options_type


def sample_cache_dir(domain_name: str) -> Path:
    """Where embedded samples are written: ``$FOUNDATION_CACHE`` or ``~/.cache/foundation``."""
    base = Path(os.environ.get("FOUNDATION_CACHE", Path.home() / ".cache" / "foundation"))
    return base / "samples" / domain_name


def resolve_data_path(domain: Domain, path: str | None) -> str:
    """The user's data path, or the domain's embedded sample when none is given."""
    if path:
        return path
    return str(domain.make_sample(sample_cache_dir(domain.name)))
