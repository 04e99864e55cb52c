"""One error family: every domain error is a PipelineError, and every job maps the family to one
`error: ...` line with exit code 2 while a bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import SettingsError
from pipeline.errors import InputError, MissingDependencyError, PipelineError, UsageError
from pipeline.model.spec import ModelSpecError
from pipeline.spark import io
from pipeline.store.delta import CommitConflictError, ModelMismatchError, TableNotFoundError
from tests.conftest import REPO


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


# Each job with the arguments it requires; none gets far enough to start Spark.
JOBS = {
    "embed_corpus.py": [],
    "compact_table.py": [],
    "search.py": ["--query", "ice"],
    "evaluate_retrieval.py": ["--dataset", "beir"],
    "score_similarity.py": ["--input", "pairs.jsonl", "--text-a-col", "a", "--text-b-col", "b"],
    "cluster_embeddings.py": ["--vectors", "vectors", "--output", "clusters"],
}
# A bug planted in a real job process: load_settings fails with a plain ValueError, which the
# jobs used to print as `error: ...`.
PLANT_BUG = """
import runpy, sys
import pipeline.config

def load_settings(*args, **kwargs):
    raise ValueError("a planted bug")

pipeline.config.load_settings = load_settings
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_jobs(prefix: list[str], *args: str) -> dict[str, subprocess.CompletedProcess]:
    """Every job at once, each in its own process: `prefix + [job file, its arguments, args]`."""
    started = {name: subprocess.Popen([*prefix, str(REPO / "jobs" / name), *required, *args],
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
               for name, required in JOBS.items()}
    done = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


def test_every_job_reports_a_domain_error_as_one_line_and_exit_code_2():
    known = sorted(path.stem for path in (REPO / "conf").glob("*.yaml"))
    line = f"error: no profile named 'no-such-profile'; known profiles: {known}"
    for name, done in run_jobs([sys.executable], "--config", "no-such-profile").items():
        assert (done.returncode, done.stdout, done.stderr.splitlines()) == (2, "", [line]), name


def test_every_job_lets_a_bug_show_its_traceback():
    for name, done in run_jobs([sys.executable, "-c", PLANT_BUG]).items():
        assert done.returncode == 1, (name, done.stderr[-2000:])
        assert "Traceback (most recent call last)" in done.stderr, name
        assert done.stderr.rstrip().endswith("ValueError: a planted bug"), name
        assert "error: a planted bug" not in done.stderr, name
