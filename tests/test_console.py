"""What a user sees on the console after `make setup`: Spark's warnings, its progress bar and the
pipeline's own log lines; no Spark INFO lines, no Ivy report; errors still shown. The setup
steps themselves on a scratch Spark home."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.spark import session
from tests.conftest import REPO, write_jsonl
from tests.test_incremental import start_job
from tests.test_job_e2e import BIN, run_job

# Lines Ivy prints while it resolves spark.jars.packages.
IVY_MARKERS = ("Ivy Default Cache", ":: resolving dependencies", ":: resolution report",
               ":: retrieving", "artifacts copied", "from central in", "added as a dependency")


def spark_info_lines(console: str) -> list[str]:
    """INFO lines not logged by the pipeline (Spark's log4j and Python's both put the level
    between spaces)."""
    return [line for line in console.splitlines()
            if " INFO " in line and " INFO pipeline." not in line]


def ivy_lines(console: str) -> list[str]:
    return [line for line in console.splitlines() if any(m in line for m in IVY_MARKERS)]


@pytest.fixture(scope="module")
def merged_run(sample_docs, tmp_path_factory) -> tuple[int, str]:
    """spark-submit of the embedding job with stdout and stderr in one file, as in
    `spark-submit ... > run.log 2>&1`; its exit code and the file's text, carriage returns kept
    (the progress bar redraws itself with them)."""
    folder = tmp_path_factory.mktemp("console")
    source = write_jsonl(folder / "docs.jsonl", sample_docs[:12])
    log = folder / "run.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    job = start_job([str(BIN / "spark-submit"), str(REPO / "jobs" / "embed_corpus.py"),
                     "--input", str(source)], folder / "vectors", log, cwd=folder, env=env)
    code = job.wait(timeout=900)
    return code, log.read_bytes().decode()


@pytest.mark.slow
def test_spark_submit_prints_no_spark_info_and_no_ivy_report(merged_run):
    code, console = merged_run
    assert code == 0, console[-3000:]
    assert not spark_info_lines(console), spark_info_lines(console)[:5]
    assert not ivy_lines(console), ivy_lines(console)[:5]
    assert "default log4j profile" not in console, "the setup's log4j2.properties is used"
    assert "INFO pipeline.embed" in console and "INFO pipeline.model" in console, "ours stay"
    assert "[Stage " in console, "the progress bar stays"


@pytest.mark.slow
def test_a_failing_spark_submit_job_still_shows_its_error(tmp_path):
    missing = tmp_path / "no-such-corpus.jsonl"
    done = run_job([str(BIN / "spark-submit")], "--input", str(missing), "--output",
                   str(tmp_path / "out"), cwd=tmp_path)
    console = done.stdout + done.stderr  # spark-submit sends the driver's stderr to stdout
    assert done.returncode == 2
    assert f"error: input {missing} does not exist" in console, console[-3000:]
    assert not spark_info_lines(console) and not ivy_lines(console)


# --- the setup steps (python -m pipeline.spark.session) on a scratch Spark home --------------


def fake_delta_jars(home: Path, coordinates: str, names: list[str]) -> list[str]:
    folder = home / session.DELTA_JARS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"PK")
    (folder / session.DELTA_JARS_MANIFEST).write_text("\n".join([coordinates, *names]) + "\n")
    return [str(folder / name) for name in names]


def defaults(home: Path) -> dict[str, str]:
    lines = (home / "conf" / "spark-defaults.conf").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines if line.strip())


def test_kept_delta_jars_replace_ivy_only_when_made_for_the_installed_delta(tmp_path):
    coordinates = session.delta_maven_coordinates()
    assert session.delta_jars_conf(tmp_path) == {"spark.jars.packages": coordinates}
    jars = fake_delta_jars(tmp_path, coordinates, ["delta-spark.jar", "delta-storage.jar"])
    assert session.delta_jars_conf(tmp_path) == {"spark.jars": ",".join(jars)}
    Path(jars[1]).unlink()
    assert "spark.jars.packages" in session.delta_jars_conf(tmp_path), "one JAR missing"
    fake_delta_jars(tmp_path, "io.delta:delta-spark_2.13:3.2.0", ["old.jar"])
    assert "spark.jars.packages" in session.delta_jars_conf(tmp_path), "another Delta's"


def test_spark_defaults_swap_an_old_delta_packages_line_for_the_jars_and_keep_yours(tmp_path):
    conf = tmp_path / "conf" / "spark-defaults.conf"
    conf.parent.mkdir()
    conf.write_text("# mine\n"
                    "spark.jars.packages io.delta:delta-spark_2.13:3.2.0,org.example:tool:1.0\n"
                    "spark.jars /opt/mine.jar\n"
                    "spark.driver.memory 8g\n")
    old = fake_delta_jars(tmp_path, "io.delta:delta-spark_2.13:3.2.0", ["delta-3.2.0.jar"])
    session.write_spark_defaults(old, tmp_path)
    new = fake_delta_jars(tmp_path, session.delta_maven_coordinates(), ["a.jar", "b.jar"])
    session.write_spark_defaults(new, tmp_path)
    written = conf.read_text()
    assert written.startswith("# mine\n")
    values = defaults(tmp_path)
    assert values["spark.jars.packages"] == "org.example:tool:1.0", "Delta no longer via Ivy"
    assert values["spark.jars"] == ",".join(["/opt/mine.jar", *new]), "the old Delta JAR left"
    assert values["spark.driver.memory"] == "8g", "keys already there are kept"
    assert values["spark.sql.extensions"] == session.DELTA_SQL_CONF["spark.sql.extensions"]
    session.write_spark_defaults(new, tmp_path)
    assert conf.read_text() == written, "idempotent"


def test_a_delta_only_packages_line_is_dropped(tmp_path):
    conf = tmp_path / "conf" / "spark-defaults.conf"
    conf.parent.mkdir()
    conf.write_text(f"spark.jars.packages {session.delta_maven_coordinates()}\n")
    jars = fake_delta_jars(tmp_path, session.delta_maven_coordinates(), ["a.jar"])
    session.write_spark_defaults(jars, tmp_path)
    assert "spark.jars.packages" not in defaults(tmp_path)
    assert defaults(tmp_path)["spark.jars"] == jars[0]


def test_log4j_config_is_written_at_warn_and_yours_is_kept(tmp_path):
    path = Path(session.write_log4j_config(tmp_path))
    assert "rootLogger.level = warn" in path.read_text()
    assert session.write_log4j_config(tmp_path) == str(path), "ours is rewritten"
    path.write_text("rootLogger.level = debug\n")
    assert session.write_log4j_config(tmp_path) is None
    assert path.read_text() == "rootLogger.level = debug\n"



@pytest.mark.slow
def test_the_summary_is_a_json_line_of_its_own_when_both_streams_share_a_file(merged_run):
    """The progress bar ends its lines with carriage returns, never a newline: the summary
    starts a line anyway, and that line is the file's last (the Airflow DAG reads it)."""
    code, console = merged_run
    assert code == 0, console[-3000:]
    assert "\r[Stage " in console, "the progress bar was drawn into the same file"
    last = console.rstrip("\n").split("\n")[-1]
    assert not last.startswith("[Stage") and last.startswith("{"), repr(last[:200])
    assert json.loads(last)["documents_embedded"] == 12
