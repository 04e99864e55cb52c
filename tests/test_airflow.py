"""The Airflow DAG, in Airflow's own virtual environment: it loads, and it runs for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from deltalake import DeltaTable

from tests.conftest import REPO, SAMPLE_CORPUS

pytestmark = pytest.mark.slow
AIRFLOW_PINS = ["apache-airflow==3.3.2", "apache-airflow-providers-apache-spark==6.3.4"]
VENV = Path.home() / ".cache" / "spark-embed-pipeline" / "airflow-3.3.2"
DAGS = REPO / "jobs" / "airflow"

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
              "'backoff': task.retry_exponential_backoff}))")
    done = subprocess.run([str(airflow_python), "-c", script], env=airflow_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {"errors": {}, "params": ["cluster", "cluster_k", "input", "mode", "model",
                                               "output", "profile"],
                      "retries": 2, "backoff": True}


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
            assert DeltaTable(f"{output}_clusters_assignments").to_pandas().cluster.nunique() in (
                3, 4)
            assert Path(f"{output}_clusters.png").exists()
    read = subprocess.run([str(airflow_python), "-c", READ_SUMMARIES], env=airflow_env,
                          capture_output=True, text=True, timeout=300)
    first, second = json.loads(read.stdout.strip().splitlines()[-1])
    documents = len(SAMPLE_CORPUS.read_text().splitlines())
    assert first["documents_embedded"] == documents
    assert (second["documents_embedded"], second["documents_unchanged"]) == (0, documents)
    assert DeltaTable(str(tmp_path / "vectors")).version() == first["table_version"]
