"""The pipeline's error family: problems the user can fix (a setting, an input, a table, a model,
a missing extra), each message naming the problem and the fix. The jobs print them as one line
and exit with code 2 (pipeline.cli); any other exception is a bug and keeps its traceback.

The bottom layer: it imports nothing from the package, so every module can raise its members
(worker_errors finds an error's class by the module name in a worker's traceback, at run
time)."""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager


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


# The last line of a worker's traceback that names one of the pipeline's errors.
_WORKER_ERROR = re.compile(r"^(pipeline(?:\.\w+)+)\.(\w+): (.+)$", re.MULTILINE)


@contextmanager
def worker_errors() -> Iterator[None]:
    """A PipelineError raised in a Python worker (an endpoint that keeps failing, a model folder
    that differs on an executor) reaches the driver inside Spark's error, as text: raise it
    again here as itself, so the job prints its one line."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as error:
        found = _WORKER_ERROR.findall(str(error))
        for module_name, class_name, message in reversed(found):
            module = sys.modules.get(module_name) or _module(module_name)
            kind = getattr(module, class_name, None) if module else None
            if isinstance(kind, type) and issubclass(kind, PipelineError):
                raise kind(message.strip()) from error
        raise


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
