"""Airflow DAG: embed new and changed documents into Delta every day.

Needs Airflow >= 3.0 (the `airflow.sdk` API) with apache-airflow-providers-apache-spark. Copy this
file into the DAGs folder of an Airflow whose workers can run the pipeline's `spark-submit` (put
the pipeline environment's `bin` on PATH). Everything site-specific comes from Airflow Variables
and DAG params, nothing is hard-coded:

- Variable `embed_corpus_application`: path of `jobs/embed_corpus.py` (default: next to this DAG)
- Variable `embed_corpus_cluster_application`: path of `jobs/cluster_embeddings.py` (default: in
  the folder of `embed_corpus_application`)
- Variable `embed_corpus_spark_conn_id`: the Spark connection (default `spark_default`)
- params `profile` (a profile name in conf/, or a YAML path, as `--config` takes) and `input`,
  `output`, `model`, `mode`: left empty, each of these is the profile's (the job reads it through
  pipeline.config), so the DAG repeats none of the profile's defaults; `cluster` (default off) adds
  a downstream clustering, with the same profile, of the table the embedding wrote, trying each k
  of `cluster_k` (comma-separated)

The task's return value, pushed to XCom, is the run summary the job prints. The job writes it to a
local file (`--summary-file`) that this task reads, so the connection's deploy mode must be
`client` (the default): in `cluster` mode the driver runs elsewhere, and the task falls back to
the last summary line in spark-submit's output, or fails saying so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import DAG, Param, Variable
from airflow.sdk.exceptions import AirflowFailException

DEFAULT_APPLICATION = str(Path(__file__).resolve().parent.parent / "embed_corpus.py")
APPLICATION_EXPR = "var.value.get('embed_corpus_application', '" + DEFAULT_APPLICATION + "')"
APPLICATION = "{{ " + APPLICATION_EXPR + " }}"
# The clustering job: its own Variable, else the file next to the embedding job.
CLUSTER_APPLICATION = ("{{ var.value.get('embed_corpus_cluster_application', sibling("
                       + APPLICATION_EXPR + ", 'cluster_embeddings.py')) }}")
# The table the embedding task wrote, from the summary it pushed.
EMBEDDED_TABLE = "{{ ti.xcom_pull(task_ids='embed_corpus')['output'] }}"
# The params that set the embedding job's flags; an empty one leaves the setting to the profile.
PARAM_FLAGS = {"input": "--input", "output": "--output", "model": "--model", "mode": "--mode"}


def profile_arguments(params: Mapping) -> list[str]:
    """`--config` with the profile, and the flags of the params that are set."""
    arguments = ["--config", str(params["profile"])]
    for name, flag in PARAM_FLAGS.items():
        if params.get(name):
            arguments += [flag, str(params[name])]
    return arguments


def sibling(path: str, name: str) -> str:
    """The file `name` in the folder of `path` (a template macro)."""
    return str(Path(path).with_name(name))


def summary_from_output(lines) -> dict | None:
    """The run summary among spark-submit's output lines: the last JSON object with a run id
    (the job prints it last on stdout; Spark may log after it)."""
    for line in reversed(list(lines)):
        text = line.strip()
        if not text.startswith("{"):
            continue
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict) and "run_id" in value:
            return value
    return None


class EmbedCorpusOperator(SparkSubmitOperator):
    """spark-submit of the embedding job with the profile and the params that are set; returns
    its summary so that it lands in XCom."""

    def execute(self, context):
        with TemporaryDirectory() as folder:
            summary_file = Path(folder) / "summary.json"
            self.application_args = [*profile_arguments(context["params"]),
                                     *(self.application_args or []),
                                     "--summary-file", str(summary_file)]
            super().execute(context)
            if summary_file.exists():
                return json.loads(summary_file.read_text())
        # No file: the driver ran on another machine (deploy mode cluster), or the application
        # writes none. The provider keeps the tail of spark-submit's output, which carries the
        # summary line wherever the driver's stdout comes through.
        output = getattr(getattr(self, "_hook", None), "_last_submit_log_lines", None) or []
        summary = summary_from_output(output)
        if summary is None:
            raise AirflowFailException(
                f"the job ran but left no summary: {summary_file} was not written on this worker "
                "and spark-submit's output holds no summary line. The DAG reads the summary "
                "locally, so run it with deploy mode client (the Spark connection's "
                "deploy-mode extra, or unset)."
            )
        self.log.warning("no summary file (deploy mode cluster?); using the summary line "
                         "spark-submit printed")
        return summary


def clustering_requested(params: dict, **_context) -> bool:
    return bool(params["cluster"])


with DAG(
    dag_id="embed_corpus",
    description="Embed new and changed documents into a Delta table of vectors",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=5),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(hours=1),
    },
    params={
        "profile": Param("local", type="string", description="--config: a profile or YAML path"),
        "input": Param("", type="string", description="input.path (empty: the profile's)"),
        "output": Param("", type="string", description="output.path (empty: the profile's)"),
        "model": Param("", type="string", description="model.name (empty: the profile's)"),
        "mode": Param("", type="string", description="output.mode (empty: the profile's)"),
        "cluster": Param(False, type="boolean"),
        "cluster_k": Param("4,6,8", type="string"),
    },
    tags=["embeddings", "delta"],
    user_defined_macros={"sibling": sibling},
) as dag:
    spark_job = {
        "conn_id": Variable.get("embed_corpus_spark_conn_id", default="spark_default"),
        "env_vars": {"PYTHONUNBUFFERED": "1", "PATH": os.environ.get("PATH", "")},
    }
    embed = EmbedCorpusOperator(
        task_id="embed_corpus",
        application=APPLICATION,
        name="embed-corpus",
        **spark_job,
    )
    wants_clusters = ShortCircuitOperator(
        task_id="clustering_requested",
        python_callable=clustering_requested,
    )
    cluster = SparkSubmitOperator(
        task_id="cluster_embeddings",
        application=CLUSTER_APPLICATION,
        name="cluster-embeddings",
        application_args=[
            "--vectors", EMBEDDED_TABLE,
            "--output", EMBEDDED_TABLE + "_clusters",
            "--k", "{{ params.cluster_k }}",
            "--plot", EMBEDDED_TABLE + "_clusters.png",
            "--config", "{{ params.profile }}",
        ],
        **spark_job,
    )
    embed >> wants_clusters >> cluster
