"""The optional ``BatchEmbedder`` capability of a domain: ``foundation embed --domain NAME`` writes the domain's
own layout (e.g. one HDF5 per slide, through :mod:`foundation.batch.runner`) instead of one HDF5 of a labelled
image folder. A domain has it by defining the method; nothing registers it, and the core asks with
``isinstance(domain, BatchEmbedder)`` rather than looking for an attribute by name."""

from __future__ import annotations

import argparse
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class BatchEmbedder(Protocol):
    def embed_data(self, backbone: torch.nn.Module, meta: dict[str, Any], args: argparse.Namespace) -> dict:
        """Embed ``args.data`` with the frozen ``backbone`` (``meta``: its checkpoint's metadata) into
        ``args.out``; returns the printed result, ``exit_status`` included (:mod:`foundation.batch.status`), and
        ``error``: a :class:`~foundation.errors.FoundationError` the command ends with after printing the result
        (exit 1: nothing done, or its summary not written), absent otherwise."""
        ...
