"""The pipeline's error family: problems the user can fix (a setting, an input, a table, a model,
a missing extra), each message naming the problem and the fix. The jobs print them as one line
and exit with code 2 (pipeline.cli); any other exception is a bug and keeps its traceback.

The bottom layer: it imports nothing from the package, so every module can raise its members."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix; the message says what and how. The specific members live with
    what they concern: SettingsError (pipeline.config), ModelSpecError (pipeline.model.spec),
    ModelMismatchError, CommitConflictError and TableNotFoundError (pipeline.store.delta)."""


class InputError(PipelineError, ValueError):
    """The input cannot be read as configured; the message says what exists instead."""


class UsageError(PipelineError, ValueError):
    """Arguments an operation cannot run with (k below 1, no queries); the message says what it
    takes."""


class MissingDependencyError(PipelineError, ImportError):
    """An optional package a feature needs is not installed; the message names the install."""
