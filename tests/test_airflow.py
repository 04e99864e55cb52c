"""The Airflow DAG, in Airflow's own virtual environment: it loads, and it runs for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from deltalake import DeltaTable

from tests.conftest import REPO, SAMPLE_CORPUS, delta_rows

pytestmark = pytest.mark.slow
AIRFLOW_PINS = ["apache-airflow==3.3.2", "apache-airflow-providers-apache-spark==6.3.4"]
VENV = Path.home() / ".cache" / "spark-embed-pipeline" / "airflow-3.3.2"
DAGS = REPO / "jobs" / "airflow"
DAG_FILE = "embed_corpus_dag.py"
# Stand-ins for the two jobs, reached through the Variables: the embedding one prints its summary
# (then log noise) but writes no summary file, the clustering one records its arguments.
FAKE_EMBED = """
import json, sys
args = sys.argv[1:]
print("INFO a log line before the summary")
print(json.dumps({"run_id": "stand-in", "output": args[args.index("--output") + 1],
                  "documents_embedded": 0, "args": args}))
print("WARN ShutdownHookManager: a log line after it")
"""
FAKE_CLUSTER = """
import json, sys
args = sys.argv[1:]
open(args[args.index("--output") + 1], "w").write(json.dumps(args))
"""

READ_SUMMARIES = """
import json
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
with create_session() as session:
    rows = (session.query(XComModel)
            .filter(XComModel.dag_id == "embed_corpus", XComModel.task_id == "embed_corpus",
                    XComModel.key == "return_value")
            .order_by(XComModel.timestamp).all())
    print(json.dumps([XComModel.deserialize_value(row) for row in rows]))
"""


def read_summaries(airflow_python, airflow_env, run_folder: Path) -> list[dict]:
    """The embedding task's XCom summaries, oldest first, of the runs that wrote under
    `run_folder`."""
    read = subprocess.run([str(airflow_python), "-c", READ_SUMMARIES], env=airflow_env,
                          capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-3000:]
    summaries = json.loads(read.stdout.strip().splitlines()[-1])
    return [summary for summary in summaries if str(run_folder) in summary.get("output", "")]


@pytest.fixture(scope="module")
def airflow_python() -> Path:
    """Airflow pins its own dependencies: it gets a virtual environment of its own, kept in the
    user's cache between runs."""
    python = VENV / "bin" / "python"
    ready = VENV / ".installed"
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *AIRFLOW_PINS], check=True,
                       timeout=1200)
        ready.touch()
    return python


@pytest.fixture(scope="module")
def airflow_env(airflow_python, tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
        # the pipeline environment's spark-submit, as on an Airflow worker set up per the README
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    subprocess.run([str(airflow_python.parent / "airflow"), "db", "migrate"], env=env,
                   check=True, capture_output=True, timeout=600)
    return env


def test_dag_folder_loads_without_import_errors(airflow_python, airflow_env):
    script = ("from airflow.dag_processing.dagbag import DagBag; import json; "
              f"bag = DagBag({str(DAGS)!r}); dag = bag.dags['embed_corpus']; "
              "task = dag.get_task('embed_corpus'); "
              "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()}, "
              "'params': sorted(dag.params), 'retries': task.retries, "
              "'backoff': task.retry_exponential_backoff, "
              "'applications': [dag.get_task(key).application "
              "                 for key in ('embed_corpus', 'cluster_embeddings')]}))")
    done = subprocess.run([str(airflow_python), "-c", script], env=airflow_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    embed_application, cluster_application = loaded.pop("applications")
    assert loaded == {"errors": {}, "params": ["cluster", "cluster_k", "input", "mode", "model",
                                               "output", "profile"],
                      "retries": 2, "backoff": True}
    # Both applications are templates over Variables, not fixed paths.
    assert "var.value.get('embed_corpus_application'" in embed_application
    assert "var.value.get('embed_corpus_cluster_application'" in cluster_application
    assert "var.value.get('embed_corpus_application'" in cluster_application


def test_summary_is_the_last_json_line_of_the_output(airflow_python, airflow_env):
    """Where no summary file was written, the last printed summary line stands in; Spark log lines
    after it and other JSON do not."""
    lines = ['{"run_id": "old", "documents_embedded": 1}', "INFO starting",
             '{"run_id": "new", "documents_embedded": 2}', "{not json", '{"other": 1}',
             "26/11/27 WARN ShutdownHookManager: deleting /tmp/spark-1"]
    script = ("import importlib.util, json, sys; "
              f"spec = importlib.util.spec_from_file_location('dag', {str(DAGS / DAG_FILE)!r}); "
              "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
              "lines = json.loads(sys.argv[1]); "
              "print(json.dumps([module.summary_from_output(lines), "
              "                  module.summary_from_output(lines[3:]), "
              "                  module.sibling('/opt/jobs/embed_corpus.py', 'x.py')]))")
    done = subprocess.run([str(airflow_python), "-c", script, json.dumps(lines)],
                          env=airflow_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [
        {"run_id": "new", "documents_embedded": 2}, None, "/opt/jobs/x.py"]


def test_dag_runs_the_job_and_pushes_its_summary_then_a_rerun_embeds_nothing(
        airflow_python, airflow_env, tmp_path):
    airflow = str(airflow_python.parent / "airflow")
    output = str(tmp_path / "vectors")
    for cluster in (True, False):
        conf = json.dumps({"output": output, "cluster": cluster, "cluster_k": "3,4"})
        done = subprocess.run([airflow, "dags", "test", "embed_corpus", "-c", conf],
                              env=airflow_env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if cluster:
            assert delta_rows(f"{output}_clusters_assignments").cluster.nunique() in (
                3, 4)
            assert Path(f"{output}_clusters.png").exists()
    first, second = read_summaries(airflow_python, airflow_env, tmp_path)
    documents = len(SAMPLE_CORPUS.read_text().splitlines())
    assert first["documents_embedded"] == documents
    assert (second["documents_embedded"], second["documents_unchanged"]) == (0, documents)
    assert DeltaTable(str(tmp_path / "vectors")).version() == first["table_version"]


def test_dag_takes_both_applications_from_variables_and_reads_a_printed_summary(
        airflow_python, airflow_env, tmp_path):
    """The Variable moves the embedding application, and the clustering one follows it to its
    folder; an application that writes no summary file still lands its printed summary in XCom."""
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "embed_corpus.py").write_text(FAKE_EMBED)
    (apps / "cluster_embeddings.py").write_text(FAKE_CLUSTER)
    output = str(tmp_path / "vectors")
    env = {**airflow_env, "AIRFLOW_VAR_EMBED_CORPUS_APPLICATION": str(apps / "embed_corpus.py")}
    conf = json.dumps({"output": output, "cluster": True, "cluster_k": "3"})
    done = subprocess.run([str(airflow_python.parent / "airflow"), "dags", "test", "embed_corpus",
                           "-c", conf], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The clustering task clusters the table the embedding reported, with the same profile.
    cluster_args = json.loads(Path(f"{output}_clusters").read_text())
    assert cluster_args[:4] == ["--vectors", output, "--output", f"{output}_clusters"]
    assert cluster_args[-2:] == ["--config", "local"]
    (summary,) = read_summaries(airflow_python, airflow_env, tmp_path)
    # The params left empty (input, model, mode) are the profile's: the job gets no flag for them.
    embed_args = summary.pop("args")
    assert embed_args[:-1] == ["--config", "local", "--output", output, "--summary-file"]
    assert summary == {"run_id": "stand-in", "output": output, "documents_embedded": 0}
