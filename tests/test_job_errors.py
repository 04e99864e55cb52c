"""One error family: every domain error is a PipelineError, and every job maps the family to one
`error: ...` line with exit code 2 while a bug keeps its traceback."""

from __future__ import annotations

import pytest

from pipeline.config import SettingsError
from pipeline.errors import InputError, MissingDependencyError, PipelineError, UsageError
from pipeline.model.spec import ModelSpecError
from pipeline.spark import io
from pipeline.store.delta import CommitConflictError, ModelMismatchError, TableNotFoundError


@pytest.mark.parametrize(("error", "builtin"), [
    (SettingsError, ValueError), (ModelSpecError, ValueError), (InputError, ValueError),
    (ModelMismatchError, ValueError), (UsageError, ValueError),
    (CommitConflictError, RuntimeError), (TableNotFoundError, FileNotFoundError),
    (MissingDependencyError, ImportError),
])
def test_domain_errors_are_pipeline_errors_and_keep_their_builtin_base(error, builtin):
    assert issubclass(error, PipelineError) and issubclass(error, builtin)


def test_input_error_is_still_importable_from_the_reader():
    assert io.InputError is InputError
