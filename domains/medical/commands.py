"""Command-line parsers of the ``medical`` domain: ``foundation segment`` and ``foundation export-bundle``.

Registered through the entry-point group ``foundation.commands``; the parser modules import only argparse, and
each command imports MONAI and torch when it runs.
"""

from __future__ import annotations

import argparse
import logging

from foundation_domains.medical.segmentation.bundle import add_export_bundle_parser
from foundation_domains.medical.segmentation.segment import add_segment_parser

log = logging.getLogger(__name__)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``segment`` and ``export-bundle`` (a name another package registered first is left to it)."""
    for name, add in (("segment", add_segment_parser), ("export-bundle", add_export_bundle_parser)):
        if name in subparsers.choices:
            log.debug("medical: a %r command exists already; not adding ours", name)
            continue
        add(subparsers)
