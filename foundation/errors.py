"""One error tree for the project, in the style of rasterio's ``errors.py``.

Every error a user can trigger derives from :class:`FoundationError`, and also from the builtin
that describes it (``ValueError``, ``OSError``), so callers can catch either.
"""

from __future__ import annotations


class FoundationError(Exception):
    """Root of every error raised on purpose by this project."""


class ConfigError(FoundationError, ValueError):
    """A config value or key is wrong; the message names the key and the allowed values."""


class DataError(FoundationError, OSError):
    """Input data is missing, empty, unreadable or of the wrong shape; the message names the file."""


class CheckpointError(FoundationError, OSError):
    """A checkpoint or exported backbone cannot be used (missing, corrupt, other architecture)."""


class RegistryError(FoundationError, KeyError):
    """An unknown name was asked of a registry; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TrainingError(FoundationError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


class MissingDependencyError(FoundationError, ImportError):
    """An optional dependency is not installed; the message gives the pip line."""


class OutputError(FoundationError, OSError):
    """An output cannot be written where asked: no space left, read-only, an existing folder that is not ours,
    an input of the same command. Nothing was replaced; the message names the path and the reason."""
