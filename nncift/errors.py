"""Exceptions raised at the boundary. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class NncifError(Exception):
    """Base class of the errors a user can fix (bad input, bad config, refused resume)."""


class ConfigError(NncifError, ValueError):
    """A configuration field is unknown, mistyped or out of range."""


class DataError(NncifError, ValueError):
    """An input file is missing, empty or malformed; the message names the file and line or field."""


class ProvenanceError(NncifError):
    """A finished stage was produced with a different configuration (rerun with --overwrite)."""


class MissingDependencyError(NncifError, ImportError):
    """An optional dependency is not installed; the message gives the install command."""
